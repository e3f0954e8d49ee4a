"""benchmarks/gpu_plan.py, the device-call runner, on the CPU: its step language, that it keeps
what a killed measurement printed, tags A/B records by config, and skips steps past its deadline
(a stub stands in for throughput.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_plan", ROOT / "benchmarks" / "gpu_plan.py")
gpu_plan = importlib.util.module_from_spec(_spec)
sys.modules["gpu_plan"] = gpu_plan  # (dataclasses look the module up by name)
_spec.loader.exec_module(gpu_plan)


def test_steps_parse_into_runs_configs_and_test_selections():
    side = gpu_plan.parse_step("side vim_small_patch16_224,vim_tiny_patch16_224 512,1024")
    assert side.kind == "side" and side.paths == ("cuda", "triton", "deit")
    assert side.runs == [
        ("vim_small_patch16_224", 512, None),
        ("vim_small_patch16_224", 1024, None),
        ("vim_tiny_patch16_224", 512, None),
        ("vim_tiny_patch16_224", 1024, None),
    ]
    assert gpu_plan.parse_step("side vim_small_patch16_224 224 triton,deit").paths == ("triton", "deit")
    assert side.configs == []
    tuned = gpu_plan.parse_step("side vim_base_patch16_224 1024 cuda,triton set:SEQ_CHUNK=(260,520),X=1")
    assert tuned.paths == ("cuda", "triton") and tuned.configs == [("set", ["SEQ_CHUNK=(260,520)", "X=1"])]
    tuned = gpu_plan.parse_step("side vim_base_patch16_224 1024 set:X=1")
    assert tuned.paths == ("cuda", "triton", "deit") and tuned.configs == [("set", ["X=1"])]
    ab = gpu_plan.parse_step("ab vim_tiny_patch16_224:512 base: off:SEQ_WSELF=False both:A=1,B=(2,3)")
    assert ab.runs == [("vim_tiny_patch16_224", 512, None)]
    ab16 = gpu_plan.parse_step("ab vim_small_patch16_224:1024:16,vim_tiny_patch16_224:512 d:")
    assert ab16.runs == [("vim_small_patch16_224", 1024, 16), ("vim_tiny_patch16_224", 512, None)]
    assert ab.configs == [("base", []), ("off", ["SEQ_WSELF=False"]), ("both", ["A=1", "B=(2,3)"])]
    assert gpu_plan.parse_step("tests gradient_carr or wself").k == "gradient_carr or wself"
    assert gpu_plan.parse_step("tests").k == ""
    prof = gpu_plan.parse_step("profile vim_small_patch16_224:1024,vim_tiny_patch16_224:224 cuda infer")
    assert prof.runs == [("vim_small_patch16_224", 1024, None), ("vim_tiny_patch16_224", 224, None)]
    assert prof.paths == ("cuda",) and prof.infer
    prof = gpu_plan.parse_step("profile vim_small_patch16_224:224")
    assert prof.paths == ("triton",) and not prof.infer


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty step"),
        ("bench vim_small_patch16_224 224", "unknown kind 'bench'"),
        ("side vim_small_patch16_224", "expected 'side MODELS PXS"),
        ("side vim_small_patch16_224 big", "comma-separated image sizes"),
        ("side vim_small_patch16_224 224 set:X=1 cuda", "expected 'side MODELS PXS"),
        ("side vim_small_patch16_224 224 set:X=1 set:Y=2", "expected 'side MODELS PXS"),
        ("side vim_small_patch16_224 224 set:X", "'X' is not NAME=VALUE"),
        ("ab vim_small_patch16_224 off:SEQ_WSELF=False", "run 'vim_small_patch16_224' is not MODEL:PX"),
        ("ab vim_small_patch16_224:512 SEQ_WSELF=False", "is not TAG:NAME=VALUE"),
        ("ab vim_small_patch16_224:512:x d:", "expected an image size and optionally a batch"),
        ("ab vim_small_patch16_224:512:0 d:", "both positive integers"),
        ("profile vim_small_patch16_224:-224", "both positive integers"),
        ("ab vim_small_patch16_224: d:", "is not MODEL:PX"),
        ("ab vim_small_patch16_224:512 off:SEQ_WSELF", "'SEQ_WSELF' is not NAME=VALUE"),
        ("ab vim_small_patch16_224:512 a:X=1 a:X=2", "config tags repeat"),
        ("profile", "expected 'profile MODEL:PX"),
        ("profile vim_small_patch16_224:224 gpu", "expected 'profile MODEL:PX"),
        ("profile vim_small_patch16_224", "is not MODEL:PX"),
        ("ncu vim_small_patch16_224:224 scan extra", "expected 'ncu MODEL:PX"),
    ],
)
def test_bad_steps_are_refused_naming_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match):
        gpu_plan.parse_step(text)


def test_a_bad_step_stops_the_plan_before_any_step_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_plan.main([str(tmp_path / "out"), "tests", "ab vim_small_patch16_224 x:A=1"])
    assert "is not MODEL:PX" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_records_are_read_from_the_output_and_a_cut_line_is_dropped():
    rec = {"model": "vim_small_patch16_224", "img_size": 224, "batch": 128, "path": "triton"}
    out = "\n".join(["compiling...", json.dumps(rec), '{"model": "vim_t', "| model | px |"])
    assert gpu_plan.records_from(out) == [rec]


def test_a_run_past_its_limit_is_killed_with_its_children_and_keeps_its_output(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        print('{{"model": "m", "img_size": 1}}', flush=True)
        time.sleep(60)
    """)
    t0 = time.monotonic()
    out, timed_out = gpu_plan.run_limited([sys.executable, "-c", script], 3)
    assert timed_out and time.monotonic() - t0 < 30
    assert gpu_plan.records_from(out) == [{"model": "m", "img_size": 1}]
    child = int(pidfile.read_text())
    for _ in range(50):  # the worker (like throughput.py's) went with it
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the child process outlived the killed run")


STUB = """
import json, sys
args = sys.argv[1:]
models = args[args.index("--models") + 1]
px = int(args[args.index("--img-sizes") + 1])
batch = int(args[args.index("--batch") + 1]) if "--batch" in args else 8
paths = [a for a in args[args.index("--paths") + 1: args.index("--set") if "--set" in args else len(args)]
         if a in ("torch", "cuda", "triton", "deit")]
sets = args[args.index("--set") + 1:] if "--set" in args else []
speed = 100.0 + 10 * len(sets)
for path in paths:
    rec = dict(model=models, img_size=px, batch=batch, path=path, train_img_s=speed, infer_img_s=4 * speed,
               train_peak_gib=1.5)
    if sets:
        rec["settings"] = sets
    print(json.dumps(rec), flush=True)
"""


@pytest.fixture
def stub_throughput(tmp_path, monkeypatch):
    """throughput.py replaced by STUB (instant records, faster with more settings)."""
    stub = tmp_path / "throughput_stub.py"
    stub.write_text(STUB)
    monkeypatch.setattr(gpu_plan, "THROUGHPUT", stub)


def test_a_plan_runs_its_steps_in_order_and_tags_ab_records(tmp_path, stub_throughput):
    out = tmp_path / "out"
    gpu_plan.main(
        [
            str(out),
            "side vim_small_patch16_224 1024 cuda,triton",
            "ab vim_tiny_patch16_224:512,vim_small_patch16_224:1024 base: off:SEQ_WSELF=False",
            "ab vim_small_patch16_224:1024:16 b16:",
        ]
    )
    side = json.loads((out / "side.json").read_text())
    assert [(r["model"], r["path"]) for r in side] == [
        ("vim_small_patch16_224", "cuda"),
        ("vim_small_patch16_224", "triton"),
    ]
    ab = json.loads((out / "ab.json").read_text())
    assert [(r["model"], r["img_size"], r["config"]) for r in ab] == [
        ("vim_tiny_patch16_224", 512, "base"),
        ("vim_tiny_patch16_224", 512, "off"),
        ("vim_small_patch16_224", 1024, "base"),
        ("vim_small_patch16_224", 1024, "off"),
        ("vim_small_patch16_224", 1024, "b16"),
    ]
    assert [r["batch"] for r in ab] == [8, 8, 8, 8, 16]  # a run's own batch reaches throughput.py
    assert [r.get("settings") for r in ab][:2] == [None, ["SEQ_WSELF=False"]]
    summary = (out / "summary.md").read_text()
    assert "| vim_small_patch16_224 | 1024 | 8 | triton | 100.0 | 400.0 | 1.50 |" in summary
    # each side-by-side run's ratios (the stub's paths are equally fast)
    line = "vim_small_patch16_224 b8 triton/cuda: training 1.00x, inference 1.00x, memory 1.00x; issue 6 targets not met"
    assert f"[side 1024] {line}" in summary
    assert summary.rstrip().endswith("done")
    assert (out / "gpu.txt").exists()


def test_a_side_step_with_settings_passes_them_and_tags_its_records(tmp_path, stub_throughput):
    out = tmp_path / "out"
    gpu_plan.main([str(out), "side vim_base_patch16_224 1024 cuda,triton set:SEQ_CHUNK=(260,520),X=1"])
    side = json.loads((out / "side.json").read_text())
    assert [(r["path"], r["settings"], r["config"]) for r in side] == [
        (path, ["SEQ_CHUNK=(260,520)", "X=1"], "SEQ_CHUNK=(260,520),X=1") for path in ("cuda", "triton")
    ]
    assert (
        "[side 1024] vim_base_patch16_224 b8 triton/cuda: training 1.00x" in (out / "summary.md").read_text()
    )


def test_steps_past_the_deadline_are_skipped_and_say_so(tmp_path, stub_throughput):
    out = tmp_path / "out"
    gpu_plan.main(
        [str(out), "--deadline", "10", "--min-left", "20", "side vim_small_patch16_224 224", "tests"]
    )
    summary = (out / "summary.md").read_text()
    assert "[side 224]: skipped" in summary and "[tests] skipped" in summary
    assert not (out / "tests.txt").exists()


def test_the_tests_step_runs_pytest_with_its_selection(tmp_path, monkeypatch):
    suite = tmp_path / "test_tiny.py"
    suite.write_text("def test_kept():\n    assert True\n\n\ndef test_left_out():\n    assert False\n")
    monkeypatch.setattr(gpu_plan, "GPU_TESTS", (str(suite),))
    out = tmp_path / "out"
    gpu_plan.main([str(out), "tests kept"])
    assert "1 passed, 1 deselected" in (out / "tests.txt").read_text()
    assert "[tests kept] " in (out / "summary.md").read_text()


def test_a_test_run_killed_after_its_summary_says_every_test_ran(tmp_path, monkeypatch):
    # (the H100's whole suite printed its summary a moment before the deadline, and the plan
    # called it "stopped at the deadline")
    suite = tmp_path / "test_slow_exit.py"
    suite.write_text("import atexit, time\n\natexit.register(time.sleep, 60)\n\n\n"
                     "def test_quick():\n    assert True\n")  # fmt: skip
    monkeypatch.setattr(gpu_plan, "GPU_TESTS", (str(suite),))
    out = tmp_path / "out"
    gpu_plan.main([str(out), "--deadline", "8", "--min-left", "1", "tests"])
    summary = (out / "summary.md").read_text()
    assert "[tests] killed at the deadline after its summary: 1 passed" in summary
    assert "stopped at the deadline" not in summary


def test_a_test_run_cut_before_its_summary_says_it_stopped(tmp_path, monkeypatch):
    suite = tmp_path / "test_slow.py"
    suite.write_text("import time\n\n\ndef test_slow():\n    time.sleep(60)\n")
    monkeypatch.setattr(gpu_plan, "GPU_TESTS", (str(suite),))
    out = tmp_path / "out"
    gpu_plan.main([str(out), "--deadline", "5", "--min-left", "1", "tests"])
    assert "[tests] stopped at the deadline: " in (out / "summary.md").read_text()


PROFILE_STUB = """
import json, sys
args = sys.argv[1:]
value = {k: args[args.index(k) + 1] for k in ("--model", "--img", "--batch", "--path", "--out")}
if value["--model"] == "broken":
    sys.exit("no such model")
kernels = [dict(name=f"kernel_{i}", ms_per_step=10.0 - i, calls_per_step=24) for i in range(7)]
json.dump(dict(model=value["--model"], path=value["--path"], infer="--infer" in args, total_ms=49.0,
               wall_ms=60.0, kernels=kernels, batch_seen=int(value["--batch"])), open(value["--out"], "w"))
"""


def test_the_profile_step_keeps_each_runs_kernels(tmp_path, monkeypatch):
    stub = tmp_path / "profile_stub.py"
    stub.write_text(PROFILE_STUB)
    monkeypatch.setattr(gpu_plan, "PROFILE", stub)
    out = tmp_path / "out"
    gpu_plan.main(
        [str(out), "profile vim_small_patch16_224:1024,broken:224,vim_tiny_patch16_224:512:2 triton infer"]
    )
    profiles = json.loads((out / "profile.json").read_text())
    assert [(p["model"], p["img_size"], p["batch"], p["batch_seen"], p["infer"]) for p in profiles] == [
        ("vim_small_patch16_224", 1024, 8, 8, True),  # throughput.py's batch for the size
        ("vim_tiny_patch16_224", 512, 2, 2, True),  # the run's own
    ]
    summary = (out / "summary.md").read_text()
    assert (
        "[profile vim_small_patch16_224 1024 triton inference] 49.0 ms of kernels in a 60.0 ms step"
        in summary
    )
    assert "kernel_4 6.00 ms (12%)" in summary and "kernel_5" not in summary  # the top five
    assert "[profile broken 224 triton inference]: no profile; last output: ['no such model']" in summary
    assert sorted(f.name for f in out.iterdir()) == ["gpu.txt", "profile.json", "summary.md"]


def test_the_plans_batches_are_throughputs():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    assert gpu_plan.BATCH == throughput.BATCH
    assert (gpu_plan.batch_for(512), gpu_plan.batch_for(384), gpu_plan.batch_for(512, 16)) == (32, 8, 16)


NCU_STUB = """#!{python}
import sys
args = sys.argv[1:]
if "--import" in args:
    print('"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"')
    print('"0","scan_fwd_kernel","Duration","us","12.5"')
    print('"0","scan_fwd_kernel","Waves Per SM","","1.94"')
    sys.exit(0)
out = args[args.index("-o") + 1]
step = args[args.index("-o") + 2:]
model = step[step.index("--model") + 1]
assert args[args.index("-k") + 1] == "regex:scan", args
assert step[step.index("--batch") + 1] == "8" and step[step.index("--depth") + 1] == "2", step
if model != "broken":
    open(out + ".ncu-rep", "w").write("report")
print("==PROF== done")
"""


def test_the_ncu_step_keeps_each_runs_counters(tmp_path, monkeypatch):
    import gzip

    stub = tmp_path / "ncu"
    stub.write_text(NCU_STUB.format(python=sys.executable))
    stub.chmod(0o755)
    monkeypatch.setattr(gpu_plan, "find_ncu", lambda: str(stub))
    out = tmp_path / "out"
    gpu_plan.main([str(out), "ncu vim_small_patch16_224:1024,broken:1024 regex:scan"])
    csv = gzip.decompress((out / "ncu_vim_small_patch16_224_1024.csv.gz").read_bytes()).decode()
    assert '"0","scan_fwd_kernel","Duration","us","12.5"' in csv
    summary = (out / "summary.md").read_text()
    assert (
        "[ncu vim_small_patch16_224 1024] 3 lines of counters in ncu_vim_small_patch16_224_1024.csv.gz"
        in summary
    )
    assert "[ncu vim_small_patch16_224 1024] scan_fwd_kernel x1, 12.5 us, waves 1.94" in summary
    assert "[ncu broken 1024]: no report; last output: ['==PROF== done']" in summary
    assert not (out / "ncu_broken_1024.csv.gz").exists()
    # without Nsight Compute the step says so
    monkeypatch.setattr(gpu_plan, "find_ncu", lambda: None)
    gpu_plan.main([str(tmp_path / "out2"), "ncu vim_small_patch16_224:224"])
    assert (
        "[ncu vim_small_patch16_224 224]: skipped, no ncu found"
        in (tmp_path / "out2" / "summary.md").read_text()
    )
    assert gpu_plan.parse_step("ncu vim_small_patch16_224:224").k == gpu_plan.NCU_KERNELS

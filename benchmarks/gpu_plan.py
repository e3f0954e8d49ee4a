"""Several GPU jobs in one device call, in order, under one deadline.

    source .gpu/activate.sh && python3 benchmarks/gpu_plan.py "$OUT" --deadline 560 \\
        "ab vim_tiny_patch16_224:512,vim_small_patch16_224:1024 pass:SEQ_WSELF=False id:SEQ_WSELF=True" \\
        "side vim_small_patch16_224,vim_tiny_patch16_224 1024" \\
        "tests gradient_carr or wself"

Each step is one string; its first word says what it runs:

- ``side MODELS PXS [PATHS] [set:NAME=VALUE[,...]]``: the kernel paths side by side
  (``benchmarks/throughput.py --graphs``): every model of MODELS (comma-separated) at every image
  size of PXS (comma-separated), with PATHS (comma-separated; default ``cuda,triton,deit``), the
  triton path with ``set:``'s settings (as in ``ab``; the records get them as ``config``). Records
  in ``OUT/side.json``; the summary also gets each run's ratios (``benchmarks/ratios.py``).
- ``ab RUNS CONFIG [CONFIG ...]``: an A/B (or A/B/C...) of triton-path settings: every RUN
  (``model:px`` or ``model:px:batch``, comma-separated; without a batch, throughput.py's for the
  size) with every CONFIG (``tag:NAME=VALUE[,NAME=VALUE...]`` of
  ``vimssl.ssm.triton_core`` or ``triton_norm``, values as Python literals, e.g.
  ``SEQ_CHUNK=(128,256)``; ``tag:`` alone for the defaults), the triton path only, the configs of
  one run back to back. Records in ``OUT/ab.json``, each with its config's tag as ``config``.
- ``tests [PYTEST_K]``: ``tests/test_gpu_triton.py`` and ``tests/test_gpu_graphs.py`` (those
  matching ``-k PYTEST_K``); the summary in ``OUT/tests.txt``.
- ``profile RUNS [PATH] [infer]``: where the GPU time of a step goes (``benchmarks/profile_step.py``,
  torch.profiler, eager): every RUN (``model:px[:batch]``, comma-separated) on PATH (default ``triton``),
  the training step or with ``infer`` the inference step, at the run's batch (default:
  throughput.py's for the size).
  Kernels by time in ``OUT/profile.json`` (one object per run), the top five in the summary.
- ``ncu RUNS [KERNELS]``: Nsight Compute's counters (``--set full``, clocks as they run) for the
  triton path's kernels of one eager training step of a two-block model at each RUN's shapes
  (``benchmarks/ncu_step.py``), KERNELS an ncu ``-k`` filter (default: the scan, conv, combine,
  prep and norm kernels). Each run's details page as ``OUT/ncu_MODEL_PX.csv.gz`` (the device
  brings back 8 files at most: keep the runs few), and each kernel's main counters in the summary
  (``benchmarks/ncu_table.py`` prints them all as a table).

Every measurement is a ``throughput.py`` process of its own (which measures each path in a fresh
worker process), killed with its workers when its time is up: what it measured by then is kept.
A step that would start with less than ``--min-left`` seconds to the deadline is skipped, and says
so. ``OUT/gpu.txt`` gets the GPU's name and driver, ``OUT/summary.md`` every table row and test
summary as it comes, with the seconds since the start. The steps replace the per-session scripts
in ``benchmarks/sessions/`` (``gpu_switch_ab.sh``, ``gpu_v22.sh``, ...), kept for the commands
recorded in the docs.
"""

from __future__ import annotations

import argparse
import functools
import glob
import gzip
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = ROOT / "benchmarks" / "throughput.py"
PROFILE = ROOT / "benchmarks" / "profile_step.py"
NCU_STEP = ROOT / "benchmarks" / "ncu_step.py"
NCU_KERNELS = "regex:scan|conv_|combine|prep|add_rms"
BATCH = {224: 128, 512: 32, 1024: 8}  # throughput.py's batch per image size (8 for others)


def batch_for(px: int, batch: int | None = None) -> int:
    """``batch``, or throughput.py's batch for the image size ``px`` when None."""
    return batch or BATCH.get(px, 8)


GPU_TESTS = ("tests/test_gpu_triton.py", "tests/test_gpu_graphs.py")
DEFAULT_PATHS = ("cuda", "triton", "deit")
PATHS = ("torch", "cuda", "triton", "deit")
# pytest's closing line, e.g. "120 passed, 1 skipped, 4 warnings in 436.58s (0:07:16)"
PYTEST_SUMMARY = re.compile(r"\b\d+ (passed|failed|skipped|deselected|errors?)\b.* in [\d.]+s\b")
# commas between settings, not inside a value such as SEQ_CHUNK=(128,256)
_SETTING_SEP = re.compile(r",(?=[A-Za-z_][A-Za-z0-9_]*=)")


class Run(NamedTuple):
    model: str
    px: int
    batch: int | None = None  # None: throughput.py's batch for the size (BATCH)


@dataclass
class Step:
    kind: str  # "side", "ab", "tests", "profile" or "ncu"
    runs: list[Run] = field(default_factory=list)
    paths: tuple[str, ...] = DEFAULT_PATHS
    configs: list[tuple[str, list[str]]] = field(default_factory=list)  # (tag, ["NAME=VALUE", ...])
    k: str = ""  # tests: the -k selection; ncu: the kernel filter
    infer: bool = False  # profile: the inference step


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(
            f"{what}: expected comma-separated image sizes such as 512,1024, got {text!r}"
        ) from None


def parse_step(text: str) -> Step:
    """One step from its string (see the module docstring); ValueError naming what is wrong."""
    words = text.split()
    if not words:
        raise ValueError(
            "empty step: expected 'side ...', 'ab ...', 'tests [PYTEST_K]', 'profile ...' or 'ncu ...'"
        )
    kind, args = words[0], words[1:]
    if kind == "tests":
        return Step("tests", k=" ".join(args))
    if kind == "side":
        sets = [a for a in args[2:] if a.startswith("set:")]
        rest = [a for a in args if not a.startswith("set:")]
        if len(rest) not in (2, 3) or len(sets) > 1 or (sets and args[-1] != sets[0]):
            raise ValueError(f"step {text!r}: expected 'side MODELS PXS [PATHS] [set:NAME=VALUE[,...]]'")
        models = [m for m in rest[0].split(",") if m]
        paths = tuple(p for p in rest[2].split(",") if p) if len(rest) == 3 else DEFAULT_PATHS
        runs = [Run(m, px) for m in models for px in _ints(rest[1], f"step {text!r}")]
        configs = [("set", _settings(sets[0][len("set:") :], text, sets[0]))] if sets else []
        return Step("side", runs=runs, paths=paths, configs=configs)
    if kind == "profile":
        if not 1 <= len(args) <= 3 or any(a not in ("infer", *PATHS) for a in args[1:]):
            raise ValueError(
                f"step {text!r}: expected 'profile MODEL:PX[,MODEL:PX] [{'|'.join(PATHS)}] [infer]'"
            )
        paths = [a for a in args[1:] if a != "infer"]
        return Step("profile", runs=_runs(args[0], text), paths=tuple(paths[:1]) or ("triton",),
                    infer="infer" in args[1:])  # fmt: skip
    if kind == "ncu":
        if len(args) not in (1, 2):
            raise ValueError(f"step {text!r}: expected 'ncu MODEL:PX[,MODEL:PX] [KERNELS]'")
        return Step("ncu", runs=_runs(args[0], text), k=args[1] if len(args) == 2 else NCU_KERNELS)
    if kind == "ab":
        if len(args) < 2:
            raise ValueError(f"step {text!r}: expected 'ab MODEL:PX[,MODEL:PX] TAG:NAME=VALUE[,...] ...'")
        runs = _runs(args[0], text)
        configs = []
        for cfg in args[1:]:
            tag, sep, sets = cfg.partition(":")
            if not sep or not tag:
                raise ValueError(f"step {text!r}: config {cfg!r} is not TAG:NAME=VALUE[,NAME=VALUE]")
            configs.append((tag, _settings(sets, text, cfg)))
        tags = [t for t, _ in configs]
        if len(set(tags)) != len(tags):
            raise ValueError(
                f"step {text!r}: config tags repeat ({', '.join(tags)}); records are told apart by tag"
            )
        return Step("ab", runs=runs, configs=configs)
    raise ValueError(f"step {text!r}: unknown kind {kind!r}; expected side, ab, tests, profile or ncu")


def _settings(sets: str, step: str, cfg: str) -> list[str]:
    """``NAME=VALUE[,NAME=VALUE]`` as ["NAME=VALUE", ...] (a value may hold commas: ``(128,256)``)."""
    pairs = [p for p in _SETTING_SEP.split(sets) if p]
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ValueError(f"step {step!r}: config {cfg!r}: {bad[0]!r} is not NAME=VALUE")
    return pairs


def _runs(text: str, step: str) -> list[Run]:
    """``model:px[:batch][,model:px[:batch]]`` as runs."""
    runs = []
    for run in text.split(","):
        model, sep, rest = run.partition(":")
        px, _, batch = rest.partition(":")
        if not sep or not model or not px:
            raise ValueError(f"step {step!r}: run {run!r} is not MODEL:PX or MODEL:PX:BATCH")
        try:
            size, rows = int(px), int(batch) if batch else None
        except ValueError:
            size = rows = 0
        if size < 1 or (rows is not None and rows < 1):
            raise ValueError(
                f"step {step!r}: run {run!r}: expected an image size and optionally a batch, "
                "both positive integers (vim_small_patch16_224:1024:16)"
            )
        runs.append(Run(model, size, rows))
    return runs


def records_from(stdout: str) -> list[dict]:
    """The records a throughput.py process printed (one JSON object per line), its other lines
    (progress, the closing table) skipped."""
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off when the process was killed
            if isinstance(rec, dict) and "model" in rec:
                out.append(rec)
    return out


def table_row(rec: dict) -> str:
    head = f"| {rec['model']} | {rec['img_size']} | {rec['batch']} | {rec['path']}"
    if "error" in rec:
        return f"{head} | {rec['error']} | | |"
    return f"{head} | {rec['train_img_s']:,.1f} | {rec['infer_img_s']:,.1f} | {rec['train_peak_gib']:.2f} |"


@functools.cache
def _by_path(name: str):
    """benchmarks/NAME.py, by path (this script runs from anywhere, its tests load it by path)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ratio_line(r: dict) -> str:
    """One comparison of :func:`ratios.ratios` as a summary line."""
    deit = "" if r["deit_train"] is None else f", DeiT/triton training {r['deit_train']:.2f}x"
    return (f"{r['model']} b{r['batch']} triton/cuda: training {r['train']:.2f}x, inference {r['infer']:.2f}x, "
            f"memory {r['memory']:.2f}x{deit}; issue 6 targets {'met' if r['meets'] else 'not met'}")  # fmt: skip


def find_ncu() -> str | None:
    """Nsight Compute's command line: on the PATH, or the newest under /opt/nvidia/nsight-compute."""
    installed = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return shutil.which("ncu") or (installed[-1] if installed else None)


def run_limited(cmd: list[str], seconds: float) -> tuple[str, bool]:
    """Run ``cmd`` in the repository root for at most ``seconds``; on time-out kill it and every
    process it started (the throughput workers hold the GPU). Returns (stdout so far, whether it
    timed out)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT
    )
    try:
        out, _ = proc.communicate(timeout=max(seconds, 1))
        return out, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return out, True


class Plan:
    def __init__(self, out: Path, deadline: float, min_left: float, run_limit: float):
        self.out, self.start = out, time.monotonic()
        self.deadline, self.min_left, self.run_limit = deadline, min_left, run_limit
        self.side: list[dict] = []
        self.ab: list[dict] = []
        self.profiles: list[dict] = []

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.start)

    def log(self, line: str) -> None:
        line = f"[{time.monotonic() - self.start:5.0f}s] {line}"
        print(line, flush=True)
        with open(self.out / "summary.md", "a") as fh:
            fh.write(line + "\n")

    def _measure(self, what: str, args: list[str]) -> list[dict]:
        left = self.left()
        if left < self.min_left:
            self.log(f"{what}: skipped, {left:.0f} s left")
            return []
        stdout, timed_out = run_limited([sys.executable, str(THROUGHPUT), "--graphs", "--iters", "3", *args],
                                        min(left, self.run_limit))  # fmt: skip
        recs = records_from(stdout)
        for rec in recs:
            self.log(f"{what} {table_row(rec)}")
        if timed_out:
            self.log(f"{what}: stopped at its time limit after {len(recs)} record(s)")
        elif not recs:
            self.log(f"{what}: no records; last output: {stdout.strip().splitlines()[-1:]}")
        return recs

    def run(self, step: Step) -> None:
        if step.kind == "side":
            sets = step.configs[0][1] if step.configs else []
            for model, px, _ in step.runs:
                args = ["--models", model, "--img-sizes", str(px), "--paths", *step.paths]
                recs = self._measure(f"[side {px}]", args + (["--set", *sets] if sets else []))
                if sets:  # the records say which settings the triton path ran with
                    recs = [dict(r, config=",".join(sets)) for r in recs]
                self.side += recs
                self._save("side.json", self.side)
                for r in _by_path("ratios").ratios(recs):
                    self.log(f"[side {px}] {ratio_line(r)}")
        elif step.kind == "ab":
            for model, px, batch in step.runs:
                for tag, sets in step.configs:
                    args = ["--models", model, "--img-sizes", str(px), "--paths", "triton"]
                    args += ["--batch", str(batch)] if batch else []
                    recs = self._measure(f"[ab {tag}]", args + (["--set", *sets] if sets else []))
                    self.ab += [dict(r, config=tag) for r in recs]
                    self._save("ab.json", self.ab)
        elif step.kind == "profile":
            for model, px, batch in step.runs:
                self._profile(model, px, step.paths[0], step.infer, batch)
        elif step.kind == "ncu":
            for model, px, batch in step.runs:
                self._ncu(model, px, step.k, batch)
        else:
            left = self.left()
            if left < self.min_left:
                self.log(f"[tests] skipped, {left:.0f} s left")
                return
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
            stdout, timed_out = run_limited(cmd + (["-k", step.k] if step.k else []), left)
            tail = stdout.strip().splitlines()[-15:]
            (self.out / "tests.txt").write_text("\n".join(tail) + "\n")
            last = tail[-1] if tail else "no output"
            if timed_out:  # with pytest's closing summary printed every test ran: only the exit was cut
                finished = PYTEST_SUMMARY.search(last)
                last = (
                    "killed at the deadline after its summary: " if finished else "stopped at the deadline: "
                ) + last
            self.log(f"[tests{' ' + shlex.quote(step.k) if step.k else ''}] {last}")

    def _profile(self, model: str, px: int, path: str, infer: bool, batch: int | None = None) -> None:
        what = f"[profile {model} {px} {path} {'inference' if infer else 'training'}]"
        left = self.left()
        if left < self.min_left:
            self.log(f"{what}: skipped, {left:.0f} s left")
            return
        batch = batch_for(px, batch)
        with tempfile.TemporaryDirectory() as tmp:  # (not in OUT, whose files all come back)
            table = Path(tmp) / "profile.json"
            cmd = [sys.executable, str(PROFILE), "--model", model, "--img", str(px), "--batch", str(batch),
                   "--path", path, "--out", str(table)] + (["--infer"] if infer else [])  # fmt: skip
            if not self._produce(what, cmd, min(left, self.run_limit), table, "profile"):
                return
            prof = dict(json.loads(table.read_text()), img_size=px, batch=batch)
        self.profiles.append(prof)
        self._save("profile.json", self.profiles)
        total = prof["total_ms"] or 1.0
        top = ", ".join(f"{k['name'][:40]} {k['ms_per_step']:.2f} ms ({100 * k['ms_per_step'] / total:.0f}%)"
                        for k in prof["kernels"][:5])  # fmt: skip
        self.log(
            f"{what} {prof['total_ms']:.1f} ms of kernels in a {prof['wall_ms']:.1f} ms step; top: {top}"
        )

    def _ncu(self, model: str, px: int, kernels: str, batch: int | None = None) -> None:
        what = f"[ncu {model} {px}]"
        ncu, left = find_ncu(), self.left()
        if ncu is None or left < self.min_left:
            self.log(f"{what}: skipped, {'no ncu found' if ncu is None else f'{left:.0f} s left'}")
            return
        with tempfile.TemporaryDirectory() as tmp:  # (the report stays here: large, binary)
            rep = Path(tmp) / "step"
            cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "-k", kernels, "--set", "full",
                   "-f", "-o", str(rep), sys.executable, str(NCU_STEP), "--model", model, "--img", str(px),
                   "--batch", str(batch_for(px, batch)), "--depth", "2"]  # fmt: skip
            report = rep.with_name("step.ncu-rep")
            if not self._produce(what, cmd, min(left, self.run_limit), report, "report"):
                return
            csv, _ = run_limited([ncu, "--import", str(report), "--page", "details", "--csv"], 120)
        name = f"ncu_{model}_{px}.csv.gz"
        (self.out / name).write_bytes(gzip.compress(csv.encode()))
        self.log(f"{what} {len(csv.splitlines())} lines of counters in {name}")
        table = _by_path("ncu_table")  # the counters the kernel notes use, per kernel
        try:
            means = table.kernel_means(table.parse_page(csv))
        except ValueError as err:
            self.log(f"{what} counters not summarised: {err}")
            return
        for kernel, m in means.items():
            self.log(f"{what} {table.kernel_line(kernel, m)}")

    def _produce(self, what: str, cmd: list[str], seconds: float, file: Path, noun: str) -> bool:
        """Run ``cmd`` (at most ``seconds``) for the ``file`` it writes; whether it wrote it (if not,
        the summary says why: the time limit, or the process's last line)."""
        stdout, timed_out = run_limited(cmd, seconds)
        if timed_out or not file.exists():
            last = stdout.strip().splitlines()[-1:]
            self.log(
                f"{what}: {'stopped at its time limit' if timed_out else f'no {noun}; last output: {last}'}"
            )
            return False
        return True

    def _save(self, name: str, records: list[dict]) -> None:
        (self.out / name).write_text(json.dumps(records, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="results folder ($OUT on the device)")
    ap.add_argument("steps", nargs="+", help="steps, each one quoted string, run in order")
    ap.add_argument("--deadline", type=float, default=560, help="seconds for all the steps (default 560)")
    ap.add_argument("--min-left", type=float, default=40, help="skip a measurement with fewer seconds left")
    ap.add_argument(
        "--run-limit", type=float, default=240, help="most seconds for one measurement or profile process"
    )
    args = ap.parse_args(argv)
    try:
        steps = [parse_step(s) for s in args.steps]  # all checked before the first one runs
    except ValueError as err:
        ap.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    plan = Plan(args.out, args.deadline, args.min_left, args.run_limit)
    try:
        smi = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        gpu = subprocess.run(smi, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpu = "unknown (nvidia-smi failed)"
    (args.out / "gpu.txt").write_text(gpu + "\n")
    plan.log(f"GPU: {gpu}")
    for step in steps:
        plan.run(step)
    plan.log("done")


if __name__ == "__main__":
    main()

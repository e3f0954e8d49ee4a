"""The ``triton`` kernel path on the CPU: its kernels run under Triton's interpreter against the
float64 pure-PyTorch core (outputs and every gradient), and the dispatch rules. The same parity
on a GPU is in ``test_gpu_triton.py``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vimssl.models import create_model
from vimssl.ssm import BACKENDS, resolve_backend
from vimssl.ssm.dispatch import auto_gpu_path

triton = pytest.importorskip("triton", reason="triton is installed with PyTorch on Linux")


def interpreter_report(claims: Path, parts: int = 2) -> dict:
    """The interpreter check's report, its checks shared among ``parts`` processes run at once (the
    interpreter runs on one core; each takes the next check no other took, by a file in
    ``claims``), merged: shapes in their order, the other checks by name."""
    script = Path(__file__).with_name("triton_interpreter_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).parents[1]))
    procs = [
        subprocess.Popen([sys.executable, str(script), "--claims", str(claims)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(parts)
    ]  # fmt: skip
    report = {"shapes": []}
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err[-3000:]
            part = json.loads(out.strip().splitlines()[-1])
            report["shapes"] += part.pop("shapes")
            assert not set(part) & set(report), "a check ran in two parts"
            report.update(part)
    finally:
        for proc in procs:
            proc.kill()
    report["shapes"].sort(key=lambda r: r["index"])
    return report


def test_kernels_match_reference_under_interpreter(tmp_path):
    report = interpreter_report(tmp_path)
    results = report["shapes"]
    assert [r["index"] for r in results] == list(range(20))
    # the scan backward's dB/dC sums by the lane reduce-scatter (the GPU's default) in the last two
    # checks (32-channel blocks, 16 states), chunked with the backward's own gradient carries and
    # unchunked; by per-state sums over the channel block in the others
    assert [set(r["rs"]) for r in results] == [{False}] * 18 + [{True}] * 2
    assert [(r["chunk"], r["wself"]) for r in results[18:]] == [([4, 12], True), (0, False)]
    assert sum(r["keep"] for r in results) == 2
    assert sum(not r["bc_in_conv"] for r in results) == 1  # the packed B/C kept from the forward
    assert sum(r["split"] for r in results) == 2  # the forward's branches in separate programs
    assert sum(not r["conv_walk"] for r in results) == 1  # the conv's tile kernels
    # the x_proj / dt_proj weight gradients cast in the conv backward's column-sum launch or apart
    assert {r["cast_in_colsum"] for r in results} == {False, True}
    assert {r["cast_in_colsum"] for r in results if not r["conv_walk"]} == {True}
    # the walks' B/C packing in the backward's recompute, by one channel block's programs or all
    assert {r["pack_spread"] for r in results if r["conv_walk"] and r["bc_in_conv"]} == {False, True}
    # the two-level scan: one length for both scans, or (forward, backward); with the forward's
    # states saved for the backward (SEQ_SAVE_CARRY) or computed by the backward itself
    chunked = [(r["chunk"], r["save_carry"]) for r in results if r["chunk"]]
    assert chunked == [(3, True), (4, True), (8, True), ([2, 4], True), ([3, 6], True), ([4, 12], True),
                       (4, False), ([4, 12], False), ([4, 12], True)]  # fmt: skip
    # with the states saved, the gradient carries from their own pass or from the scan backward's
    # first pass (SEQ_WSELF: no gradient pass ran)
    saved = [r for r in results if r["chunk"] and r["save_carry"]]
    assert {r["wself"] for r in saved} == {False, True}
    assert {r["ticket"] for r in saved if r["wself"]} == {False, True}
    for r in saved:
        assert ("scan_state_kernel_grad" in r["kernels"]) != r["wself"], r["shape"]
    # two runs with the same bits: the first two shapes, and a chunked shape of each kind (one
    # chunk length, (forward, backward) pairs, the backward's own states) whose second run walks
    # every chunk's carries
    twice = [r for r in results if r["deterministic"] is not None]
    assert [r["index"] for r in twice[:2]] == [0, 1] and not any(r["chunk"] for r in twice[:2])
    kinds = {(isinstance(r["chunk"], list), r["save_carry"]) for r in twice if r["chunk"]}
    assert kinds == {(False, True), (True, True), (False, False)}
    for r in results:
        assert r["finite"], r["shape"]
        assert r["deterministic"] is not False, r["shape"]
        for name, err in r["errors"].items():
            # float32 kernels against float64: gradients through exp/softplus chains land ~1e-6
            assert err < (1e-5 if name == "out" else 1e-4), (r["shape"], r["keep"], name, err)
    assert set(report["half"]) == {"torch.float16", "torch.bfloat16", "torch.bfloat16 split"}
    for key, r in report["half"].items():  # rounding of the inputs and stored intermediates
        dtype = key.split()[0]
        assert r["dtypes"] == [dtype, dtype]
        assert r["out"] < 2e-2 and r["xz"] < 5e-2, (key, r)
    cache = report["cache"]
    assert cache["cached"] and cache["first_vs_second"] > 1e-3, cache  # the changed D_b is seen
    assert cache["second_vs_grad_path"] == 0 and cache["inference_mode_vs_grad_path"] == 0, cache
    # the forward asks for a training step's chunk pair only when a backward will follow (SEQ_JOINT)
    assert cache["training"] == {"no_grad": [False, False], "grad": [True], "inference_mode": [False]}, cache
    norms = report["norm"]
    assert len(norms) == 4 and sum(r["drop"] for r in norms) == 1
    assert {r["dw_rows"] for r in norms} == {False, True}  # the weight gradient's two partial layouts
    for r in norms:
        for name, err in r["errors"].items():  # x's gradient is rounded to x's dtype
            assert err < (8e-3 if name == "d_x" and "bfloat16" in r["x_dtype"] else 1e-5), (r, name)
        # residual stream float32, every gradient in its input's dtype
        assert r["dtypes"][:4] == ["torch.float32"] * 4, r
        if r["x_dtype"] != "None":
            assert r["dtypes"][4] == r["x_dtype"], r
    # conv widths other than 4: token walks up to 4 taps, tile kernels above
    widths = report["conv_widths"]
    assert set(widths) == {"2", "3", "5"}
    assert all(r["error"] < 1e-4 for r in widths.values()), widths
    walks, tiles = (
        ["conv_bwd_walk_kernel", "conv_fwd_walk_kernel"],
        ["conv_bwd_dx_kernel", "conv_bwd_gp_kernel", "conv_fwd_kernel"],
    )
    assert [widths[k]["kernels"] for k in ("2", "3", "5")] == [walks, walks, tiles], widths
    # the conv forward walk's output and B/C packing do not depend on its span count (the GPU's
    # span rules pick it by SM count): one span per row against spans of 16, 5 and 3 tokens
    spans = report["conv_spans"]
    assert set(spans) == {"torch.float32", "torch.bfloat16"}
    for r in spans.values():
        assert r["same"] == [True] * 8 and r["packed"] and r["finite"], spans
    # out_proj inside the core's Function: the core's output kept, rebuilt by the scan backward
    # (forced, and by default with the forward's carries saved), out_proj frozen, and hooked (then
    # called as a module, so that its hook sees the core's output)
    core_out = report["core_out"]
    assert [(r["y_rebuild"], r["frozen"], r["hook"]) for r in core_out] == [
        (False, False, False), (True, False, False), (None, False, False), (True, True, False), (None, False, True),
    ]  # fmt: skip
    for r in core_out:
        assert set(r["errors"]) == {"out", "xz", "A_log"} | (set() if r["frozen"] else {"out_w"}), r
        assert all(err < 1e-5 for err in r["errors"].values()), r
        assert r["hook_seen"] == int(r["hook"]), r
    # drop path fused into the next norm (triton) against applied to the block output (torch)
    drop = report["drop"]
    assert drop["vs_no_drop"] > 1e-2, drop  # samples were dropped
    for name, err in drop["errors"].items():
        assert err < 1e-4, (name, err)


SASS_COUNTS = Path(__file__).parents[1] / "benchmarks" / "sass_counts.py"
needs_ptxas = pytest.mark.skipif(
    not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
    reason="this Triton has no CUDA backend with a bundled ptxas",
)


def run_sass_counts(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """benchmarks/sass_counts.py with ``args``, compiling (not interpreting) from this checkout."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(SASS_COUNTS), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@needs_ptxas
def test_every_kernel_compiles_for_the_h100(tmp_path):
    """The interpreter runs the kernels' Python, not Triton's code generation: compile every kernel
    of the path in every variant the launchers use for sm_90a (Triton's bundled ptxas; no GPU),
    which catches what only the compiler sees (inline PTX constraints, layouts, register limits)."""
    out = tmp_path / "counts.json"
    proc = run_sass_counts("--all", "--json", str(out), "--jobs", str(min(2, os.cpu_count() or 1)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(out.read_text())["kernels"]
    from vimssl.ssm import triton_kernels, triton_norm

    every = {  # a new kernel must be added to the script's list too
        name
        for mod in (triton_kernels, triton_norm)
        for name, obj in vars(mod).items()
        if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")
    }
    assert {r["kernel"] for r in kernels} == every
    for r in kernels:
        assert "error" not in r and 0 < r["registers"] <= 255 and r["total"] > 0, r
        if r["kernel"].startswith("scan_"):  # the token loops are found, with their exps
            assert any(lp["ops"].get("MUFU", 0) > 0 and lp["instructions"] > 100 for lp in r["loops"]), r


SASS_SNIPPET = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FMUL R2, R2, R3 ;
        /*0020*/                   MUFU.EX2 R2, R2 ;
.L_x_1:
        /*0030*/                   FFMA R4, R2, R4, R5 ;
        /*0040*/              @!P0 BRA `(.L_x_1) ;
        /*0050*/                   FMUL R2, R2, R4 ;
        /*0060*/               @P1 BRA `(.L_x_0) ;
        /*0070*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0080*/                   EXIT ;
"""


def test_sass_counts_finds_loop_bodies():
    # a branch back to a label above it closes a loop (the inner one inside the outer); a branch
    # forwards does not
    import importlib.util

    spec = importlib.util.spec_from_file_location("sass_counts", SASS_COUNTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    found = mod.loops(SASS_SNIPPET)
    assert [(lp["label"], lp["instructions"]) for lp in found] == [(".L_x_1", 2), (".L_x_0", 6)]
    assert found[1]["ops"] == {"FMUL": 2, "MUFU": 1, "FFMA": 1, "BRA": 2}


@pytest.mark.parametrize(
    "args, says",
    [
        (["--set", "NOPE=1"], "no constexpr 'NOPE'"),
        (["--set", "BE=wide"], "expected NAME=True, NAME=False or NAME=<integer>"),
        (["--all", "--set", "BE=32"], "not to --all"),
        (["--all", "--jobs", "0"], "--jobs 0: expected 1 or more"),
    ],
)
def test_sass_counts_names_a_bad_setting(args, says):
    proc = run_sass_counts(*args)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-2000:]


@needs_ptxas
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sass_counts_reports_a_kernel_that_fails_to_compile(jobs):
    # a non-power-of-two block fails in Triton's front end: reported with its traceback, the
    # other kernels still compiled, and a non-zero exit (in the worker processes too)
    proc = run_sass_counts("--kernel", "combine_kernel", "colsum_kernel", "--set", "BE=33", "--jobs", jobs)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "combine_kernel {'SAVE_SUM': True, 'BR': 16, 'BE': 33}: FAILED to compile" in proc.stderr
    assert "1 of 2 kernel variants compiled" in proc.stdout


def test_triton_is_a_backend_choice():
    assert "triton" in BACKENDS
    model = create_model("vim_test", backend="triton")
    assert model.backend == "triton"


def test_triton_backend_on_cpu_tensors_says_what_to_do():
    with pytest.raises(RuntimeError, match="backend='triton' needs tensors on a CUDA device"):
        resolve_backend("triton", torch.device("cpu"))
    model = create_model("vim_test", backend="triton")
    with pytest.raises(RuntimeError, match="CUDA device"):
        model(torch.randn(1, 3, 32, 32))


def test_auto_uses_the_reference_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_auto_on_gpu_prefers_triton_then_mamba_ssm_then_the_reference():
    # triton measured fastest at every shape, small batches of short sequences included (H200,
    # thirteenth session); a path that is not installed is never chosen
    assert auto_gpu_path(triton_ok=True, cuda_ok=True) == "triton"
    assert auto_gpu_path(triton_ok=True, cuda_ok=False) == "triton"
    assert auto_gpu_path(triton_ok=False, cuda_ok=True) == "cuda"
    assert auto_gpu_path(triton_ok=False, cuda_ok=False) == "torch"


def test_auto_does_not_probe_mamba_ssm_where_triton_runs(monkeypatch):
    from vimssl.ssm import dispatch

    def probe():
        raise AssertionError("mamba-ssm probed although triton runs")

    monkeypatch.setattr(dispatch, "triton_kernels_available", lambda device=None: True)
    monkeypatch.setattr(dispatch, "cuda_kernels_available", probe)
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setattr(dispatch, "triton_kernels_available", lambda device=None: False)
    monkeypatch.setattr(dispatch, "cuda_kernels_available", lambda: True)
    assert resolve_backend("auto", torch.device("cuda")) == "cuda"


def test_triton_path_runs_only_on_nvidia_gpus_of_compute_capability_8(monkeypatch):
    # ROCm builds of PyTorch report their AMD GPUs through torch.cuda too, with capabilities such
    # as (9, 4); the kernels are NVIDIA PTX, so auto must not take them there and a forced choice
    # must say why
    from vimssl.ssm import dispatch
    from vimssl.ssm import triton_core as tc

    monkeypatch.setattr(tc, "_available", tc._available.__wrapped__)  # (uncached: the process's answer stays)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    assert tc.available()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert not tc.available()
    # by the tensors' GPU, not the current one (a machine with an H100 and a T4)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: [(9, 0), (7, 5)][index or 0])
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    monkeypatch.setattr(dispatch, "cuda_kernels_available", lambda: True)
    assert resolve_backend("auto", torch.device("cuda", 1)) == "cuda"
    with pytest.raises(RuntimeError, match=r"compute capability 8.0 .*tensors are on cuda:1"):
        resolve_backend("triton", torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert not tc.available() and not dispatch.triton_kernels_available()
    with pytest.raises(RuntimeError, match="NVIDIA GPU.*not on ROCm"):
        resolve_backend("triton", torch.device("cuda"))
    monkeypatch.setattr(dispatch, "cuda_kernels_available", lambda: False)
    assert resolve_backend("auto", torch.device("cuda")) == "torch"


def test_host_arithmetic_matches_triton():
    # the launchers' cdiv / next power of two are plain Python: triton's are constexpr functions
    # that cost microseconds per host call
    from vimssl.ssm.dispatch import cdiv, next_pow2

    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 5000, 7) for b in range(1, 300, 3))
    assert all(next_pow2(n) == triton.next_power_of_2(n) for n in range(1, 70000))


def test_kernels_launch_on_the_inputs_gpu(monkeypatch):
    # Triton launches on the current CUDA device, whatever device the tensors are on: the entry
    # points make the inputs' GPU current first (a model on cuda:1 in a process on cuda:0), and
    # do nothing (no CUDA call) for CPU tensors or when the inputs' GPU is already current
    from types import SimpleNamespace

    from vimssl.layers.norm import RMSNorm
    from vimssl.models.mixer import BiMambaMixer
    from vimssl.ssm import dispatch
    from vimssl.ssm import triton_core as tc

    entered = []

    class Switch:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    def no_cuda():
        raise AssertionError("a CUDA call for CPU tensors")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    monkeypatch.setattr(torch.cuda, "device", Switch)
    with dispatch.on_device_of(torch.zeros(1)):
        pass
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for index in (1, 0, None):  # ("cuda" without an index is the current device)
        with dispatch.on_device_of(SimpleNamespace(device=torch.device("cuda", index))):
            pass
    assert entered == [1]

    # each entry point of the triton path enters the device of its input before any work
    class Entered(Exception):
        pass

    def record(t):
        raise Entered(t)

    def work(*args):
        raise AssertionError("work before the device switch")

    monkeypatch.setattr(tc, "on_device_of", record)
    monkeypatch.setattr(tc, "_check", work)
    m = BiMambaMixer(8, d_state=4)
    xz = torch.randn(2, 5, 2 * m.d_inner)
    for fn in (tc.bimamba_core_triton, tc.bimamba_core_out_triton):
        with pytest.raises(Entered) as err:
            fn(xz, m)
        assert err.value.args[0] is xz
    residual = torch.randn(2, 5, 8)
    with pytest.raises(Entered) as err:
        tc.add_rms_norm(None, residual, RMSNorm(8))
    assert err.value.args[0] is residual


def test_long_sequences_are_chunked_by_occupancy(monkeypatch):
    # the two-level scan's chunk length (launcher side, no GPU needed): chunk when the unchunked
    # scan has too few one-warp programs per SM, aim at SEQ_FILL's second number, chunks of at
    # least SEQ_MIN_CHUNK tokens; the shapes and picks of the H100 runs in docs/benchmarks.md
    from types import SimpleNamespace

    from vimssl.ssm import triton_core as tc

    def no_gpu(device):
        raise AssertionError("chunk_lengths asked the device for its SM count although sms was given")

    monkeypatch.setattr(tc, "sm_count", no_gpu)
    gpu = SimpleNamespace(device=torch.device("cuda", 0))

    def picks(batch, tokens, d_model, sms=132):
        return tc.chunk_lengths(gpu, batch, tokens, 2 * d_model, sms=sms)

    # Vim-S, Vim-T and Vim-B at 1024 px, batch 8: chunk lengths by the wave model, the backward's
    # a multiple of the forward's so that the forward can save the states its chunks start from.
    # In training the pair is picked together (SEQ_JOINT) where that models SEQ_JOINT_GAIN (1%)
    # less time: Vim-B 188 and 376 tokens (the backward's 11 chunks fill its waves: -1.8%, measured
    # +0.5% on the H100); Vim-T's joint pair models 0.5% less (measured -1.4%) and stays apart.
    # Inference keeps the forward's own pick
    assert (tc.SEQ_JOINT, tc.SEQ_JOINT_GAIN) == (True, 0.01)
    assert picks(8, 4097, 384) == (128, 384)
    assert picks(8, 4097, 192) == (128, 384)
    assert picks(8, 4097, 768) == (188, 376)
    assert tc.chunk_lengths(gpu, 8, 4097, 2 * 768, training=False, sms=132)[0] == 260
    assert picks(32, 1025, 192) == (132, 264)  # Vim-T 512 px, batch 32 (modelled -2.7%)
    monkeypatch.setattr(tc, "SEQ_JOINT_GAIN", 0.0)
    assert picks(8, 4097, 192) == (188, 376)
    assert tc.chunk_lengths(gpu, 8, 4097, 2 * 192, training=False, sms=132)[0] == 128
    # the joint pick models less time than the forward's own pick with the backward aligned to it
    programs = (8 * 1536 // tc.SEQ_BE_FWD, 2 * 8 * 1536 // tc.SEQ_BE_BWD)
    joint = tc._joint_chunks(4097, *programs, 132, (260, 520))
    assert joint == (188, 376)

    def modelled(f, b):
        return tc.SEQ_JOINT_FWD * tc._fwd_cost(4097, f, programs[0], 132) + tc._bwd_cost(
            4097, b, programs[1], 132
        )

    assert modelled(*joint) < modelled(260, 520) < modelled(344, 688)
    monkeypatch.setattr(tc, "SEQ_JOINT_FWD", 3.0)  # a forward weighted 3x keeps its own 260 tokens
    assert picks(8, 4097, 768)[0] == 260
    monkeypatch.setattr(tc, "SEQ_JOINT_FWD", 1.0)
    # ... and the pair picked apart stays unless the joint one models SEQ_JOINT_GAIN less time
    gain = 1 - modelled(*joint) / modelled(260, 520)  # (1.8%)
    monkeypatch.setattr(tc, "SEQ_JOINT_GAIN", gain + 0.001)
    assert picks(8, 4097, 768) == (260, 520)
    monkeypatch.setattr(tc, "SEQ_JOINT_GAIN", gain - 0.001)
    assert picks(8, 4097, 768) == (188, 376)
    monkeypatch.setattr(tc, "SEQ_JOINT_GAIN", 0.01)
    # without the joint pick (the v27 rule): the forward's own pick, the backward aligned to it
    monkeypatch.setattr(tc, "SEQ_JOINT", False)
    assert picks(8, 4097, 384) == (128, 384)
    assert picks(8, 4097, 192) == (128, 384)
    # Vim-B: 520 tokens model 0.03% more time than 260, within SEQ_ALIGN_TIE: the longer (measured
    # 0.5% faster on the H100, twenty-first session); the exact least without the tolerance
    assert picks(8, 4097, 768) == (260, 520)
    monkeypatch.setattr(tc, "SEQ_ALIGN_TIE", 0.0)
    assert picks(8, 4097, 768) == (260, 260)
    assert picks(8, 4097, 384) == (128, 384)  # (a clear least: no change)
    monkeypatch.setattr(tc, "SEQ_ALIGN_TIE", 0.001)
    # ... and the unaligned picks without that (v12)
    monkeypatch.setattr(tc, "SEQ_SAVE_CARRY", False)
    assert [picks(8, 4097, d) for d in (384, 192, 768)] == [(128, 376), (128, 376), (260, 372)]
    monkeypatch.setattr(tc, "SEQ_SAVE_CARRY", True)
    assert picks(32, 1025, 384) == (128, 1025)  # Vim-S 512 px: only the forward is chunked
    assert picks(128, 197, 192) == (197, 197)  # 224 px: too short to chunk
    assert picks(1, 255, 384) == (255, 255)
    for batch, tokens, d in [(8, 4097, 384), (2, 1025, 192), (1, 300, 64)]:
        for chunk in picks(batch, tokens, d):
            assert chunk % 4 == 0 or chunk == tokens
            assert tc.SEQ_MIN_CHUNK <= chunk <= tokens
    # without the wave model the chunks aim at SEQ_FILL's programs per SM (the v8-v11 picks), the
    # backward's rounded to the nearest multiple of the forward's
    monkeypatch.setattr(tc, "SEQ_WAVES", False)
    assert [picks(8, 4097, d) for d in (384, 192, 768)] == [(128, 256), (128, 128), (244, 488)]
    monkeypatch.setattr(tc, "SEQ_SAVE_CARRY", False)
    assert [picks(8, 4097, d) for d in (384, 192, 768)] == [(128, 244), (128, 128), (244, 456)]
    monkeypatch.setattr(tc, "SEQ_SAVE_CARRY", True)
    monkeypatch.setattr(tc, "SEQ_WAVES", True)
    # forced lengths (tests, sweeps), 0 never chunks, and CPU tensors are never chunked
    monkeypatch.setattr(tc, "SEQ_CHUNK", 12)
    assert tc._chunk_len(gpu, 50, 1, tc.SEQ_FILL_FWD) == 12
    assert tc._chunk_len(gpu, 7, 1, tc.SEQ_FILL_FWD) == 7
    monkeypatch.setattr(tc, "SEQ_CHUNK", 0)
    assert tc._chunk_len(gpu, 4097, 1, tc.SEQ_FILL_FWD) == 4097
    monkeypatch.setattr(tc, "SEQ_CHUNK", (128, 0))  # forward and backward forced separately
    assert picks(8, 4097, 384) == (128, 4097)
    monkeypatch.setattr(tc, "SEQ_CHUNK", None)
    assert tc._chunk_len(torch.empty(1), 4097, 1, tc.SEQ_FILL_FWD) == 4097


def test_conv_walk_spans_and_widths(monkeypatch):
    # the conv's token walks (launcher side, no GPU needed): spans for CONV_WALK_FILL programs per
    # SM of at least CONV_WALK_MIN_SPAN tokens (the spans of docs/kernel-notes.md, v20), one span
    # per row off the GPU, CONV_WALK_SPAN forcing it; tile kernels above four taps or when off
    from types import SimpleNamespace

    from vimssl.ssm import triton_core as tc

    monkeypatch.setattr(tc, "sm_count", lambda device: 132)
    gpu = SimpleNamespace(device=torch.device("cuda", 0))

    def spans(batch, tokens, d_model, fill=8, wave=None):
        span = tc._walk_span(gpu, batch, tokens, 2 * d_model, fill, wave)
        return span, -(-tokens // span)

    assert spans(128, 197, 384) == (99, 2)  # Vim-S 224 px, batch 128
    assert spans(128, 197, 192) == (66, 3)  # Vim-T
    assert spans(128, 197, 768) == (197, 1)  # Vim-B: one span per row fills the GPU
    assert spans(8, 4097, 384) == (187, 22)  # Vim-S 1024 px, batch 8
    assert spans(1, 40, 384) == (20, 2)  # short rows: spans of at least 16 tokens
    assert spans(1, 20, 384) == (20, 1)
    # CONV_WALK_WAVE (16 by default, for the forward walk): more spans where one wave of that
    # many programs per SM holds more; where even the fill's count would overflow it, the fill's
    # count (Vim-S, Vim-B at 224 px), not the 3 and 2 spans of a fill of 16 (the H200 kernel
    # sweep's slower picks)
    assert tc.CONV_WALK_WAVE == 16
    assert spans(8, 4097, 768) == (373, 11)  # Vim-B 1024 px: 1,056 programs, 8 per SM
    assert spans(8, 4097, 768, wave=16) == (187, 22) == spans(8, 4097, 768, fill=16)
    assert spans(8, 4097, 384, wave=16) == (94, 44)  # Vim-S 1024 px: 2,112 programs, one wave
    assert spans(128, 197, 384, wave=16) == (99, 2) != spans(128, 197, 384, fill=16)
    assert spans(128, 197, 768, wave=16) == (197, 1) != spans(128, 197, 768, fill=16)
    assert spans(128, 197, 192, wave=16) == (40, 5)  # Vim-T: 1,920 programs
    assert spans(1, 40, 384, wave=16) == (20, 2)  # (still at least 16 tokens)
    cpu = SimpleNamespace(device=torch.device("cpu"))
    assert tc._walk_span(cpu, 8, 4097, 768, 8) == 4097
    monkeypatch.setattr(tc, "CONV_WALK_SPAN", 5)
    assert tc._walk_span(gpu, 128, 197, 768, 8) == 5
    assert [tc._walks(torch.empty(6, k)) for k in (1, 2, 3, 4, 5)] == [True] * 4 + [False]
    monkeypatch.setattr(tc, "CONV_WALK", False)
    assert not tc._walks(torch.empty(6, 4))


def test_gradient_carry_pass_register_cap(monkeypatch):
    # the gradient carry pass runs under a register cap only when that saves a wave (the counts
    # of docs/kernel-notes.md, v21, on 132 SMs: 20 programs per SM uncapped, 32 capped)
    from types import SimpleNamespace

    from vimssl.ssm import triton_core as tc

    monkeypatch.setattr(tc, "sm_count", lambda device: 132)
    gpu = SimpleNamespace(device=torch.device("cuda", 0))

    def capped(batch, d_model, seqlen=4097):
        e = 2 * d_model
        chunk = tc.chunk_lengths(gpu, batch, seqlen, e)[1]
        return tc._grad_cap(gpu, batch * -(-e // tc.SEQ_BE_BWD), -(-seqlen // chunk))

    assert capped(8, 384)  # Vim-S 1024 px: 3,840 programs, one wave instead of two
    assert capped(8, 768)  # Vim-B: three waves instead of five
    assert not capped(8, 192)  # Vim-T: one wave either way
    assert tc._grad_cap(gpu, 192, 11) and not tc._grad_cap(gpu, 192, 2)  # 384 programs: one wave
    assert not tc._grad_cap(SimpleNamespace(device=torch.device("cpu")), 192, 11)
    monkeypatch.setattr(tc, "SEQ_GRAD_CAP", False)
    assert not capped(8, 384)
    monkeypatch.setattr(tc, "SEQ_GRAD_CAP", True)
    assert capped(8, 192)
    monkeypatch.setattr(tc, "SEQ_GRAD_CAP", None)
    monkeypatch.setattr(tc, "SEQ_GRAD_MAXNREG", None)
    assert not capped(8, 384)


def test_wave_model_of_the_chunked_backward(monkeypatch):
    from vimssl.ssm import triton_core as tc

    steps = tc.SEQ_PROGRAM_STEPS
    # 17 chunks of 384 programs on 1,056 slots: 16 full chunks are 6,144 programs, 5.8 waves; the
    # last, short chunk (193 tokens) fills the 192 idle slots of the sixth wave, the other 192
    # programs wait for it
    assert tc._makespan(4097, 244, 384, 1056) == 6 * (244 + steps) + (193 + steps)
    # 16 chunks of 256 and one of a single token: the same 6 waves, a shorter tail
    assert tc._makespan(4097, 256, 384, 1056) == 6 * (256 + steps) + (1 + steps)
    # whole waves, no short chunk; fewer programs than slots: one wave
    assert tc._makespan(4096, 256, 66, 1056) == 256 + steps
    assert tc._makespan(4096, 1024, 1056, 1056) == 4 * (1024 + steps)
    # 11 chunks of 376 (10 full + 337): 3,840 programs then 384 short ones in the idle slots
    assert tc._makespan(4097, 376, 384, 1056) == max(4 * (376 + steps), 3 * (376 + steps) + 337 + steps)
    # the pick: a multiple of 4, at least SEQ_MIN_CHUNK, and no worse than any other length
    slots, state_slots, weight = tc.SEQ_WAVE_BWD
    chunk = tc._wave_chunk(4097, 244, 384, slots * 132, 384, state_slots * 132, weight)
    assert chunk % 4 == 0 and tc.SEQ_MIN_CHUNK <= chunk < 4097

    def cost(c, programs=384, wave=tc.SEQ_WAVE_BWD, state_programs=384):
        slots, state_slots, weight = wave
        scan = tc._makespan(4097, c, programs, slots * 132)
        return scan + weight * tc._makespan(4097, c, state_programs, state_slots * 132)

    assert all(cost(chunk) <= cost(c) for c in range(tc.SEQ_MIN_CHUNK, 4097, 4))
    # ... which replaces the base pick only when it models SEQ_WAVE_GAIN less time: 376 models 10%
    # less than 244 (the base above), but under 5% less than 256
    assert chunk == 376 and cost(376) < 0.95 * cost(244) and cost(376) > 0.95 * cost(256)
    assert tc._wave_chunk(4097, 256, 384, slots * 132, 384, state_slots * 132, weight) == 256
    # the picks are cached, but not across the settings the model reads (sweeps change them)
    monkeypatch.setattr(tc, "SEQ_WAVE_GAIN", 0.5)
    assert tc._wave_chunk(4097, 244, 384, slots * 132, 384, state_slots * 132, weight) == 244
    monkeypatch.undo()
    # the v8 sweep's rankings at 1024 px, batch 8: Vim-S's backward (training minus inference time
    # of the core: 256 tokens 4.24 ms, 512 4.38, 244 4.44, 1,024 5.24) and forward (inference:
    # 128 1.011, 256 1.017, 512 1.448, 1,024 2.327), Vim-B's forward (256 1.92, 244 2.105, 1,024 2.85)
    assert cost(256) < cost(512) < cost(244) < cost(1024)

    def fwd(c, programs):
        return cost(c, programs, tc.SEQ_WAVE_FWD, 2 * programs)

    assert fwd(128, 96) < fwd(256, 96) < fwd(512, 96) < fwd(1024, 96)
    assert fwd(256, 192) < fwd(244, 192) < fwd(1024, 192)


def test_forward_scan_splits_its_branches_when_programs_are_few(monkeypatch):
    # launcher side, no GPU needed: the unchunked forward scan runs its two branches in separate
    # programs below SEQ_SPLIT_FILL programs per SM (programs: batch x E / 64); the H100 picks of
    # docs/benchmarks.md (v11)
    from types import SimpleNamespace

    from vimssl.ssm import triton_core as tc

    monkeypatch.setattr(tc, "sm_count", lambda device: 132)
    gpu = SimpleNamespace(device=torch.device("cuda", 0))
    assert tc._split(gpu, 128 * 384 // 64)  # Vim-T, 224 px, batch 128: 5.8 per SM
    assert tc._split(gpu, 32 * 768 // 64)  # Vim-S, batch 32
    assert not tc._split(gpu, 128 * 768 // 64)  # Vim-S, batch 128: 11.6 per SM
    assert not tc._split(gpu, 128 * 1536 // 64)  # Vim-B
    assert not tc._split(torch.empty(1), 1)  # CPU tensors: never, unless forced
    monkeypatch.setattr(tc, "SEQ_SPLIT", True)
    assert tc._split(torch.empty(1), 10**6)
    monkeypatch.setattr(tc, "SEQ_SPLIT", False)
    assert not tc._split(gpu, 1)


def test_mixer_resolves_auto_for_its_input_device_on_every_call(monkeypatch):
    # the choice follows the tensors (a model moved between devices picks again)
    from vimssl.models import mixer as mixer_mod

    seen = []

    def spy(backend, device):
        seen.append((backend, device.type))
        return "torch"

    monkeypatch.setattr(mixer_mod, "resolve_backend", spy)
    m = mixer_mod.BiMambaMixer(16, d_state=4)
    m(torch.randn(3, 11, 16))
    with torch.no_grad():
        m(torch.randn(2, 5, 16))
    assert seen == [("auto", "cpu"), ("auto", "cpu")]


def test_fused_norm_names_mismatched_shapes():
    from vimssl.layers.norm import RMSNorm
    from vimssl.ssm import triton_norm

    res = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"x \(2, 5, 6\) and residual \(2, 5, 8\)"):
        triton_norm.add_rms_norm(torch.randn(2, 5, 6), res, RMSNorm(8))
    with pytest.raises(ValueError, match=r"norm weight \(6,\) does not match the width 8"):
        triton_norm.add_rms_norm(None, res, RMSNorm(6))
    with pytest.raises(ValueError, match=r"drop mask \(3,\) must have one value per sample \(2\)"):
        triton_norm.add_rms_norm(torch.randn(2, 5, 8), res, RMSNorm(8), (torch.ones(3), 0.9))


def test_benchmark_settings_set_triton_core_constants_or_name_the_bad_one(monkeypatch):
    # throughput.py / triton_core.py --set NAME=VALUE: the A/B switch of the benchmarks
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from throughput import apply_settings

    from vimssl.ssm import triton_core as tc
    from vimssl.ssm import triton_norm as tn

    monkeypatch.setattr(tc, "SEQ_WAVES", tc.SEQ_WAVES)  # restored after the test
    monkeypatch.setattr(tc, "SEQ_FILL_BWD", tc.SEQ_FILL_BWD)
    monkeypatch.setattr(tn, "NORM_DW_ROWS", tn.NORM_DW_ROWS)
    assert apply_settings(["SEQ_WAVES=False", "SEQ_FILL_BWD=(8, 40)", "NORM_DW_ROWS=False"]) == {
        "SEQ_WAVES": False,
        "SEQ_FILL_BWD": (8, 40),
        "NORM_DW_ROWS": False,
    }
    assert tc.SEQ_WAVES is False and tc.SEQ_FILL_BWD == (8, 40)
    assert tn.NORM_DW_ROWS is False and not hasattr(tc, "NORM_DW_ROWS")  # set where it is read
    with pytest.raises(SystemExit, match="no setting 'SEQ_NOPE'"):
        apply_settings(["SEQ_NOPE=1"])
    with pytest.raises(SystemExit, match="SEQ_WAVES=maybe: expected NAME=VALUE"):
        apply_settings(["SEQ_WAVES=maybe"])


def test_benchmark_sweeps_restore_the_triton_core_constants(monkeypatch):
    # triton_core.py's sweeps set the constants per configuration with this, and a failing
    # configuration (out of resources) must not leave its settings behind
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from throughput import triton_settings

    from vimssl.ssm import triton_core as tc
    from vimssl.ssm import triton_norm as tn

    before = (tc.SEQ_BE_BWD, tc.CONV_BT, tn.NORM_DW_ROWS)
    with triton_settings(SEQ_BE_BWD=64, CONV_BT=16, NORM_DW_ROWS=not before[2]):
        assert (tc.SEQ_BE_BWD, tc.CONV_BT, tn.NORM_DW_ROWS) == (64, 16, not before[2])
    assert (tc.SEQ_BE_BWD, tc.CONV_BT, tn.NORM_DW_ROWS) == before
    with pytest.raises(RuntimeError, match="out of resources"):
        with triton_settings(SEQ_BE_BWD=128):
            raise RuntimeError("out of resources")
    assert tc.SEQ_BE_BWD == before[0]
    with pytest.raises(AttributeError, match="no setting 'SEQ_NOPE'"):
        with triton_settings(SEQ_NOPE=1, SEQ_BE_BWD=8):
            pass
    assert tc.SEQ_BE_BWD == before[0]  # nothing was set


def test_out_proj_enters_the_core_function_only_when_plain_and_rebuilding(monkeypatch):
    # launcher side, no kernels run: which route bimamba_core_out_triton takes. out_proj runs
    # inside the core's Function (which rebuilds the core's output instead of keeping it) only in
    # training, for a plain bias-free nn.Linear without hooks, where the rebuild applies
    # (Y_REBUILD, by default where the forward saves its carries); otherwise as a module
    from torch import nn

    from vimssl.models.mixer import BiMambaMixer
    from vimssl.ssm import triton_core as tc

    routes = []
    core_out = torch.zeros(2, 7, 16)

    def fake_core(xz, m):
        routes.append("module")
        return core_out

    def fake_apply(xz, d_state, chunks, out_w, *params):
        routes.append("function")
        assert out_w is m.out_proj.weight and len(params) == 14
        return torch.zeros(2, 7, 8)

    monkeypatch.setattr(tc, "bimamba_core_triton", fake_core)
    monkeypatch.setattr(tc.BiMambaCoreFn, "apply", fake_apply)
    m = BiMambaMixer(8, d_state=4)
    xz = torch.randn(2, 7, 2 * m.d_inner, requires_grad=True)

    def route(**settings):
        for name, value in settings.items():
            monkeypatch.setattr(tc, name, value)
        routes.clear()
        tc.bimamba_core_out_triton(xz, m)
        return routes[-1]

    assert route(Y_REBUILD=True) == "function"
    assert route(Y_REBUILD=False) == "module"
    # by default: where the forward saves its carries (both scans chunked, aligned)
    assert route(Y_REBUILD=None, SEQ_CHUNK=(2, 4)) == "function"
    assert route(SEQ_CHUNK=(2, 3)) == "module"  # not aligned: nothing saved
    assert route(SEQ_CHUNK=0) == "module"  # one chunk: nothing saved
    assert route(SEQ_CHUNK=(2, 4), SEQ_SAVE_CARRY=False) == "module"
    monkeypatch.setattr(tc, "SEQ_SAVE_CARRY", True)
    monkeypatch.setattr(tc, "Y_REBUILD", True)
    with torch.no_grad():
        assert route() == "module"  # inference
    handle = m.out_proj.register_forward_hook(lambda *args: None)
    assert route() == "module"  # a hook must see the core's output
    handle.remove()
    assert route() == "function"

    class Adapter(nn.Linear):  # e.g. an adapter wrapping out_proj
        pass

    m.out_proj = Adapter(m.d_inner, 8, bias=False)
    assert route() == "module"
    m.out_proj = nn.Linear(m.d_inner, 8, bias=True)
    assert route() == "module"


def test_scan_launchers_name_bad_carry_arguments():
    # launcher side, raised before any kernel runs: states saved for chunks that cannot take
    # them, carries of the wrong shape, and a y_out that is not (B, L, E) contiguous
    from vimssl.ssm import triton_core as tc

    bsz, seqlen, e, n = 2, 12, 4, 4
    xc, dt = torch.randn(bsz, seqlen, 2 * e), torch.randn(bsz, seqlen, 2 * e)
    bc, z = torch.randn(bsz, seqlen, 2, 2 * n), torch.randn(bsz, seqlen, e)
    At2, D, dtb = -torch.rand(n, 2 * e), torch.ones(2 * e), torch.zeros(2 * e)
    fwd_args = (xc, dt, bc, z, At2, D, dtb, True)
    with pytest.raises(ValueError, match=r"multiple of the forward's, got chunks \(4, 6\)"):
        tc.scan_fwd(*fwd_args, chunks=(4, 6), save_carry=True)
    with pytest.raises(ValueError, match=r"both scans chunked \(< 12 tokens\)"):
        tc.scan_fwd(*fwd_args, chunks=(4, 12), save_carry=True)
    dy, ysum, dz = torch.randn(bsz, seqlen, e), torch.randn(bsz, seqlen, e), torch.empty(bsz, seqlen, e)
    bwd_args = (xc, dt, bc, z, At2, D, dtb, dy, ysum, dz)
    with pytest.raises(ValueError, match=r"carries of shape \(2, 2, 4, 8\) for 3 chunks of 4 tokens"):
        tc.scan_bwd(*bwd_args, chunk=4, carries=torch.zeros(bsz, 2, n, 2 * e))
    with pytest.raises(
        ValueError, match=r"shape \(2, 12, 4\), got shape \(2, 12, 4\) with strides \(48, 1, 12\)"
    ):
        tc.scan_bwd(*bwd_args, chunk=4, y_out=torch.empty(bsz, e, seqlen).transpose(1, 2))


def test_half_linear_fn_writes_a_float32_weight_gradient():
    # in_proj / out_proj under autocast through HalfLinearFn (LINEAR_WGRAD_F32): the product in x's
    # dtype, as autocast's; the weight gradient float32. On the CPU its matmul falls back to a
    # half precision product cast to float32 (torch.mm's out_dtype is CUDA-only); the GPU test
    # checks the float32-output matmul
    from vimssl.ssm import triton_core as tc

    torch.manual_seed(0)
    w = torch.randn(12, 8, requires_grad=True)
    x = torch.randn(3, 5, 8).to(torch.bfloat16).requires_grad_()
    g = torch.randn(3, 5, 12).to(torch.bfloat16)
    out = tc.HalfLinearFn.apply(x, w)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x @ w.to(torch.bfloat16).t())
    out.backward(g)
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, g @ w.detach().to(torch.bfloat16))
    ref = g.double().reshape(-1, 12).t() @ x.detach().double().reshape(-1, 8)
    assert torch.allclose(w.grad.double(), ref, rtol=1e-2, atol=1e-2)


def test_linear_is_the_module_call_off_the_gpu(monkeypatch):
    from torch import nn

    from vimssl.ssm import triton_core as tc

    def no_apply(*args):
        raise AssertionError("HalfLinearFn used for CPU tensors")

    monkeypatch.setattr(tc.HalfLinearFn, "apply", no_apply)
    monkeypatch.setattr(tc, "LINEAR_WGRAD_F32", True)
    lin = nn.Linear(8, 4, bias=False)
    x = torch.randn(2, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tc.linear(x, lin), lin(x))


def test_colsum_names_casts_it_cannot_take():
    # launcher side, raised before the kernel runs
    from vimssl.ssm import triton_core as tc

    src = torch.zeros(2, 3, 4)
    for casts in [(torch.zeros(2, 3),), (torch.zeros(2, 3, 4).transpose(1, 2),), (torch.zeros(1, 1, 1),) * 3]:
        with pytest.raises(
            ValueError, match="up to two 3-D tensors with unit stride along the last dimension"
        ):
            tc.colsum(src, 1, casts)

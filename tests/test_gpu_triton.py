"""The ``triton`` kernel path on a GPU against the float64 pure-PyTorch reference: the fused mixer
core's output and the gradients of its input and every parameter (float32 and bf16, odd lengths,
batch 1, one token, 4,097 tokens, a non-power-of-two state size; the two-level scan of long
sequences), the whole model against the
``torch`` path, bit-for-bit determinism, every output element written, and the fused add + RMSNorm
between blocks (float32 and under bf16 autocast). Skipped without a GPU."""

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

from vimssl.models import create_model
from vimssl.models.mixer import BiMambaMixer
from vimssl.ssm.dispatch import triton_kernels_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and triton_kernels_available()),
        reason="needs a CUDA GPU (compute capability 8.0+) with triton",
    ),
]


@functools.cache
def _interpreter_check():
    """tests/triton_interpreter_check.py as a module (its helpers), by path."""
    path = Path(__file__).with_name("triton_interpreter_check.py")
    spec = importlib.util.spec_from_file_location("triton_interpreter_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if b.norm() == 0:  # an exactly-zero reference (dA for a single token) compares absolutely
        return (a - b).norm().item()
    return ((a - b).norm() / b.norm()).item()


def perturbed_mixer(d: int, n: int, seed: int) -> BiMambaMixer:
    torch.manual_seed(seed)
    m = BiMambaMixer(d, d_state=n).cuda()
    with torch.no_grad():  # off the init, so every parameter matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


# (batch, tokens, d_model, d_state)
SHAPES = [
    (1, 1, 64, 16),
    (2, 17, 96, 16),
    (3, 197, 192, 16),
    (1, 1025, 128, 16),
    (2, 4097, 32, 16),
    (5, 50, 96, 5),
]


# bf16 skips the single token: there every channel's dt gradient shares one factor, the sum over
# the states of B * C, which bf16 rounding of B and C can cancel to a few percent
CASES = [(s, torch.float32) for s in SHAPES] + [(s, torch.bfloat16) for s in SHAPES if s[1] > 1]


def core_errors(shape, dtype) -> tuple[float, dict]:
    """The fused core's output error and every gradient's error against the float64 reference."""
    from vimssl.ssm import triton_core

    bsz, seqlen, d, n = shape
    m = perturbed_mixer(d, n, seed=sum(shape))
    xz = torch.randn(bsz, seqlen, 2 * m.d_inner, device="cuda")
    names, params, ref, g, gref = _interpreter_check().core_reference(m, xz)

    xzt = xz.to(dtype).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = triton_core.bimamba_core_triton(xzt, m)
    assert out.dtype == dtype and out.shape == ref.shape
    grads = torch.autograd.grad(out, [xzt] + params, g.to(dtype))
    for name, a in zip(["xz"] + names, grads):
        assert torch.isfinite(a).all(), name
    return rel_err(out, ref), {name: rel_err(a, b) for name, a, b in zip(["xz"] + names, grads, gref)}


@pytest.mark.parametrize("shape,dtype", CASES)
def test_core_matches_float64_reference(shape, dtype):
    err_out, errs = core_errors(shape, dtype)
    tol_out, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 3e-2)
    assert err_out < tol_out
    bad = {name: e for name, e in errs.items() if not e < tol_grad}
    assert not bad, bad


# the x_proj / dt_proj weight-gradient casts in the conv backward's column-sum launch or by copies
# of their own (WGRAD_CAST_IN_COLSUM), both ways whatever the default
@pytest.mark.parametrize("cast_in_colsum", [False, True])
@pytest.mark.parametrize(
    "shape,dtype", [(s, d) for s in SHAPES[1:4] for d in (torch.float32, torch.bfloat16)]
)
def test_core_with_either_weight_gradient_cast_matches_float64_reference(
    monkeypatch, cast_in_colsum, shape, dtype
):
    from vimssl.ssm import triton_core as tc

    monkeypatch.setattr(tc, "WGRAD_CAST_IN_COLSUM", cast_in_colsum)
    err_out, errs = core_errors(shape, dtype)
    tol_grad = 1e-4 if dtype == torch.float32 else 3e-2
    bad = {name: e for name, e in errs.items() if not e < tol_grad}
    assert not bad, bad


# every scan variant at full program width (the shapes above are small batches, so the launchers
# narrow their programs); 160 inner channels leave a partial channel block
@pytest.mark.parametrize(
    "be,keep,rs", [(64, False, False), (64, True, False), (32, False, False), (32, True, False),
                   (32, False, True), (32, True, True), (16, False, False)],
)  # fmt: skip
def test_scan_variants_match_float64_reference(monkeypatch, be, keep, rs):
    from vimssl.ssm import triton_core as tc

    for k, v in dict(SEQ_BE_FWD=be, SEQ_BE_BWD=be, SEQ_KEEP=keep, SEQ_RS=rs, SEQ_NARROW=False).items():
        monkeypatch.setattr(tc, k, v)
    assert tc._rs(be, 16) == rs  # the lane reduce-scatter really runs where asked for
    err_out, errs = core_errors((3, 37, 80, 16), torch.float32)
    assert err_out < 1e-5
    bad = {name: e for name, e in errs.items() if not e < 1e-4}
    assert not bad, bad


# the conv as token walks (the default) at several widths and spans, and the tile kernels; 160
# inner channels leave a partial channel block, spans of 5 tokens a short last span
# (and the walks' B/C packing spread over every channel block's programs)
@pytest.mark.parametrize(
    "walk,be,span,spread",
    [(True, 64, None, False), (True, 128, 5, False), (True, 256, 16, False), (True, 128, 37, False),
     (True, 128, 5, True), (False, 128, None, False)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_variants_match_float64_reference(monkeypatch, walk, be, span, spread, dtype):
    from vimssl.ssm import triton_core as tc

    settings = dict(CONV_WALK=walk, CONV_WALK_BE=be, CONV_WALK_SPAN=span, CONV_PACK_SPREAD=spread, LAST={})
    for k, v in settings.items():
        monkeypatch.setattr(tc, k, v)
    err_out, errs = core_errors((3, 37, 80, 16), dtype)
    tol_out, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 3e-2)
    assert err_out < tol_out
    bad = {name: e for name, e in errs.items() if not e < tol_grad}
    assert not bad, bad
    walks = {"conv_fwd_walk_kernel", "conv_bwd_walk_kernel"}
    tiles = {"conv_fwd_kernel", "conv_bwd_gp_kernel", "conv_bwd_dx_kernel"}
    assert {k for k in tc.LAST if k.startswith("conv_")} == (walks if walk else tiles)


# the forward scan with its two branches in separate programs, then a combine kernel (what the
# launchers pick for few programs per SM), and not split: outputs, gradients and the saved branch sum
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_forward_matches_float64_reference(monkeypatch, split, dtype):
    from vimssl.ssm import triton_core as tc

    monkeypatch.setattr(tc, "SEQ_SPLIT", split)
    x = torch.empty(1, device="cuda")
    assert tc._split(x, 10**6) == split
    err_out, errs = core_errors((3, 37, 80, 16), dtype)
    tol_out, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 3e-2)
    assert err_out < tol_out
    bad = {name: e for name, e in errs.items() if not e < tol_grad}
    assert not bad, bad


# the two-level scan: forced chunk lengths at full program width (with the lane reduce-scatter at
# 32 channels), including a last chunk shorter than a 4-token group, and the launchers' own choice;
# (forward, backward) pairs whose backward chunks start from the states the forward saved
# (SEQ_SAVE_CARRY), and one whose backward computes them itself
@pytest.mark.parametrize(
    "chunk,shape,save",
    [(64, (3, 257, 80, 16), True), (12, (2, 50, 64, 5), True), (128, (1, 1025, 128, 16), True),
     (None, (1, 1025, 64, 16), True), ((64, 192), (3, 257, 80, 16), True), ((128, 384), (1, 1025, 128, 16), True),
     ((128, 384), (1, 1025, 128, 16), False)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_level_scan_matches_float64_reference(monkeypatch, chunk, shape, save, dtype):
    from vimssl.ssm import triton_core as tc

    monkeypatch.setattr(tc, "SEQ_CHUNK", chunk)
    monkeypatch.setattr(tc, "SEQ_NARROW", chunk is None)
    monkeypatch.setattr(tc, "SEQ_SAVE_CARRY", save)
    bsz, seqlen, d, _ = shape
    x = torch.empty(1, device="cuda")
    assert tc.chunk_lengths(x, bsz, seqlen, 2 * d)[0] < seqlen  # it really chunks
    err_out, errs = core_errors(shape, dtype)
    tol_out, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 3e-2)
    assert err_out < tol_out
    bad = {name: e for name, e in errs.items() if not e < tol_grad}
    assert not bad, bad


# the gradient carries with the forward's states saved (so the carry pass also sums delta): the
# pass with and without its register cap, and no pass (SEQ_WSELF: the scan backward's first pass
# publishes each chunk's carry, the chunks before it in gradient order wait for it; its programs
# take their chunks by program id or by ticket)
@pytest.mark.parametrize(
    "cap,wself,ticket", [(True, False, False), (False, False, False), (None, True, False), (None, True, True)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_carries_match_float64_reference(monkeypatch, cap, wself, ticket, dtype):
    from vimssl.ssm import triton_core as tc

    monkeypatch.setattr(tc, "SEQ_CHUNK", (64, 192))
    monkeypatch.setattr(tc, "SEQ_WSELF", wself)
    monkeypatch.setattr(tc, "SEQ_WSELF_TICKET", ticket)
    monkeypatch.setattr(tc, "SEQ_GRAD_CAP", cap)
    shape = (3, 257, 80, 16)
    assert tc.saves_carries(shape[1], tc.chunk_lengths(torch.empty(1, device="cuda"), 3, 257, 160))
    err_out, errs = core_errors(shape, dtype)
    tol_out, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 3e-2)
    assert err_out < tol_out
    bad = {name: e for name, e in errs.items() if not e < tol_grad}
    assert not bad, bad


# SEQ_WSELF at Vim-S's 1024 px training shape (11 backward chunks of 384 tokens, 4,224 programs:
# four waves, so programs wait on programs of earlier waves) and Vim-B's (the joint pick, 188 and
# 376 tokens: 11 backward chunks, 8,448 programs, 8 waves): the same gradients as with the
# gradient carry pass, run to run the same bits, by program id or by ticket
@pytest.mark.parametrize("d_model,chunks", [(384, (128, 384)), (768, (188, 376))])
def test_wself_matches_the_gradient_pass_at_full_scale(monkeypatch, d_model, chunks):
    from vimssl.ssm import triton_core as tc

    m = perturbed_mixer(d_model, 16, seed=3)
    xz = torch.randn(8, 4097, 2 * m.d_inner, device="cuda")
    g = torch.randn(8, 4097, m.d_inner, device="cuda")
    assert tc.chunk_lengths(xz, 8, 4097, m.d_inner) == chunks
    assert tc.saves_carries(4097, chunks)
    runs = []
    for wself, ticket in ((False, False), (True, False), (True, False), (True, True)):
        monkeypatch.setattr(tc, "SEQ_WSELF", wself)
        monkeypatch.setattr(tc, "SEQ_WSELF_TICKET", ticket)
        xzt = xz.clone().requires_grad_()
        out = tc.bimamba_core_triton(xzt, m)
        runs.append(
            torch.autograd.grad(
                out, [xzt] + list(m.parameters()), g, allow_unused=True, materialize_grads=True
            )
        )
    for name, a, b, c, d in zip(["xz"] + [n for n, _ in m.named_parameters()], *runs):
        assert rel_err(b, a) < 1e-5, name
        assert torch.equal(b, c) and torch.equal(b, d), name


@pytest.mark.parametrize("chunk", [0, 64])
def test_core_is_deterministic_and_writes_every_element(monkeypatch, chunk):
    from vimssl.ssm import triton_core

    monkeypatch.setattr(triton_core, "SEQ_CHUNK", chunk)
    m = perturbed_mixer(192, 16, seed=1)
    xz = torch.randn(4, 197, 2 * m.d_inner, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(4, 197, m.d_inner, device="cuda", dtype=torch.bfloat16)
    runs = []
    for poison in (float("nan"), 7.0):  # the caching allocator hands back the poisoned blocks
        torch.empty(64 * 2**20, device="cuda").fill_(poison)
        xzt = xz.clone().requires_grad_()
        out = triton_core.bimamba_core_triton(xzt, m)
        grads = torch.autograd.grad(
            out, [xzt] + list(m.parameters()), g, allow_unused=True, materialize_grads=True
        )
        assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
        runs.append((out, grads))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize(
    "name,img,batch",
    [("vim_test", 32, 4), ("vim_tiny_patch16_224", 224, 2), ("vim_tiny_patch16_224", (160, 96), 1)],
)
@pytest.mark.parametrize("amp", [False, True])
def test_model_matches_torch_path(name, img, batch, amp, model_parity):
    model_parity(name, img, batch, "triton", amp)


# the long-sequence training path at the model level: the forward's carries saved for the
# backward (a forced chunk pair), the gradient carries from their pass or from the scan backward
# (SEQ_WSELF), and out_proj's input rebuilt by the scan backward (Y_REBUILD)
@pytest.mark.parametrize("wself", [False, True])
@pytest.mark.parametrize("y_rebuild", [True, False])
@pytest.mark.parametrize("amp", [False, True])
def test_model_with_saved_carries_matches_torch_path(monkeypatch, wself, y_rebuild, amp, model_parity):
    from vimssl.ssm import triton_core as tc

    monkeypatch.setattr(tc, "SEQ_CHUNK", (8, 24))
    monkeypatch.setattr(tc, "SEQ_WSELF", wself)
    monkeypatch.setattr(tc, "Y_REBUILD", y_rebuild)
    model_parity("vim_tiny_patch16_224", 160, 2, "triton", amp)


def _half_linear_calls(monkeypatch) -> list:
    """A list that gets an entry for every HalfLinearFn call from now on (the test's monkeypatch)."""
    from vimssl.ssm import triton_core as tc

    used = []
    real_apply = tc.HalfLinearFn.apply
    monkeypatch.setattr(tc.HalfLinearFn, "apply", lambda *a: used.append(1) or real_apply(*a))
    return used


# the weight gradients of out_proj (inside the core's Function, or as a module) and in_proj written
# as float32 by their matmuls (OUT_WGRAD_F32, LINEAR_WGRAD_F32), at the model level under autocast
@pytest.mark.parametrize("inside", [True, False])
def test_model_with_float32_output_weight_gradients_matches_torch_path(monkeypatch, inside, model_parity):
    from vimssl.ssm import triton_core as tc

    monkeypatch.setattr(tc, "OUT_WGRAD_F32", True)
    monkeypatch.setattr(tc, "LINEAR_WGRAD_F32", True)
    monkeypatch.setattr(tc, "SEQ_CHUNK", (8, 24) if inside else 0)
    monkeypatch.setattr(tc, "Y_REBUILD", inside)
    used = _half_linear_calls(monkeypatch)
    model_parity("vim_tiny_patch16_224", 160, 2, "triton", True)
    assert used  # (in_proj, and out_proj where it runs as a module)


def test_masked_subset_of_tokens():
    # MAE hands the encoder an arbitrary-length subset of the tokens
    model = create_model("vim_tiny_patch16_224", backend="triton").cuda()
    x = torch.randn(3, 3, 224, 224, device="cuda")
    ids_keep = torch.rand(3, 196, device="cuda").argsort(1)[:, :49]
    out = model.forward_features(x, ids_keep=ids_keep)
    model.set_backend("torch")
    ref = model.forward_features(x, ids_keep=ids_keep)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-3


def test_auto_picks_triton_on_this_gpu():
    from vimssl.ssm import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    # and a model on auto runs end to end at a small and a large batch
    model = create_model("vim_test", backend="auto").cuda()
    for batch in (1, 64):
        assert torch.isfinite(model(torch.randn(batch, 3, 32, 32, device="cuda"))).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_model_on_a_gpu_that_is_not_current():
    # Triton launches on the current device: a model moved to cuda:1 while cuda:0 is current
    # must still run there (forward, backward and CUDA graphs), as the torch and cuda paths do
    from vimssl.models.graphs import CudaGraphed

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    model = create_model("vim_test", backend="triton").to(dev)
    x = torch.randn(4, 3, 32, 32, device=dev)
    before = torch.cuda.memory_allocated(0)
    out = model(x)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.cuda.memory_allocated(0) == before  # nothing went to the current GPU
    model.zero_grad()
    model.set_backend("torch")
    ref = model(x)
    ref.float().square().mean().backward()
    assert rel_err(out, ref) < 1e-3
    for n, p in model.named_parameters():
        assert rel_err(grads[n], p.grad) < 3e-3, n
    model.set_backend("triton")
    graphed = CudaGraphed(model, model, inference=True)
    with torch.no_grad():
        got = graphed(x)
    assert graphed.failed is None and len(graphed.graphs) == 1
    assert torch.cuda.current_device() == 0
    assert rel_err(got, ref) < 1e-3


@pytest.mark.parametrize("d", [192, 384, 1024, 1000])
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize(
    "dw_rows", [False, True]
)  # the weight gradient's partials (D, programs) or transposed
def test_fused_add_rms_norm_matches_float64(monkeypatch, d, amp, dw_rows):
    from vimssl.layers.norm import add_rms_norm as plain
    from vimssl.ssm import triton_norm

    monkeypatch.setattr(triton_norm, "NORM_DW_ROWS", dw_rows)

    torch.manual_seed(d)
    weight = 1 + 0.2 * torch.randn(d, device="cuda")
    res = torch.randn(3, 197, d, device="cuda")
    x = torch.randn(3, 197, d, device="cuda", dtype=torch.bfloat16 if amp else torch.float32)
    g_out, g_res = torch.randn_like(res), torch.randn_like(res)
    add_rms_norm_run = _interpreter_check().add_rms_norm_run  # the same harness as the CPU test
    ref = add_rms_norm_run(plain, torch.float64, weight, res, x, g_out, g_res)
    torch.empty(64 * 2**20, device="cuda").fill_(float("nan"))  # poison what the allocator hands back
    got = add_rms_norm_run(triton_norm.add_rms_norm, torch.float32, weight, res, x, g_out, g_res, amp=amp)
    # under autocast the normalised output comes out in bf16, like the next linear layer's input
    assert got[0].dtype == (torch.bfloat16 if amp else torch.float32) and got[1].dtype == torch.float32
    assert got[4].dtype == x.dtype
    # under autocast the output and its incoming gradient are bf16: bf16 rounding in all but the residual
    tol = [1e-2, 1e-6, 1e-2, 1e-2, 1e-2] if amp else [1e-5, 1e-6, 1e-5, 1e-5, 1e-5]
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    assert all(e < t for e, t in zip(errs, tol)), errs


def test_linear_wgrad_f32_matches_autocast_linear(monkeypatch):
    # LINEAR_WGRAD_F32: in_proj / out_proj through HalfLinearFn under autocast give autocast's
    # output, and a weight gradient written as float32 by its matmul: closer to float64 than
    # autocast's bf16 product cast to float32 (one rounding fewer)
    from vimssl.ssm import triton_core as tc

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 192, bias=False).cuda()
    x = torch.randn(4, 50, 96, device="cuda").to(torch.bfloat16)
    g = torch.randn(4, 50, 192, device="cuda").to(torch.bfloat16)
    dw_ref = g.double().reshape(-1, 192).t() @ x.double().reshape(-1, 96)

    def run(flag: bool):
        monkeypatch.setattr(tc, "LINEAR_WGRAD_F32", flag)
        lin.weight.grad = None
        xt = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = tc.linear(xt, lin)
        out.backward(g)
        return out, xt.grad, lin.weight.grad

    used = _half_linear_calls(monkeypatch)
    out0, dx0, dw0 = run(False)
    assert not used
    out1, dx1, dw1 = run(True)
    assert used and dw1.dtype == torch.float32
    assert rel_err(out1, out0) < 1e-6 and rel_err(dx1, dx0) < 1e-6
    assert rel_err(dw1, dw_ref) < 1e-5 < rel_err(dw0, dw_ref)

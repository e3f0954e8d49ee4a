"""Run by ``tests/test_ssm_triton.py`` in a subprocess with ``TRITON_INTERPRET=1`` (Triton's CPU
interpreter), because the interpreter must be switched on before the kernels are defined.

Prints one JSON object: the relative error of the fused core's output and of every gradient
against the float64 pure-PyTorch core, whether two runs gave identical bits, and whether every
output element was written.

``--claims DIR`` runs only the checks that no other process given the same folder has taken: a
process takes a check by creating its file there first (the test runs one process per core and
merges their reports, so a core that finishes its checks early takes more; each check seeds its
own random numbers, so its inputs do not depend on which process ran it). Each check's time goes
to stderr."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

from vimssl.models.mixer import BiMambaMixer, bimamba_core
from vimssl.ssm import triton_core as tc
from vimssl.ssm import triton_kernels as K
from vimssl.ssm import triton_norm as tn
from vimssl.ssm.dispatch import get_ops

# (batch, tokens, d_model, d_state): odd lengths, batch 1, one token, a non-power-of-two state,
# and lengths spanning several 4-token groups, tiles and channel blocks at the small sizes below
SHAPES = [(2, 7, 8, 4), (1, 1, 8, 4), (3, 13, 6, 3), (1, 37, 8, 16)]
# the scan backward that keeps its recomputed decays in registers, on two of them
KEEP_SHAPES = [(2, 7, 8, 4), (1, 37, 8, 16)]
# the two-level scan (chunk length in tokens): several chunks, a last chunk shorter than a
# 4-token group (7 = 3 + 3 + 1), and chunks that are not a multiple of 4
CHUNK_SHAPES = [((2, 7, 8, 4), 3), ((3, 13, 6, 3), 4), ((1, 37, 8, 16), 8)]
# the forward scan with its branches in separate programs and a combine kernel (SEQ_SPLIT)
SPLIT_SHAPES = [(2, 7, 8, 4), (1, 37, 8, 16)]
# the packed B/C kept from the forward instead of rebuilt in the backward's conv (BC_IN_CONV off)
BC_KEPT_SHAPES = [(3, 13, 6, 3)]
# the conv's tile kernels instead of its token walks (CONV_WALK off)
TILE_CONV_SHAPES = [(3, 13, 6, 3)]
# the two-level scan with (forward, backward) chunk lengths, the backward's a multiple of the
# forward's, so that the forward stores the states the backward's chunks start from
# (SEQ_SAVE_CARRY): a backward chunk of two and of three forward chunks, and a last backward chunk
# that ends inside the forward's last (37 tokens: 10 forward chunks, 4 backward ones)
PAIR_SHAPES = [((2, 7, 8, 4), (2, 4)), ((3, 13, 6, 3), (3, 6)), ((1, 37, 8, 16), (4, 12))]
# ... and the two-level scan whose backward computes the states itself (SEQ_SAVE_CARRY off)
OWN_STATE_SHAPES = [((3, 13, 6, 3), 4), ((1, 37, 8, 16), (4, 12))]
# the scan backward's dB/dC sums by the lane reduce-scatter (SEQ_RS: 32-channel programs and 16
# states, the GPU's default; its lanes are the block's channel columns here), with a (forward,
# backward) chunk pair whose backward sums its own gradient carries (SEQ_WSELF, even index), and
# unchunked; run with WIDE_TILES
RS_SHAPES = [((1, 21, 16, 16), (4, 12)), ((2, 9, 16, 16), 0)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def core_reference(m: BiMambaMixer, xz: torch.Tensor):
    """The float64 pure-PyTorch core of mixer ``m`` on ``xz``: (names of the core parameters, m's
    parameters in that order, the reference output, a random output gradient g, the reference
    gradients of xz and of each parameter for g)."""
    names = [k for k, _ in m.named_parameters() if not k.startswith(("in_proj", "out_proj"))]
    params = [dict(m.named_parameters())[k] for k in names]
    md = BiMambaMixer(m.d_model, d_state=m.d_state, d_conv=m.d_conv).to(xz.device).double()
    md.load_state_dict(m.state_dict())
    xzd = xz.double().requires_grad_()
    ref = bimamba_core(xzd, md, get_ops("torch"))
    g = torch.randn_like(ref)
    pd = [dict(md.named_parameters())[k] for k in names]
    gref = torch.autograd.grad(ref, [xzd] + pd, g, allow_unused=True, materialize_grads=True)
    return names, params, ref, g, gref


# launcher settings of the checks: small tiles and blocks give several programs, token tiles and
# channel blocks at the small sizes above; the whole-model checks take wide ones (the
# interpreter's time grows with the program count)
SMALL_TILES = dict(
    SEQ_BE_FWD=4, SEQ_BE_BWD=4, CONV_BT=4, CONV_BE=8, CONV_GP_BT=4, CONV_GP_BE=8, PREP_BE=8,
    PART_BT=4, COLSUM_BR=4, COLSUM_BW=8, COLSUM_BC=16, CONV_WALK_BE=8, CONV_PACK_BT=4,
)  # fmt: skip
WIDE_TILES = dict(
    SMALL_TILES, SEQ_BE_FWD=32, SEQ_BE_BWD=32, CONV_BE=32, CONV_GP_BE=32, PREP_BE=32, CONV_BT=16, CONV_GP_BT=16,
    CONV_WALK_BE=32,
)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--claims", type=Path, help="a folder shared with other processes: run the checks none took"
    )
    claims = ap.parse_args().claims
    tc.CARRY_FILL = float("nan")  # a look-back reading a carry no program wrote gives NaN
    # every check starts from the library's settings, triton_core's and triton_norm's (what an
    # earlier check switched is undone), with its tiles on top
    defaults = [(mod, name, value) for mod in (tc, tn) for name, value in vars(mod).items() if name.isupper()]
    # the last flag (twice): the core runs a second time and the bits are compared on the first two
    # shapes and on the first shape of each chunked group (see shape_check)
    runs_cfg = [(s, False, 0, False, True, True, True, k < 2) for k, s in enumerate(SHAPES)]
    runs_cfg += [(s, True, 0, False, True, True, True, False) for s in KEEP_SHAPES]
    runs_cfg += [(s, False, chunk, False, True, True, True, k == 0)
                 for group in (CHUNK_SHAPES, PAIR_SHAPES) for k, (s, chunk) in enumerate(group)]  # fmt: skip
    runs_cfg += [
        (s, False, chunk, False, True, False, True, k == 0) for k, (s, chunk) in enumerate(OWN_STATE_SHAPES)
    ]
    runs_cfg += [(s, False, 0, True, True, True, True, False) for s in SPLIT_SHAPES]
    runs_cfg += [(s, False, 0, False, False, True, True, False) for s in BC_KEPT_SHAPES]
    runs_cfg += [(s, False, 0, False, True, True, False, False) for s in TILE_CONV_SHAPES]
    tiles = [SMALL_TILES] * len(runs_cfg) + [WIDE_TILES] * len(RS_SHAPES)
    runs_cfg += [(s, False, chunk, False, True, True, True, False) for s, chunk in RS_SHAPES]
    checks = [
        (f"shape {k}", functools.partial(shape_check, k, *cfg), tiles[k]) for k, cfg in enumerate(runs_cfg)
    ]
    checks += [
        ("half", half_precision, SMALL_TILES), ("norm", norm_errors, SMALL_TILES),
        ("cache", inference_cache, SMALL_TILES), ("conv_widths", conv_widths, SMALL_TILES),
        ("conv_spans", conv_spans, SMALL_TILES),
        ("drop", drop_path_model, WIDE_TILES), ("core_out", core_out, WIDE_TILES),
    ]  # fmt: skip
    # the checks other than shapes first (the longest among them, a quarter of the time), so that
    # processes sharing the checks end at about the same time; each seeded by its place above
    order = sorted(range(len(checks)), key=lambda k: (checks[k][0].startswith("shape"), -k))
    report = {"shapes": []}
    for k in order:
        name, check, tiles = checks[k]
        if claims is not None and not claim(claims / name.replace(" ", "_")):
            continue
        for mod, setting, value in defaults:
            setattr(mod, setting, value)
        for setting, value in tiles.items():
            setattr(tc, setting, value)
        torch.manual_seed(k)
        start = time.perf_counter()
        result = check()
        print(f"[check] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        if name.startswith("shape"):
            report["shapes"].append(result)
        else:
            report[name] = result
    print(json.dumps(report))


def claim(path: Path) -> bool:
    """Whether this process took the check whose claim file is ``path`` (created now, by this
    process and no other)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def shape_check(index, shape, keep, chunk, split, bc_in_conv, save_carry, conv_walk, twice) -> dict:
    """The fused core against the float64 reference at one shape and launcher setting: relative
    errors of the output and every gradient, whether two runs gave the same bits (with ``twice``;
    None for one run), and whether every output was finite (written)."""
    bsz, seqlen, d, n = shape
    tc.SEQ_KEEP, tc.SEQ_CHUNK, tc.SEQ_SPLIT, tc.BC_IN_CONV = keep, chunk, split, bc_in_conv
    tc.SEQ_SAVE_CARRY = save_carry
    tc.CONV_GP_SPLIT = 3 if chunk else 1  # the conv backward's token walk in spans, too
    # the conv's token walks (or its tiles), in spans of 5 tokens (halos across spans) where the
    # scan is not chunked (the interpreter's time grows with the walks' programs)
    tc.CONV_WALK, tc.CONV_WALK_SPAN = conv_walk, None if chunk else 5
    # the backward's B/C packing by the first channel block's walks, or spread over every block's
    # (CONV_PACK_SPREAD), in alternate checks
    tc.CONV_PACK_SPREAD = index % 2 == 1
    # with the forward's states saved: the gradient carries from a carry pass, or from the scan
    # backward's first pass with waits on flags (SEQ_WSELF), in alternate checks
    tc.SEQ_WSELF = index % 2 == 0
    tc.SEQ_WSELF_TICKET = index % 4 == 2  # ... its programs in gradient order by ticket or by id
    # the x_proj / dt_proj weight gradients cast by the conv backward's column-sum launch, or by
    # copies of their own, in a third of the checks (not the tile conv's, whose launch differs)
    tc.WGRAD_CAST_IN_COLSUM = index % 3 != 1 or not conv_walk
    m = BiMambaMixer(d, d_state=n)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    xz = torch.randn(bsz, seqlen, 2 * m.d_inner)
    names, params, ref, g, gref = core_reference(m, xz)

    tc.LAST.clear()  # which kernels ran
    rs = []  # ... and whether the scan backward took the lane reduce-scatter
    launch = K.scan_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                rs.append(kwargs["RS"])
                return launch[grid](*args, **kwargs)

            return run

    K.scan_bwd_kernel = Spy()
    try:
        runs = run_core(m, xz, g, params, chunk, twice)
    finally:
        K.scan_bwd_kernel = launch
    out, grads = runs[0]
    same = None  # (one run)
    if twice:
        out2, grads2 = runs[1]
        same = torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    errs = {"out": rel(out, ref)}
    errs.update({name: rel(a, b) for name, a, b in zip(["xz"] + names, grads, gref)})
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(t).all()) for t in grads)
    return dict(
        index=index, shape=[bsz, seqlen, d, n], keep=keep, chunk=chunk, split=split,
        bc_in_conv=bc_in_conv, save_carry=save_carry, conv_walk=conv_walk, pack_spread=tc.CONV_PACK_SPREAD,
        wself=tc.SEQ_WSELF, ticket=tc.SEQ_WSELF_TICKET, rs=rs, cast_in_colsum=tc.WGRAD_CAST_IN_COLSUM, kernels=sorted(tc.LAST), errors=errs, deterministic=same, finite=finite,
    )  # fmt: skip


def run_core(m, xz, g, params, chunk, twice) -> list:
    """The fused core's output and gradients of xz and params under cotangent g, once or (twice)
    two times."""
    # twice: chunked, the second run walks every chunk's carries (SEQ_SKIP_UNREAD off), which must
    # give the same bits as skipping the unread ones; unchunked, it only checks that two runs
    # agree, which the interpreter (programs one after another) makes all but certain, so only
    # for buffers read before they are written (the GPU test of determinism is
    # test_gpu_triton.py's)
    runs = []
    for k in range(2 if twice else 1):
        tc.SEQ_SKIP_UNREAD = not (chunk and k == 1)
        xzt = xz.clone().requires_grad_()
        out = tc.bimamba_core_triton(xzt, m)
        grads = torch.autograd.grad(out, [xzt] + params, g.float())
        runs.append((out, grads))
    return runs


def half_precision() -> dict:
    """Half-precision inputs (fp16, bf16, and bf16 with the forward split by branch): the output
    and the input gradient come out in the input dtype, within rounding of the float64 core."""
    half = {}
    m = BiMambaMixer(8, d_state=4)
    xz = torch.randn(2, 9, 2 * m.d_inner)
    md = BiMambaMixer(8, d_state=4).double()
    md.load_state_dict(m.state_dict())
    xzd = xz.double().requires_grad_()
    ref = bimamba_core(xzd, md, get_ops("torch"))
    g = torch.randn_like(ref)
    (gref,) = torch.autograd.grad(ref, [xzd], g)
    for dtype, split in ((torch.float16, None), (torch.bfloat16, None), (torch.bfloat16, True)):
        tc.SEQ_SPLIT = split
        xzt = xz.to(dtype).requires_grad_()
        out = tc.bimamba_core_triton(xzt, m)
        (gx,) = torch.autograd.grad(out, [xzt], g.to(dtype))
        key = str(dtype) + (" split" if split else "")
        half[key] = dict(dtypes=[str(out.dtype), str(gx.dtype)], out=rel(out, ref), xz=rel(gx, gref))
    return half


def core_out() -> list[dict]:
    """out_proj inside the core's Function (:func:`tc.bimamba_core_out_triton`): the output and
    the gradients of xz, out_proj's weight and A_log against float64 out_proj(core(xz)), with the
    core's output kept, rebuilt by the scan backward (Y_REBUILD True, and by default when the
    forward saved its carries, a chunk pair), with a frozen out_proj, and with a hooked out_proj
    (called as a module: the hook must see the core's output)."""
    out = []
    for y_rebuild, chunk, frozen, hook in [
        (False, 0, False, False), (True, 0, False, False), (None, (3, 6), False, False),
        (True, 0, True, False), (None, 0, False, True),
    ]:  # fmt: skip
        tc.Y_REBUILD, tc.SEQ_CHUNK = y_rebuild, chunk
        torch.manual_seed(5)
        m = BiMambaMixer(8, d_state=4)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        m.out_proj.weight.requires_grad_(not frozen)
        seen = []
        handle = (
            m.out_proj.register_forward_hook(lambda mod, i, o, seen=seen: seen.append(i[0].shape))
            if hook
            else None
        )
        xz = torch.randn(3, 13, 2 * m.d_inner)
        md = BiMambaMixer(8, d_state=4).double()
        md.load_state_dict(m.state_dict())
        xzd = xz.double().requires_grad_()
        ref = md.out_proj(bimamba_core(xzd, md, get_ops("torch")))
        g = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, [xzd, md.out_proj.weight, md.A_log], g)
        xzt = xz.clone().requires_grad_()
        o = tc.bimamba_core_out_triton(xzt, m)
        wants = [xzt, m.A_log] + ([] if frozen else [m.out_proj.weight])
        grads = dict(zip(["xz", "A_log", "out_w"], torch.autograd.grad(o, wants, g.float())))
        refs = dict(zip(["xz", "out_w", "A_log"], ref_grads))
        errs = {"out": rel(o, ref)} | {k: rel(v, refs[k]) for k, v in grads.items()}
        if handle is not None:
            handle.remove()
        out.append(
            dict(y_rebuild=y_rebuild, chunk=chunk, frozen=frozen, hook=hook, errors=errs, hook_seen=len(seen))
        )
    return out


def conv_widths() -> dict:
    """Conv widths other than Vim's 4 (up to 4 taps the token walks, with zero taps in front;
    above, the tile kernels): per width the largest relative error of the output and every
    gradient against float64, and the conv kernels that ran."""
    out = {}
    tc.CONV_WALK_SPAN = 4
    for k in (2, 3, 5):
        tc.LAST = {}
        torch.manual_seed(k)
        m = BiMambaMixer(8, d_state=4, d_conv=k)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        xz = torch.randn(1, 11, 2 * m.d_inner)
        names, params, ref, g, gref = core_reference(m, xz)
        xzt = xz.clone().requires_grad_()
        o = tc.bimamba_core_triton(xzt, m)
        grads = torch.autograd.grad(o, [xzt] + params, g.float())
        err = max([rel(o, ref)] + [rel(a, b) for a, b in zip(grads, gref)])
        out[str(k)] = dict(error=err, kernels=sorted(n for n in tc.LAST if n.startswith("conv_")))
    return out


def conv_spans() -> dict:
    """The conv forward walk with the B/C packing (both packings: SPREAD off and on) at forced
    spans of 23 (one per row), 16, 5 and 3 tokens, float32 and bf16, one batch row (rows are
    independent programs): whether its output and the packed B/C have the same bits as with one
    span per row (the span count is a launch choice that the GPU's span rules, CONV_WALK_FILL and
    CONV_WALK_WAVE, make), and whether the packing is :func:`tc._bc_pack`'s."""
    torch.manual_seed(23)
    bsz, seqlen, e, n, r = 1, 23, 12, 4, 3
    p = r + 2 * n
    w, b = torch.randn(2 * e, 4), torch.randn(2 * e)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        xz = torch.randn(bsz, seqlen, 2 * e).to(dtype)
        x = xz[..., :e]  # channel stride 1, row stride 2E, as the core passes it
        dbc = torch.randn(bsz * seqlen, 2 * p).to(dtype)
        runs = []
        for spread in (False, True):
            for span in (seqlen, 16, 5, 3):
                tc.CONV_WALK_SPAN, tc.CONV_PACK_SPREAD = span, spread
                y = torch.full((bsz, seqlen, 2 * e), float("nan"), dtype=dtype)
                bc = torch.full((bsz, seqlen, 2, 2 * n), float("nan"))
                tc.conv_fwd(x, w, b, y, (dbc, r, bc))
                runs.append((y, bc))
        y0, bc0 = runs[0]
        out[str(dtype)] = dict(
            same=[torch.equal(y, y0) and torch.equal(bc, bc0) for y, bc in runs],
            packed=torch.equal(bc0, tc._bc_pack(dbc.view(bsz, seqlen, 2, p), r)),
            finite=bool(torch.isfinite(y0).all()),
        )
    return out


def drop_path_model() -> dict:
    """A small Vim in training mode with drop path, triton path (drop path fused into the next
    norm) against the torch path (applied to the block output), from the same random draws:
    relative errors of the output and of every parameter gradient; and how far the output is
    from the same model without drop path (so that samples were in fact dropped)."""
    import vimssl.models.blocks as blocks
    import vimssl.models.mixer as mixer
    from vimssl.models import create_model

    # the interpreter runs the kernels on CPU tensors, which the dispatcher refuses for 'triton'
    blocks.resolve_backend = mixer.resolve_backend = lambda backend, device: backend
    torch.manual_seed(0)
    model = create_model("vim_test", img_size=16, embed_dim=16, depth=2, drop_path_rate=0.8, backend="torch")
    model.train()
    x = torch.randn(4, 3, 16, 16)

    def run(backend: str, rate: float | None = None):
        model.set_backend(backend)
        if rate is not None:
            for blk in model.layers:
                blk.drop_path.p = rate
        torch.manual_seed(1)
        out = model(x)
        return out, torch.autograd.grad(out.square().sum(), list(model.parameters()))

    ref, gref = run("torch")
    out, grads = run("triton")
    errors = {"out": rel(out, ref)}
    errors.update({n: rel(a, b) for (n, _), a, b in zip(model.named_parameters(), grads, gref)})
    undropped, _ = run("torch", 0.0)
    return dict(errors=errors, vs_no_drop=rel(undropped, ref))


def inference_cache() -> dict:
    """Without gradients the core takes its derived weights from a cache on the mixer: the same
    output as the autograd path, and a changed parameter is seen on the next call."""
    m = BiMambaMixer(8, d_state=4)
    xz = torch.randn(2, 9, 2 * m.d_inner)
    # what each call asks chunk_lengths for: a training step's chunk pair or the forward's own
    asked = {"no_grad": [], "grad": [], "inference_mode": []}
    phase, real = "no_grad", tc.chunk_lengths

    def spy(x, bsz, seqlen, e, training=True, **kw):
        asked[phase].append(training)
        return real(x, bsz, seqlen, e, training, **kw)

    tc.chunk_lengths = spy
    try:
        with torch.no_grad():
            first = tc.bimamba_core_triton(xz, m)
            cached = "_triton_weights" in m.__dict__
            m.D_b.add_(1.0)  # in place, as an optimizer step or load_state_dict would
            second = tc.bimamba_core_triton(xz, m)
        phase = "grad"
        grad_path = tc.bimamba_core_triton(xz.clone().requires_grad_(), m)
        phase = "inference_mode"
        with torch.inference_mode():
            third = tc.bimamba_core_triton(xz, m)
    finally:
        tc.chunk_lengths = real
    return dict(
        cached=cached,
        first_vs_second=rel(first, second),
        second_vs_grad_path=rel(second, grad_path.detach()),
        inference_mode_vs_grad_path=rel(third, grad_path.detach()),
        training=asked,
    )


def add_rms_norm_run(fn, dtype, weight, res, x, g_out, g_res, amp=False, drop=None) -> list[torch.Tensor]:
    """``fn`` (an add_rms_norm) with the residual and norm weight in ``dtype`` and x in its own
    dtype (in float64 for a float64 run; x may be None), optionally under bf16 autocast; returns
    [normed, residual, d_residual, d_weight(, d_x)] for the loss sum(normed * g_out) +
    sum(residual * g_res) (g_res None: no gradient into the returned residual); ``drop``: a
    drop-path draw applied to x."""
    from vimssl.layers.norm import RMSNorm

    nd = RMSNorm(weight.shape[0]).to(device=weight.device, dtype=dtype)
    with torch.no_grad():
        nd.weight.copy_(weight)
    r = res.to(dtype).requires_grad_()
    xx = None if x is None else x.to(dtype if dtype == torch.float64 else x.dtype).requires_grad_()
    with torch.autocast(res.device.type, dtype=torch.bfloat16, enabled=amp):
        o, ro = fn(xx, r, nd, drop)
    loss = (o.to(dtype) * g_out.to(dtype)).sum()
    if g_res is not None:
        loss = loss + (ro.to(dtype) * g_res.to(dtype)).sum()
    return [o, ro, *torch.autograd.grad(loss, [r, nd.weight] + ([xx] if x is not None else []))]


def norm_errors() -> list[dict]:
    """The fused add + RMSNorm against the plain float64 version: with and without x, a width
    that is not a power of two, several row tiles (with a partial last one), bf16 x (as under
    autocast; the reference sums its rounded values), and with and without a gradient flowing
    into the returned residual, and with a drop-path draw (one sample dropped, one kept and
    rescaled)."""
    from vimssl.layers.norm import add_rms_norm as plain

    out = []
    for rows, d, x_dtype, d_res, drop in [
        (37, 24, torch.float32, True, None),
        (5, 48, None, True, None),
        (70, 24, torch.bfloat16, False, None),
        (37, 24, torch.float32, True, (torch.tensor([0.0, 1.0]), 0.7)),
    ]:
        weight = 1 + 0.2 * torch.randn(d)
        res = torch.randn(2, rows, d)
        x = None if x_dtype is None else torch.randn(2, rows, d).to(x_dtype)
        g_out, g_res = torch.randn(2, rows, d), torch.randn(2, rows, d) if d_res else None
        ref = add_rms_norm_run(plain, torch.float64, weight, res, x, g_out, g_res, drop=drop)
        # the weight gradient's partials (D, programs) summed along rows, or (programs, D) down columns
        tn.NORM_DW_ROWS = len(out) % 2 == 0
        got = add_rms_norm_run(tn.add_rms_norm, torch.float32, weight, res, x, g_out, g_res, drop=drop)
        names = ["out", "residual", "d_residual", "d_weight", "d_x"]
        out.append(dict(rows=rows, d=d, x_dtype=str(x_dtype), drop=drop is not None, dw_rows=tn.NORM_DW_ROWS,
                        dtypes=[str(t.dtype) for t in got], errors={k: rel(a, b) for k, a, b in zip(names, got, ref)}))  # fmt: skip
    return out


if __name__ == "__main__":
    main()

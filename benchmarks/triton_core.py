"""Mixer-core microbenchmark of the ``triton`` path against the composed ``cuda`` path (one GPU).

    python benchmarks/triton_core.py --parity --sweep --out $OUT/core.json

* ``--parity``: the fused core against the float64 reference (outputs and every gradient) on a
  few shapes, printed as relative errors.
* per-kernel times (median, CUDA events via ``triton.testing.do_bench``) at the Vim-S training
  shape (B 128, L 197, E 768, N 16), forward and forward+backward of the whole core for both
  paths, with the floors: bytes the core must move over the measured copy bandwidth, and the
  exp count over the special-function rate.
* ``--sweep``: channels per scan program and warps; the conv tile. ``--conv``: the conv
  backward's first kernel (tile, warps, token spans per batch row).
* ``--conv-fwd`` (alone, or with ``--narrow``): the conv forward's tile at several shapes.
* ``--conv-walk`` (likewise): the conv as token walks (channels, warps, spans) against the tile
  kernels, forward and backward, at the same shapes.
* ``--narrow`` (alone): the scan kernels' time by how their programs are laid out (channels per
  program, the forward's branches split or not), at several shapes.
* ``--chunks sweep`` (alone): the two-level scan's chunk length at long and short sequences,
  whole core, inference and training, against the cuda path; ``--chunks small``: the launchers'
  choice against the cuda path at small batches (where ``auto`` has to choose); ``--chunks long``:
  the 1024 px shapes only, the launchers' choice and chunks of 256 and 128.
"""

from __future__ import annotations

import argparse
import json

import torch
from throughput import apply_settings, triton_settings
from triton.testing import do_bench

from vimssl.models.mixer import BiMambaMixer, bimamba_core
from vimssl.ssm import triton_core as tc
from vimssl.ssm.dispatch import get_ops


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def mixer(d, n=16, seed=0):
    torch.manual_seed(seed)
    m = BiMambaMixer(d, d_state=n).cuda()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def parity() -> list[dict]:
    rows = []
    for bsz, seqlen, d, dtype in [(1, 1, 64, torch.float32), (3, 197, 192, torch.float32),
                                  (2, 197, 384, torch.bfloat16), (1, 1025, 128, torch.bfloat16),
                                  (2, 4097, 64, torch.float32), (5, 50, 96, torch.bfloat16)]:  # fmt: skip
        m = mixer(d)
        xz = torch.randn(bsz, seqlen, 2 * m.d_inner, device="cuda")
        params = [xz] + list(m.parameters())
        md = mixer(d).double()
        md.load_state_dict(m.state_dict())
        xzd = xz.double().requires_grad_()
        ref = bimamba_core(xzd, md, get_ops("torch"))
        g = torch.randn_like(ref)
        gref = torch.autograd.grad(
            ref, [xzd] + list(md.parameters()), g, allow_unused=True, materialize_grads=True
        )
        xzt = xz.to(dtype).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = tc.bimamba_core_triton(xzt, m)
        gout = torch.autograd.grad(
            out, [xzt] + list(m.parameters()), g.to(out.dtype), allow_unused=True, materialize_grads=True
        )
        errs = {"out": rel(out, ref)}
        for (name, _), a, b in zip([("xz", None)] + list(m.named_parameters()), gout, gref):
            if name.startswith(("in_proj", "out_proj")):  # not part of the core
                continue
            errs[name] = rel(a, b)
        worst = max(errs, key=errs.get)
        rows.append(
            dict(
                shape=(bsz, seqlen, d), dtype=str(dtype), out=errs["out"], worst=worst, worst_err=errs[worst]
            )
        )
        print(
            f"parity {bsz}x{seqlen}x{d} {dtype}: out {errs['out']:.2e}  worst grad {worst} {errs[worst]:.2e}",
            flush=True,
        )
        del params
    return rows


def core_times(bsz=128, seqlen=197, d=384) -> dict:
    m = mixer(d)
    e = m.d_inner
    xz = (torch.randn(bsz, seqlen, 2 * e, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    cuda_ops = get_ops("cuda")

    def run(fn, train):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn(xz, m)
            if train:
                y.backward(gy)

        return step

    gy = torch.randn(bsz, seqlen, e, device="cuda", dtype=torch.bfloat16)
    res = {}
    for name, fn in [
        ("cuda", lambda x, mm: bimamba_core(x, mm, cuda_ops)),
        ("triton", tc.bimamba_core_triton),
    ]:
        for train in (False, True):
            torch.cuda.reset_peak_memory_stats()
            ms = do_bench(run(fn, train), warmup=50, rep=300, return_mode="median")
            res[f"{name}_{'fwd_bwd' if train else 'fwd'}_ms"] = ms
    # kernels alone
    with torch.no_grad():
        x, z = xz[..., :e], xz[..., e:]
        cw, cb, _, _, A, D, dtb = tc.derived_weights(tc._core_params(m), torch.bfloat16)
        xc = torch.empty(bsz, seqlen, 2 * e, device="cuda", dtype=torch.bfloat16)
        res["k_conv_fwd_ms"] = do_bench(lambda: tc.conv_fwd(x, cw, cb, xc), return_mode="median")
        n = m.d_state
        dbc = torch.randn(bsz, seqlen, 2, 2 * n, device="cuda")  # B and C, packed float32
        dt = torch.randn(bsz, seqlen, 2 * e, device="cuda", dtype=torch.bfloat16) - 2
        res["k_scan_fwd_ms"] = do_bench(
            lambda: tc.scan_fwd(xc, dt, dbc, z, A, D, dtb, False), return_mode="median"
        )
        res["k_scan_fwd_save_ms"] = do_bench(
            lambda: tc.scan_fwd(xc, dt, dbc, z, A, D, dtb, True), return_mode="median"
        )
        _, ysum, _ = tc.scan_fwd(xc, dt, dbc, z, A, D, dtb, True)
        dz = torch.empty(bsz, seqlen, e, device="cuda", dtype=torch.bfloat16)
        res["k_scan_bwd_ms"] = do_bench(
            lambda: tc.scan_bwd(xc, dt, dbc, z, A, D, dtb, gy, ysum, dz), return_mode="median"
        )
        du = torch.randn_like(xc)
        dx = torch.empty(bsz, seqlen, e, device="cuda", dtype=torch.bfloat16)
        res["k_conv_bwd_ms"] = do_bench(lambda: tc.conv_bwd(x, cw, cb, du, dx), return_mode="median")
        # ceilings: copy bandwidth (read + write) and the exp rate
        big = torch.empty(2**28, device="cuda", dtype=torch.bfloat16)
        big2 = torch.empty_like(big)
        t = do_bench(lambda: big2.copy_(big), return_mode="median")
        res["copy_tb_s"] = 2 * big.numel() * 2 / t / 1e9
    tok = bsz * seqlen
    # fewest bytes of the scan forward kernel: read xc, dt (2E each), z (E), B, C; write y (E), bf16
    res["scan_fwd_min_bytes"] = tok * (2 * e * 2 * 2 + e * 2 + 2 * 2 * 2 * n * 2 + e * 2)
    res["scan_exp_count_fwd"] = tok * 2 * e * n
    return res


# (label, batch, tokens, d_model): the whole-model table's long-sequence rows, and two short ones
CHUNK_SHAPES = [
    ("vim_s_1024_b8", 8, 4097, 384), ("vim_t_1024_b8", 8, 4097, 192), ("vim_b_1024_b8", 8, 4097, 768),
    ("vim_t_512_b32", 32, 1025, 192), ("vim_s_512_b32", 32, 1025, 384), ("vim_t_224_b128", 128, 197, 192),
    ("vim_s_224_b128", 128, 197, 384),
]  # fmt: skip


# small batches, where ``auto`` has to choose between the paths (the launchers' chunks only)
SMALL_SHAPES = [
    ("vim_s_1024_b1", 1, 4097, 384), ("vim_s_1024_b2", 2, 4097, 384), ("vim_t_1024_b2", 2, 4097, 192),
    ("vim_t_1024_b4", 4, 4097, 192), ("vim_s_512_b4", 4, 1025, 384), ("vim_t_512_b4", 4, 1025, 192),
    ("vim_s_224_b8", 8, 197, 384), ("vim_s_224_b32", 32, 197, 384), ("vim_t_224_b32", 32, 197, 192),
]  # fmt: skip


def chunk_sweep(chunks=(0, None, 2048, 1024, 512, 256, 128), shapes=CHUNK_SHAPES) -> list[dict]:
    """One layer's mixer core, inference (forward without gradients) and training (forward +
    backward), for the two-level scan's chunk lengths (0: one chunk; None: what the launchers
    pick), against the composed cuda path, at the shapes in CHUNK_SHAPES."""
    cuda_ops = get_ops("cuda")
    rows = []
    for label, bsz, seqlen, d in shapes:
        m = mixer(d)
        e = m.d_inner
        xz = (torch.randn(bsz, seqlen, 2 * e, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
        gy = torch.randn(bsz, seqlen, e, device="cuda", dtype=torch.bfloat16)

        def timed(fn, train, xz=xz, m=m, gy=gy):
            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(train):
                    y = fn(xz, m)
                if train:
                    y.backward(gy)

            return do_bench(step, warmup=20, rep=150, return_mode="median")

        row = dict(shape=label, batch=bsz, tokens=seqlen, d_model=d)
        row["cuda_infer_ms"] = timed(lambda x, mm: bimamba_core(x, mm, cuda_ops), False)
        row["cuda_train_ms"] = timed(lambda x, mm: bimamba_core(x, mm, cuda_ops), True)
        for chunk in chunks:
            key = "auto" if chunk is None else str(chunk)
            with triton_settings(SEQ_CHUNK=chunk):
                row[f"triton_{key}_infer_ms"] = timed(tc.bimamba_core_triton, False)
                row[f"triton_{key}_train_ms"] = timed(tc.bimamba_core_triton, True)
                if chunk is None:  # the chunk lengths the launchers picked (forward, backward)
                    row["auto_chunks"] = tc.chunk_lengths(xz, bsz, seqlen, e)
        rows.append(row)
        cells = "  ".join(f"{k[:-3]} {v:.3f}" for k, v in row.items() if k.endswith("_ms"))
        print(f"chunks {label} auto={row['auto_chunks']}: {cells}", flush=True)
    return rows


def norm_times(bsz=128, seqlen=197, d=384) -> dict:
    """The fused add + RMSNorm between blocks, forward + backward at the Vim-S training shape:
    vimssl's Triton kernels against mamba-ssm's (the cuda path's) and the plain PyTorch one. The
    fewest bytes: read x (bf16) and the residual, write the residual and the output; backward read
    both gradients and the residual, write the two input gradients."""
    from vimssl.layers.norm import RMSNorm
    from vimssl.layers.norm import add_rms_norm as plain
    from vimssl.ssm import cuda, triton_norm

    norm = RMSNorm(d).cuda()
    x = torch.randn(bsz, seqlen, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    res = torch.randn(bsz, seqlen, d, device="cuda", requires_grad=True)
    g = torch.randn(bsz, seqlen, d, device="cuda", dtype=torch.bfloat16)
    gr = torch.randn(bsz, seqlen, d, device="cuda")
    paths = {"triton": triton_norm.add_rms_norm, "plain": plain}
    if cuda.available():
        paths["mamba_ssm"] = cuda.add_rms_norm
    res_ms = {}
    for name, fn in paths.items():

        def step(fn=fn):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out, r = fn(x, res, norm)
            torch.autograd.backward([out, r], [g.to(out.dtype), gr])

        res_ms[f"norm_{name}_fwd_bwd_ms"] = do_bench(step, warmup=20, rep=200, return_mode="median")
    tok = bsz * seqlen * d
    res_ms["norm_min_bytes"] = tok * (2 + 4 + 4 + 2) + tok * (2 + 4 + 4 + 2 + 4)
    return res_ms


def scan_inputs(bsz: int, seqlen: int, d: int) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """Random bf16 inputs of the scan kernels for one layer of width ``d``: the arguments of
    :func:`tc.scan_fwd` before ``save_sum`` (xc, dt, B/C packed float32, z, A log2(e), D, dt
    bias, from a perturbed mixer), the output gradient and a buffer for dz."""
    m = mixer(d)
    e, n = m.d_inner, m.d_state
    bf = dict(device="cuda", dtype=torch.bfloat16)
    xc = torch.randn(bsz, seqlen, 2 * e, **bf)
    z = torch.randn(bsz, seqlen, e, **bf)
    bc = torch.randn(bsz, seqlen, 2, 2 * n, device="cuda")
    dt = torch.randn(bsz, seqlen, 2 * e, **bf) - 2
    _, _, _, _, A, D, dtb = tc.derived_weights(tc._core_params(m), torch.bfloat16)  # A log2(e): (N, 2E)
    return (xc, dt, bc, z, A, D, dtb), torch.randn(bsz, seqlen, e, **bf), torch.empty(bsz, seqlen, e, **bf)


def sweep(bsz=128, seqlen=197, d=384) -> list[dict]:
    (xc, dt, dbc, z, A, D, dtb), gy, dz = scan_inputs(bsz, seqlen, d)
    e = z.shape[-1]
    rows = []
    names = ("SEQ_BE_FWD", "SEQ_BE_BWD", "SEQ_WARPS", "SEQ_KEEP", "SEQ_RS")
    # channels per program, warps, whether the scan backward keeps its recomputed decays, and
    # whether it sums dB/dC with the lane reduce-scatter (register caps through ptxas and 16-byte
    # B/C loads through inline PTX were tried in the third session: docs/kernel-notes.md)
    configs = [(32, 1, False, True), (32, 1, False, False), (64, 1, False, False)]
    for BE, W, keep, rs in configs:
        try:
            with triton_settings(**dict(zip(names, (BE, BE, W, keep, rs)))):
                f = do_bench(lambda: tc.scan_fwd(xc, dt, dbc, z, A, D, dtb, True), return_mode="median")
                _, ysum, _ = tc.scan_fwd(xc, dt, dbc, z, A, D, dtb, True)
                b = do_bench(
                    lambda ys=ysum: tc.scan_bwd(xc, dt, dbc, z, A, D, dtb, gy, ys, dz), return_mode="median"
                )
        except Exception as err:  # out of resources
            print(f"sweep BE={BE} rs={rs}: {type(err).__name__}: {str(err)[:200]}", flush=True)
            continue
        regs = {k: (h.n_regs, h.n_spills) for k, h in tc.LAST.items() if k.startswith("scan")}
        rows.append(
            dict(
                impl="seq",
                BE=BE,
                warps=W,
                keep=keep,
                rs=rs,
                fwd_ms=f,
                bwd_ms=b,
                regs_spills=regs,
            )
        )
        print(
            f"sweep seq BE={BE:3d} W={W} keep={keep:d} rs={rs:d}: fwd {f:.3f} ms  bwd {b:.3f} ms  {regs}",
            flush=True,
        )
    x = xc[..., :e]
    cw = torch.randn(2 * e, 4, device="cuda")
    cb = torch.randn(2 * e, device="cuda")
    out = torch.empty_like(xc)
    dx = torch.empty_like(z)
    for bt, be, w in [(16, 128, 2), (16, 128, 4), (16, 128, 8), (32, 128, 4), (8, 256, 4), (32, 64, 4)]:
        with triton_settings(CONV_BT=bt, CONV_BE=be, CONV_WARPS=w):
            f = do_bench(lambda: tc.conv_fwd(x, cw, cb, out), return_mode="median")
            b = do_bench(lambda: tc.conv_bwd(x, cw, cb, xc.clone(), dx), return_mode="median")
        rows.append(dict(impl="conv", T=bt, BE=be, warps=w, fwd_ms=f, bwd_ms=b))
        print(
            f"sweep conv  BT={bt:3d} BE={be:3d} W={w}: fwd {f:.3f} ms  bwd {b:.3f} ms (incl. a clone)",
            flush=True,
        )
    return rows


# (label, batch, tokens, d_model) for the scan programs' layout (``--narrow``)
NARROW_SHAPES = [
    ("vim_t_224_b128", 128, 197, 192), ("vim_s_224_b128", 128, 197, 384), ("vim_b_224_b128", 128, 197, 768),
    ("vim_t_224_b32", 32, 197, 192), ("vim_s_224_b32", 32, 197, 384), ("vim_t_512_b32", 32, 1025, 192),
    ("vim_s_1024_b8", 8, 4097, 384),
]  # fmt: skip


def narrow_sweep(shapes=NARROW_SHAPES) -> list[dict]:
    """The scan kernels alone (chunk carries and the split forward's combine included) by how
    their programs are laid out: the launchers' choice (``auto``), channels per one-warp program
    (the chunk rule follows the width), and the forward's branches in separate programs
    (``split``) or not, at the shapes in NARROW_SHAPES."""
    names = ("SEQ_BE_FWD", "SEQ_BE_BWD", "SEQ_NARROW", "SEQ_SPLIT")
    rows = []
    for label, bsz, seqlen, d in shapes:
        ins, gy, dz = scan_inputs(bsz, seqlen, d)
        xc, e = ins[0], gy.shape[-1]
        _, ysum, _ = tc.scan_fwd(*ins, True)
        row = dict(shape=label, batch=bsz, tokens=seqlen, d_model=d)
        row["bwd_auto_ms"] = do_bench(
            lambda ins=ins, g=(gy, ysum, dz): tc.scan_bwd(*ins, *g), return_mode="median"
        )
        variants = {
            "auto": tuple(getattr(tc, k) for k in names),
            "64": (64, 32, False, False),
            "64_split": (64, 32, False, True),
            "32": (32, 32, False, False),
        }
        for key, cfg in variants.items():
            with triton_settings(**dict(zip(names, cfg))):
                chunked = tc.chunk_lengths(xc, bsz, seqlen, e)[0] < seqlen
                if key == "64_split" and chunked:
                    continue  # (the same kernel as "64": chunked scans do not split)
                row[f"fwd_{key}_ms"] = do_bench(
                    lambda ins=ins: tc.scan_fwd(*ins, False), return_mode="median"
                )
                row[f"fwd_train_{key}_ms"] = do_bench(
                    lambda ins=ins: tc.scan_fwd(*ins, True), return_mode="median"
                )
        rows.append(row)
        cells = "  ".join(f"{k[:-3]} {v:.3f}" for k, v in row.items() if k.endswith("_ms"))
        print(f"narrow {label}: {cells}", flush=True)
    return rows


CONV_FWD_SHAPES = [
    ("vim_t_224_b128", 128, 197, 192), ("vim_s_224_b128", 128, 197, 384), ("vim_b_224_b128", 128, 197, 768),
    ("vim_s_1024_b8", 8, 4097, 384),
]  # fmt: skip
CONV_FWD_TILES = [(8, 128, 4), (16, 128, 4), (8, 64, 2), (4, 128, 2), (16, 256, 8), (32, 128, 8), (8, 256, 4)]


def conv_fwd_sweep(shapes=CONV_FWD_SHAPES, tiles=CONV_FWD_TILES) -> list[dict]:
    """The conv forward's tile (tokens, channels, warps) at several shapes, with its fewest bytes
    (read x, write both branches' outputs) over the time, in TB/s."""
    rows = []
    for label, bsz, seqlen, d in shapes:
        e = 2 * d
        x = torch.randn(bsz, seqlen, e, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(bsz, seqlen, 2 * e, device="cuda", dtype=torch.bfloat16)
        cw, cb = torch.randn(2 * e, 4, device="cuda"), torch.randn(2 * e, device="cuda")
        row = dict(shape=label)
        for bt, be, w in tiles:
            with triton_settings(CONV_BT=bt, CONV_BE=be, CONV_WARPS=w):
                ms = do_bench(lambda a=(x, cw, cb, out): tc.conv_fwd(*a), return_mode="median")
            row[f"{bt}x{be}x{w}_ms"] = ms
        row["min_bytes"] = bsz * seqlen * e * 2 * 3
        rows.append(row)
        best = min((k for k in row if k.endswith("_ms")), key=row.get)
        cells = "  ".join(f"{k[:-3]} {v * 1e3:.1f}" for k, v in row.items() if k.endswith("_ms"))
        print(
            f"conv fwd {label} (us): {cells}; best {best} {row['min_bytes'] / row[best] / 1e9:.2f} TB/s",
            flush=True,
        )
    return rows


# (channels, warps, programs per SM)
CONV_WALKS = [
    (64, 1, 8),
    (64, 1, 16),
    (64, 1, 32),
    (128, 1, 8),
    (128, 1, 16),
    (128, 1, 32),
    (128, 2, 16),
    (256, 2, 16),
]


def conv_walk_sweep(shapes=CONV_FWD_SHAPES, walks=CONV_WALKS) -> list[dict]:
    """The conv as token walks (CONV_WALK_BE channels, CONV_WALK_WARPS, CONV_WALK_FILL programs
    per SM for both) against the tile kernels, forward and backward (with the weight-gradient
    sums), bf16, at several shapes, in us, with the fewest bytes over the time (TB/s): the forward
    reads x and writes both branches' outputs, the backward reads x and g and writes dx."""
    rows = [_conv_walk_row(*shape, walks) for shape in shapes]
    regs = {k: (h.n_regs, h.n_spills) for k, h in tc.LAST.items() if k.startswith("conv_")}
    print("conv registers, spills (last launch of each):", regs, flush=True)
    return rows


def _conv_walk_row(label, bsz, seqlen, d, walks) -> dict:
    e = 2 * d
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(bsz, seqlen, e, **bf)
    out = torch.empty(bsz, seqlen, 2 * e, **bf)
    g = torch.randn(bsz, seqlen, 2 * e, **bf)
    dx = torch.empty_like(x)
    cw, cb = torch.randn(2 * e, 4, device="cuda"), torch.randn(2 * e, device="cuda")
    unit = bsz * seqlen * e * 2  # bytes of one (B, L, E) bf16 tensor
    row = dict(shape=label, fwd_bytes=3 * unit, bwd_bytes=4 * unit)
    clone = do_bench(lambda: g.clone(), return_mode="median")
    configs = [("tile", dict(CONV_WALK=False))]
    for be, w, f in walks:  # f > 0: programs per SM; f < 0: -f spans per row
        # (the forward's one-wave rule off, so that each config's spans are the ones it names)
        walk = dict(CONV_WALK=True, CONV_WALK_BE=be, CONV_WALK_WARPS=w, CONV_WALK_WAVE=None)
        if f > 0:
            configs.append((f"walk{be}x{w}f{f}", dict(walk, CONV_WALK_FILL=(f, f))))
        else:
            configs.append((f"walk{be}x{w}n{-f}", dict(walk, CONV_WALK_SPAN=-(-seqlen // -f))))
    for name, settings in configs:
        with triton_settings(**settings):
            row[f"fwd_{name}_us"] = 1e3 * do_bench(lambda: tc.conv_fwd(x, cw, cb, out), return_mode="median")
            row[f"bwd_{name}_us"] = 1e3 * (
                do_bench(lambda: tc.conv_bwd(x, cw, cb, g.clone(), dx), return_mode="median") - clone
            )
    for kind in ("fwd", "bwd"):
        cells = {
            k[len(kind) + 1 : -3]: v for k, v in row.items() if k.startswith(kind + "_") and k.endswith("_us")
        }
        best = min(cells, key=cells.get)
        text = "  ".join(f"{k} {v:.1f}" for k, v in cells.items())
        tbs = row[f"{kind}_bytes"] / cells[best] / 1e6
        print(f"conv walk {label} {kind} (us): {text}; best {best} {tbs:.2f} TB/s", flush=True)
    return row


def conv_sweep(bsz=128, seqlen=197, d=384) -> list[dict]:
    """The conv backward at the Vim-S layer shape: the first kernel's tile, warps and token spans
    per batch row (CONV_GP_*), both kernels and the weight-gradient sums, less a clone of g."""
    e = 2 * d
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(bsz, seqlen, e, **bf)
    g = torch.randn(bsz, seqlen, 2 * e, **bf)
    dx = torch.empty_like(x)
    cw = torch.randn(2 * e, 4, device="cuda")
    cb = torch.randn(2 * e, device="cuda")
    names = ("CONV_GP_BT", "CONV_GP_BE", "CONV_GP_WARPS", "CONV_GP_SPLIT")  # (SPLIT None: by CONV_GP_FILL)
    clone = do_bench(lambda: g.clone(), return_mode="median")
    rows = []
    cfgs = [(8, 128, 1, s) for s in (1, 2, 3, 4, 6)] + [(16, 64, 1, 2), (16, 64, 1, 3), (8, 64, 1, 2)]
    for cfg in cfgs:
        with triton_settings(**dict(zip(names, cfg))):
            ms = do_bench(lambda: tc.conv_bwd(x, cw, cb, g.clone(), dx), return_mode="median") - clone
        rows.append(dict(impl="conv_gp", T=cfg[0], BE=cfg[1], warps=cfg[2], split=cfg[3], bwd_ms=ms))
        print(f"sweep conv gp BT={cfg[0]} BE={cfg[1]} W={cfg[2]} split={cfg[3]}: bwd {ms:.4f} ms", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument(
        "--chunks", choices=["sweep", "small", "long"], default=None,
        help="only the two-level scan's chunk sweep, or the launchers' choice at small batches",
    )  # fmt: skip
    ap.add_argument("--conv", action="store_true", help="the conv backward's sweep (first kernel)")
    ap.add_argument("--conv-fwd", action="store_true", help="only the conv forward's tile, at several shapes")
    ap.add_argument("--narrow", action="store_true", help="only the scan programs' layout, at several shapes")
    ap.add_argument("--conv-walk", action="store_true", help="only the conv token walks against the tiles")
    ap.add_argument(
        "--walks", nargs="*", default=None, metavar="BE,WARPS,F",
        help="--conv-walk's configurations: channels, warps, programs per SM (F > 0) or spans per row (-F)",
    )  # fmt: skip
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--models", nargs="*", default=[], help="whole-model throughput (cuda, triton, deit) after the sweep"
    )
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="NAME=VALUE",
        help="vimssl.ssm.triton_core settings for this run (A/B runs), recorded in --out",
    )  # fmt: skip
    args = ap.parse_args()
    out = {"gpu": torch.cuda.get_device_name(0), "settings": apply_settings(args.set)}
    if args.narrow or args.conv_fwd or args.conv_walk:
        if args.conv_walk:
            walks = [tuple(int(v) for v in w.split(",")) for w in args.walks] if args.walks else CONV_WALKS
            out["conv_walk"] = conv_walk_sweep(walks=walks)
        if args.narrow:
            out["narrow"] = narrow_sweep()
        if args.conv_fwd:
            out["conv_fwd"] = conv_fwd_sweep()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
        return
    if args.chunks:
        small = args.chunks == "small"
        if args.chunks == "long":  # the 1024 px rows: the launchers' choice and two fixed chunks
            out["chunks"] = chunk_sweep((None, 256, 128), CHUNK_SHAPES[:3])
        else:
            out["chunks"] = chunk_sweep((None,), SMALL_SHAPES) if small else chunk_sweep()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
        return
    if args.parity:
        out["parity"] = parity()
    out["times"] = core_times()
    out["times"].update(norm_times())
    out["regs_spills"] = {k: (h.n_regs, h.n_spills) for k, h in tc.LAST.items()}
    print("registers, spills:", out["regs_spills"])
    for k, v in out["times"].items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}", flush=True)
    if args.conv:
        out["conv_sweep"] = conv_sweep()
    if args.sweep:
        out["sweep"] = sweep()
        scans = [r for r in out["sweep"] if r["impl"] == "seq" and r["warps"] == 1]
        bf, bb = min(scans, key=lambda r: r["fwd_ms"]), min(scans, key=lambda r: r["bwd_ms"])
        bc = min((r for r in out["sweep"] if r["impl"] == "conv"), key=lambda r: r["bwd_ms"])
        print("best scan fwd / bwd / conv:", bf, bb, bc, flush=True)
        tc.SEQ_WARPS, tc.SEQ_BE_FWD, tc.SEQ_BE_BWD = 1, bf["BE"], bb["BE"]
        tc.SEQ_KEEP, tc.SEQ_RS = bb["keep"], bb["rs"]
        tc.CONV_BT, tc.CONV_BE, tc.CONV_WARPS = bc["T"], bc["BE"], bc["warps"]
        out["times_best"] = core_times()
        print({k: round(v, 4) for k, v in out["times_best"].items() if k.endswith("_ms")}, flush=True)
    if args.models:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).parent))
        from throughput import measure

        out["models"] = []
        for name in args.models:
            for path in ("cuda", "triton", "deit"):
                rec = measure(name, path, 224, 128, 5)
                out["models"].append(rec)
                print(rec, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

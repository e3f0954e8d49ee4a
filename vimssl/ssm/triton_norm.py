"""The ``triton`` path's fused pre-norm step: ``residual <- residual + x``, then RMSNorm, forward
and backward, each one kernel over row tiles.

Same contract as :func:`vimssl.layers.norm.add_rms_norm`: the residual stream comes back in
float32; the normalised tensor comes out in autocast's dtype when autocast is on (the next linear
layer would cast it to that anyway), otherwise in the norm weight's dtype. Statistics and
gradients are float32; the weight gradient is summed from per-program partials in a fixed order,
so results are deterministic. Imported only when the ``triton`` path is used.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vimssl.ssm.dispatch import cdiv, sm_count

MAX_WIDTH = 16384  # wider rows fall back to the plain PyTorch version
# The backward's weight-gradient partials stored (D, programs), summed along contiguous rows,
# instead of (programs, D) summed down columns (torch's column sum of a (528, 192) float32 tensor
# took 12 us on an H100, 0.85% of a Vim-T 224 px step). With WGRAD_CAST_IN_COLSUM (triton_core)
# +1.2% Vim-T training at 224 px on an H100 (v26, docs/kernel-notes.md)
NORM_DW_ROWS = True


@triton.jit
def add_rms_fwd_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, rout_ptr, rstd_ptr, s_ptr, M, D, eps, inv_keep, rows_per_s,
    sx, sres, sout, srout,
    HAS_X: tl.constexpr, HAS_S: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """ROWS rows of (M, D): rout = res (+ x) in float32, rstd = 1 / rms(rout), out = rout * rstd * w.
    HAS_S (drop path): x of row i is scaled by s[i // rows_per_s] * inv_keep (s: 0 or 1 per sample)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
    cols = tl.arange(0, BD)[None, :]  # (1, BD)
    mc = cols < D
    m = (rows < M) & mc
    rows = rows.to(tl.int64)
    r = tl.load(res_ptr + rows * sres + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_X:
        xv = tl.load(x_ptr + rows * sx + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_S:
            xv *= tl.load(s_ptr + rows // rows_per_s, mask=rows < M, other=0.0) * inv_keep
        r += xv
    tl.store(rout_ptr + rows * srout + cols, r, mask=m)
    rstd = tl.rsqrt(tl.sum(r * r, axis=1, keep_dims=True) / D + eps)  # (ROWS, 1)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)
    w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * sout + cols, (r * rstd * w).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def add_rms_bwd_kernel(
    dout_ptr, drout_ptr, rout_ptr, rstd_ptr, w_ptr, dres_ptr, dx_ptr, dw_ptr, s_ptr, M, D, n_tiles,
    inv_keep, rows_per_s, sdout, sdrout, srout, sdres, sdx, sdw_p, sdw_d,
    HAS_DROUT: tl.constexpr, HAS_DX: tl.constexpr, HAS_S: tl.constexpr, ROWS: tl.constexpr,
    BD: tl.constexpr,
):  # fmt: skip
    """Gradients of :func:`add_rms_fwd_kernel` over the row tiles pid, pid + nprog, ...: the
    residual's (dres, plus the incoming rout gradient when HAS_DROUT) and x's (the same values in
    x's dtype, when HAS_DX, times the drop-path scale when HAS_S); this program's share of the
    weight gradient goes to dw at pid * sdw_p + column * sdw_d."""
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BD)[None, :]
    mc = cols < D
    w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    dw = tl.zeros((ROWS, BD), tl.float32)
    for tile in range(pid, n_tiles, nprog):
        rows = tile * ROWS + tl.arange(0, ROWS)[:, None]
        mr = rows < M
        m = mr & mc
        rows = rows.to(tl.int64)
        xhat = tl.load(rout_ptr + rows * srout + cols, mask=m, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mr, other=0.0)
        xhat *= rstd
        dout = tl.load(dout_ptr + rows * sdout + cols, mask=m, other=0.0).to(tl.float32)
        dw += dout * xhat
        g = dout * w
        dr = (g - xhat * (tl.sum(g * xhat, axis=1, keep_dims=True) / D)) * rstd
        if HAS_DROUT:
            dr += tl.load(drout_ptr + rows * sdrout + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(dres_ptr + rows * sdres + cols, dr.to(dres_ptr.dtype.element_ty), mask=m)
        if HAS_DX:
            if HAS_S:
                dr *= tl.load(s_ptr + rows // rows_per_s, mask=mr, other=0.0) * inv_keep
            tl.store(dx_ptr + rows * sdx + cols, dr.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + pid * sdw_p + cols * sdw_d, tl.sum(dw, axis=0, keep_dims=True), mask=mc)


def _tile(d: int) -> tuple[int, int, int]:
    """(rows per program, padded width, warps) for rows of width d: about 4,096 elements a tile."""
    bd = triton.next_power_of_2(d)
    rows = max(1, min(16, 4096 // bd))
    return rows, bd, 4 if rows * bd <= 4096 else 8


@functools.cache
def _programs(device: torch.device) -> int:
    """Backward programs (each loops over row tiles): 4 per SM; 3 under the CPU interpreter, so
    that its tests cover programs with several tiles."""
    if device.type != "cuda":
        return 3
    return 4 * sm_count(device)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """(..., d) -> (M, d) with unit stride along d (a view when possible)."""
    t = t.reshape(-1, d)
    return t if t.stride(-1) == 1 else t.contiguous()


class AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps: float, out_dtype: torch.dtype, mask, keep: float):
        d = residual.shape[-1]
        shape = residual.shape
        res2 = _rows(residual, d)
        x2 = _rows(x, d) if x is not None else res2
        m = res2.shape[0]
        out = torch.empty(m, d, device=res2.device, dtype=out_dtype)
        rout = torch.empty(m, d, device=res2.device, dtype=torch.float32)
        rstd = torch.empty(m, device=res2.device, dtype=torch.float32)
        rows, bd, warps = _tile(d)
        has_s = x is not None and mask is not None
        rows_per_s = m // shape[0] if has_s else 1  # rows of one sample
        add_rms_fwd_kernel[(cdiv(m, rows),)](
            x2, res2, weight, out, rout, rstd, mask if has_s else rstd, m, d, eps, 1.0 / keep, rows_per_s,
            x2.stride(0), res2.stride(0), out.stride(0), rout.stride(0),
            HAS_X=x is not None, HAS_S=has_s, ROWS=rows, BD=bd, num_warps=warps,
        )  # fmt: skip
        ctx.save_for_backward(rout, rstd, weight, mask if has_s else None)
        ctx.keep, ctx.rows_per_s = keep, rows_per_s
        ctx.x_dtype = None if x is None else x.dtype
        ctx.res_dtype, ctx.shape = residual.dtype, shape
        ctx.set_materialize_grads(False)
        return out.view(shape), rout.view(shape)

    @staticmethod
    def backward(ctx, dout, drout):
        rout, rstd, weight, mask = ctx.saved_tensors
        m, d = rout.shape
        if dout is None:
            dout = torch.zeros(m, d, device=rout.device, dtype=torch.float32)
        dout = _rows(dout, d)
        drout = None if drout is None else _rows(drout, d)
        rows, bd, warps = _tile(d)
        n_tiles = cdiv(m, rows)
        grid = min(n_tiles, _programs(rout.device))
        dres = torch.empty(m, d, device=rout.device, dtype=ctx.res_dtype)
        has_dx = ctx.x_dtype is not None and ctx.needs_input_grad[0]
        dx = torch.empty(m, d, device=rout.device, dtype=ctx.x_dtype) if has_dx else dres
        rows_dw = NORM_DW_ROWS
        dw = torch.empty((d, grid) if rows_dw else (grid, d), device=rout.device, dtype=torch.float32)
        add_rms_bwd_kernel[(grid,)](
            dout, drout if drout is not None else dout, rout, rstd, weight, dres, dx, dw,
            mask if mask is not None else rstd, m, d, n_tiles, 1.0 / ctx.keep, ctx.rows_per_s,
            dout.stride(0), drout.stride(0) if drout is not None else 0, rout.stride(0), dres.stride(0),
            dx.stride(0), *((1, grid) if rows_dw else (d, 1)),
            HAS_DROUT=drout is not None, HAS_DX=has_dx, HAS_S=mask is not None, ROWS=rows, BD=bd, num_warps=warps,
        )  # fmt: skip
        dweight = dw.sum(1 if rows_dw else 0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return (
            dx.view(ctx.shape) if has_dx else None,
            dres.view(ctx.shape) if ctx.needs_input_grad[1] else None,
            dweight,
            None,
            None,
            None,
            None,
        )


def add_rms_norm(
    x: torch.Tensor | None, residual: torch.Tensor, norm, drop=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual <- residual + x`` (x may be None), returns ``(norm(residual), residual)`` with the
    residual in float32: :func:`vimssl.layers.norm.add_rms_norm` in one kernel each way. ``drop``
    (a drop-path draw of x's samples, :func:`vimssl.layers.drop_path.draw`) is applied inside the
    kernels, in float32."""
    d = residual.shape[-1]
    if x is not None and x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape")
    if norm.weight.shape != (d,):
        raise ValueError(f"norm weight {tuple(norm.weight.shape)} does not match the width {d}")
    if d > MAX_WIDTH:
        from vimssl.layers.norm import add_rms_norm as plain

        return plain(x, residual, norm, drop)
    if torch.is_autocast_enabled(residual.device.type):
        out_dtype = torch.get_autocast_dtype(residual.device.type)
    else:
        out_dtype = norm.weight.dtype
    mask, keep = drop if drop is not None else (None, 1.0)
    if mask is not None and mask.shape != (residual.shape[0],):
        raise ValueError(
            f"drop mask {tuple(mask.shape)} must have one value per sample ({residual.shape[0]})"
        )
    return AddRMSNormFn.apply(x, residual, norm.weight, norm.eps, out_dtype, mask, keep)

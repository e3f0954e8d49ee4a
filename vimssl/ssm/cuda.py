"""Adapters around the CUDA kernels of ``mamba_ssm`` and ``causal_conv1d`` (the ``[cuda]`` extra).

Imported lazily by :mod:`vimssl.ssm.dispatch`; this module itself imports nothing heavy at import
time. The adapters fix dtypes the kernels insist on: under bf16/fp16 autocast the scan's A, D
and dt bias stay float32, while delta, B and C follow u's dtype; the conv weight follows x.
"""

from __future__ import annotations

import functools


class CudaKernelsUnavailable(ImportError):
    pass


@functools.cache
def _kernels():
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, or a missing compiled extension (OSError, ...)
        raise CudaKernelsUnavailable(
            "the 'cuda' backend needs the packages mamba-ssm and causal-conv1d built for this GPU "
            f"and torch ({type(err).__name__}: {err}). Install them with "
            "`pip install -e \".[cuda]\"` on a CUDA machine, or use backend='torch'."
        ) from err
    try:
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
    except Exception:  # the fused add+norm is an optimisation, not a requirement
        rms_norm_fn = None
    return selective_scan_fn, causal_conv1d_fn, rms_norm_fn


@functools.cache
def available() -> bool:
    try:
        _kernels()
    except CudaKernelsUnavailable:
        return False
    return True


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Same contract as :func:`vimssl.ssm.reference.selective_scan_ref`."""
    scan, _, _ = _kernels()
    dtype = u.dtype
    return scan(
        u,
        delta.to(dtype),
        A.float(),
        B.to(dtype),
        C.to(dtype),
        None if D is None else D.float(),
        None if z is None else z.to(dtype),
        None if delta_bias is None else delta_bias.float(),
        delta_softplus,
    )


def causal_conv1d(x, weight, bias=None, activation=None):
    """Same contract as :func:`vimssl.ssm.reference.causal_conv1d_ref`."""
    _, conv, _ = _kernels()
    if x.stride(-1) != 1 and x.stride(1) != 1:
        x = x.contiguous()
    return conv(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation=activation)


def add_rms_norm(x, residual, norm, drop=None):
    """Fused ``residual + x`` then RMSNorm (Triton), same contract as
    :func:`vimssl.layers.norm.add_rms_norm`; falls back to it where the kernel is missing."""
    from vimssl.layers.drop_path import apply_drop

    _, _, rms_norm_fn = _kernels()
    if rms_norm_fn is None:
        from vimssl.layers.norm import add_rms_norm as plain

        return plain(x, residual, norm, drop)
    x = apply_drop(x, drop)
    if x is None:
        x, residual = residual, None
    out, residual = rms_norm_fn(
        x, norm.weight, None, residual=residual, prenorm=True, residual_in_fp32=True, eps=norm.eps
    )
    return out, residual

"""Choose a kernel path: ``"torch"`` (reference), ``"cuda"`` (mamba-ssm + causal-conv1d) or
``"auto"`` (the CUDA kernels when the tensors are on a GPU and the packages import, otherwise the
reference). The choice ``auto`` makes is logged once per device type."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vimssl.layers.norm import add_rms_norm
from vimssl.ssm.reference import causal_conv1d_ref, selective_scan_ref

log = logging.getLogger("vimssl")

BACKENDS = ("auto", "torch", "cuda")
_logged: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class SSMOps:
    name: str
    selective_scan: Callable
    causal_conv1d: Callable
    add_rms_norm: Callable


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def cuda_kernels_available() -> bool:
    """True when mamba-ssm and causal-conv1d import with their compiled extensions."""
    from vimssl.ssm import cuda

    return cuda.available()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete path for tensors on ``device``; validate forced choices."""
    check_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "cuda":
        if device.type != "cuda":
            raise RuntimeError(
                f"backend='cuda' needs tensors on a CUDA device, got {device}; "
                "move the model to the GPU or use backend='torch' (or 'auto')"
            )
        from vimssl.ssm import cuda

        cuda._kernels()  # raises CudaKernelsUnavailable with install advice
        return "cuda"
    chosen = "cuda" if device.type == "cuda" and cuda_kernels_available() else "torch"
    if (device.type, chosen) not in _logged:
        _logged.add((device.type, chosen))
        log.info("vimssl backend 'auto' chose %r for %s tensors", chosen, device.type)
    return chosen


def get_ops(name: str) -> SSMOps:
    if name == "torch":
        return _TORCH_OPS
    if name == "cuda":
        from vimssl.ssm import cuda

        return SSMOps("cuda", cuda.selective_scan, cuda.causal_conv1d, cuda.add_rms_norm)
    raise ValueError(f"no kernel ops for backend {name!r}; resolve 'auto' first")


_TORCH_OPS = SSMOps("torch", selective_scan_ref, causal_conv1d_ref, add_rms_norm)

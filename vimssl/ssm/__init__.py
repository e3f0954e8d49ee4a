"""Selective-scan and causal-conv kernels behind one dispatcher.

- ``reference``: pure PyTorch, runs on any device; the reference every fast path is tested against.
- ``cuda``: adapters around ``mamba_ssm`` / ``causal_conv1d`` (optional ``[cuda]`` extra, imported
  lazily, never at ``import vimssl``).
- ``triton_core`` / ``triton_kernels``: vimssl's fused Triton kernels for the whole bidirectional
  mixer core, forward and backward (imported lazily).

Every path is used with the same parameters (one state dict).
"""

from vimssl.ssm.dispatch import (
    BACKENDS,
    SSMOps,
    cuda_kernels_available,
    get_ops,
    resolve_backend,
    triton_kernels_available,
)
from vimssl.ssm.reference import causal_conv1d_ref, selective_scan_ref

__all__ = [
    "BACKENDS",
    "SSMOps",
    "causal_conv1d_ref",
    "cuda_kernels_available",
    "get_ops",
    "resolve_backend",
    "selective_scan_ref",
    "triton_kernels_available",
]

"""Choose a kernel path: ``"torch"`` (reference), ``"cuda"`` (mamba-ssm + causal-conv1d),
``"triton"`` (vimssl's fused Triton kernels for the whole mixer core) or ``"auto"``: on a GPU the
fastest path installed (see :func:`auto_gpu_path`), otherwise the reference. Each choice ``auto``
makes is logged once per device type."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vimssl.layers.norm import add_rms_norm
from vimssl.ssm.reference import causal_conv1d_ref, selective_scan_ref

log = logging.getLogger("vimssl")

BACKENDS = ("auto", "torch", "cuda", "triton")
_logged: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class SSMOps:
    name: str
    selective_scan: Callable
    causal_conv1d: Callable
    add_rms_norm: Callable
    # the whole mixer core (xz, mixer) -> y, replacing the composed scan + conv when set
    core: Callable | None = None
    # ... and with the mixer's out_proj applied, (xz, mixer) -> out_proj(y), when set
    core_out: Callable | None = None
    # the mixer's in_proj, (hidden, linear module) -> its output, when set (else the module's call)
    linear: Callable | None = None


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def cuda_kernels_available() -> bool:
    """True when mamba-ssm and causal-conv1d import with their compiled extensions."""
    from vimssl.ssm import cuda

    return cuda.available()


def triton_kernels_available(device: torch.device | None = None) -> bool:
    """True when Triton imports and its kernels can run on CUDA ``device`` (default: the current
    device): an NVIDIA GPU of compute capability 8.0+, not ROCm."""
    try:
        from vimssl.ssm import triton_core
    except Exception:  # no triton, or a broken install
        return False
    return triton_core.available(device.index if device is not None and device.type == "cuda" else None)


# ``auto`` takes the triton path on a GPU wherever Triton runs, at every shape. Until the
# thirteenth session it kept mamba-ssm for short sequences with fewer than 32 (batch row x inner
# channel) sequences per SM, from a v8 measurement; the v19 kernels measured on an H200
# (docs/benchmarks.md, 2026-11-28, whole models, bf16) beat mamba-ssm at every such shape tried:
# from CUDA graphs, Vim-S at 224 px with batch 1, 2, 4 and 8 trains 1.10-1.36x and infers
# 1.26-1.71x faster, Vim-T with batch 1 and 8 1.05-1.18x and 1.18-1.58x; eager, where both paths
# wait on the host, triton inferred 1.5-2.3x faster and trained 1.45-1.56x faster (Vim-S, batch 1
# and 4) or 0.85x (Vim-T, batch 8). Long sequences (256+ tokens) were triton's already.


def auto_gpu_path(triton_ok: bool, cuda_ok: bool) -> str:
    """The path ``auto`` takes on a GPU: triton where it runs, else mamba-ssm where it is installed,
    else the reference."""
    if triton_ok:
        return "triton"
    if cuda_ok:
        return "cuda"
    return "torch"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of CUDA ``device`` (the current device when it has no index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for the launchers' grid and chunk arithmetic. ``triton.cdiv`` is a Triton
    constexpr function (3.5+), whose every Python call unwraps its arguments: a few microseconds
    each, and the triton path's launchers make about thirty such calls per layer and step."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two >= ``n`` (``n`` >= 1): ``triton.next_power_of_2`` without its call
    overhead (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length()


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which CUDA work for ``t`` runs on ``t``'s GPU. Triton launches its kernels on
    the *current* CUDA device and stream, whatever device the tensors are on (mamba-ssm's
    extensions switch devices themselves): a model moved to ``cuda:1`` in a process whose current
    device is ``cuda:0`` would otherwise fail or launch on the wrong GPU. The autograd engine runs
    a device's backward with that device current, so the forward is what needs it. A no-op (no
    CUDA call) for CPU tensors and on the current device."""
    dev = t.device
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        return torch.cuda.device(dev.index)
    return contextlib.nullcontext()


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
    if backend == "triton":
        if device.type != "cuda":
            raise RuntimeError(
                f"backend='triton' needs tensors on a CUDA device, got {device}; "
                "move the model to the GPU or use backend='torch' (or 'auto')"
            )
        if not triton_kernels_available(device):
            raise RuntimeError(
                "backend='triton' needs the triton package (installed with PyTorch on Linux CUDA "
                f"builds) and an NVIDIA GPU of compute capability 8.0 or newer (the tensors are on "
                f"{device}; its kernels use NVIDIA PTX: not on ROCm); use backend='cuda', 'torch' or 'auto'"
            )
        return "triton"
    chosen = "torch"
    if device.type == "cuda":
        # mamba-ssm (a heavy import) is probed only where triton cannot run: triton comes first
        triton_ok = triton_kernels_available(device)
        chosen = auto_gpu_path(triton_ok, not triton_ok and cuda_kernels_available())
    if (device.type, chosen) not in _logged:
        _logged.add((device.type, chosen))
        log.info("backend 'auto' chose %r for %s tensors", chosen, device.type)
    return chosen


@functools.cache  # called for every block on every forward
def get_ops(name: str) -> SSMOps:
    if name == "torch":
        return _TORCH_OPS
    if name == "cuda":
        from vimssl.ssm import cuda

        return SSMOps("cuda", cuda.selective_scan, cuda.causal_conv1d, cuda.add_rms_norm)
    if name == "triton":
        from vimssl.ssm import triton_core

        return SSMOps(
            "triton",
            selective_scan_ref,
            causal_conv1d_ref,
            triton_core.add_rms_norm,
            core=triton_core.bimamba_core_triton,
            core_out=triton_core.bimamba_core_out_triton,
            linear=triton_core.linear,
        )
    raise ValueError(f"no kernel ops for backend {name!r}; resolve 'auto' first")


_TORCH_OPS = SSMOps("torch", selective_scan_ref, causal_conv1d_ref, add_rms_norm)

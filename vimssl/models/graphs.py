"""Training steps replayed from CUDA graphs.

A Vim training step launches about 1,400 small kernels (24 blocks, forward and backward), and on
the ``triton`` path the GPU work per launch is short enough that Python and the launches bound the
step: an H100 then waits for the host a tenth (Vim-S) to a half (Vim-T) of the time. Capturing the
step's forward and backward once with :func:`torch.cuda.make_graphed_callables` and replaying the
graphs removes that host time. Model code only: the LightningModules opt in (``cuda_graphs``).

What a captured step assumes (all true of vimssl's models and kernel paths): fixed input shapes
(other shapes run eagerly), no host synchronisation inside the step, parameters updated in place.
Random draws (drop path, masks) are fresh at every replay. A capture that fails is logged once
and the step runs eagerly from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


class _Captured(nn.Module):
    """``fn`` as a module whose parameters are ``owner``'s: make_graphed_callables replaces the
    forward of the module it captures and feeds its parameters to the graphs as inputs."""

    def __init__(self, owner: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *args: torch.Tensor):
        return self.fn(*args)


class CudaGraphed:
    """Calls ``fn(*tensors)`` (a differentiable function of ``owner``'s parameters returning a
    tensor or a tuple of tensors) from captured CUDA graphs while ``owner`` trains with gradients
    on a GPU, eagerly otherwise.

    One capture per input signature (shapes, dtypes, autocast state), at most ``max_graphs`` of
    them (each keeps its own activations in a private memory pool); other signatures, such as a
    smaller last batch, run eagerly. Not an ``nn.Module``, so that it adds nothing to the owner's
    state dict. The outputs are copied out of the graph's static tensors (which the next replay
    overwrites), so they can be kept, logged and differentiated like eager outputs.
    """

    def __init__(self, owner: nn.Module, fn: Callable, max_graphs: int = 1) -> None:
        self.owner, self.fn, self.max_graphs = owner, fn, max_graphs
        self.graphs: dict[tuple, nn.Module] = {}
        self.failed: str | None = None  # why the last capture failed

    def _key(self, args: tuple[torch.Tensor, ...]) -> tuple:
        amp = torch.is_autocast_enabled("cuda")
        return tuple((a.shape, a.dtype, a.requires_grad) for a in args) + (
            amp,
            torch.get_autocast_dtype("cuda") if amp else None,
        )

    def _usable(self, args: tuple) -> bool:
        return (
            self.failed is None
            and self.owner.training
            and torch.is_grad_enabled()
            and len(args) > 0
            and all(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        )

    def __call__(self, *args: torch.Tensor):
        if not self._usable(args):
            return self.fn(*args)
        key = self._key(args)
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(*args)
            graphed = self._capture(key, args)
            if graphed is None:
                return self.fn(*args)
        out = graphed(*args)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    def _capture(self, key: tuple, args: tuple[torch.Tensor, ...]) -> nn.Module | None:
        amp, dtype = key[-2], key[-1]
        samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        module = _Captured(self.owner, self.fn)
        try:
            # autocast's weight-cast cache would free tensors the graph reads: off while capturing
            with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=amp, cache_enabled=False):
                graphed = torch.cuda.make_graphed_callables(module, samples)
        except Exception as err:  # capture is best effort: the eager step is always correct
            self.failed = f"{type(err).__name__}: {err}"
            log.warning("CUDA graph capture failed, training eagerly from now on: %s", self.failed)
            return None
        self.graphs[key] = graphed
        log.info("captured a CUDA graph of the training step for inputs %s", [tuple(a.shape) for a in args])
        return graphed


def check_cuda_graphs(trains_encoder: bool, grad_checkpointing: bool) -> None:
    """The LightningModules' ``cuda_graphs`` option: reject the combinations it does not support."""
    if not trains_encoder:
        raise ValueError(
            "cuda_graphs captures the encoder's training step; a frozen encoder (mode='linear') has "
            "none: set cuda_graphs=false"
        )
    if grad_checkpointing:
        raise ValueError(
            "cuda_graphs and grad_checkpointing cannot be combined (recomputation inside a captured "
            "graph is not supported here): set one of them to false"
        )


def check_single_device(cuda_graphs: bool, world_size: int) -> None:
    """``cuda_graphs`` has been tested on one GPU only: refuse it under multi-process training."""
    if cuda_graphs and world_size > 1:
        raise ValueError(
            f"cuda_graphs is supported on a single GPU only (this run has {world_size} processes): "
            "set model.init_args.cuda_graphs=false"
        )

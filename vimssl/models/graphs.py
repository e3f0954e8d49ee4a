"""Training and inference steps replayed from CUDA graphs.

A Vim training step launches about 1,400 small kernels (24 blocks, forward and backward), and on
the ``triton`` path the GPU work per launch is short enough that Python and the launches bound the
step: an H100 then waits for the host a tenth (Vim-S) to a half (Vim-T) of the time. Capturing the
step's forward and backward once with :func:`torch.cuda.make_graphed_callables` and replaying the
graphs removes that host time. Inference (no gradients) is captured too, as one graph of the
forward (:class:`torch.cuda.CUDAGraph`). Model code only: the LightningModules opt in
(``cuda_graphs``).

What a captured step assumes (all true of vimssl's models and kernel paths): fixed input shapes
(other shapes run eagerly), no host synchronisation inside the step, parameters updated in place.
Random draws (drop path, masks) are fresh at every replay. A capture that fails is logged once
and the step runs eagerly from then on.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import nn

from vimssl.ssm.dispatch import on_device_of

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


class _Inference:
    """One captured no-grad call of ``fn``: static input tensors the arguments are copied into,
    and the static outputs the replay writes."""

    def __init__(self, fn: Callable, args: tuple[torch.Tensor, ...]) -> None:
        self.inputs = tuple(a.detach().clone() for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture: compiles, workspaces, lazy state
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor):
        for static, a in zip(self.inputs, args):
            static.copy_(a)
        self.graph.replay()
        return self.outputs


class CudaGraphed:
    """Calls ``fn(*tensors)`` (a differentiable function of ``owner``'s parameters returning a
    tensor or a tuple of tensors) from captured CUDA graphs while ``owner`` trains with gradients
    on a GPU and, with ``inference=True``, for calls without gradients (``torch.no_grad`` or
    ``torch.inference_mode``, in eval or training mode); eagerly otherwise.

    One capture per input signature (shapes, dtypes, autocast and grad state, ``owner.training``),
    at most ``max_graphs`` training and ``max_graphs`` inference ones (each keeps its own
    activations in a private memory pool); other signatures, such as a smaller last batch, run
    eagerly. Not an ``nn.Module``, so that it adds nothing to the owner's state dict. The outputs
    are copied out of the graph's static tensors (which the next replay overwrites), so they can be
    kept, logged and differentiated like eager outputs. Parameters must be updated in place
    (optimizers, ``load_state_dict`` and EMA updates do): the graphs read them where they were at
    capture. Gradients accumulate over replays as over eager steps (see :meth:`_own_grads`).
    """

    def __init__(self, owner: nn.Module, fn: Callable, max_graphs: int = 1, inference: bool = False) -> None:
        self.owner, self.fn, self.max_graphs, self.inference = owner, fn, max_graphs, inference
        self.graphs: dict[tuple, nn.Module | _Inference] = {}
        self.failed: str | None = None  # why the last capture failed
        self._tensors: list[torch.Tensor] = []  # owner's parameters and buffers, and their
        self._addresses: list[int] = []  # addresses when the graphs were captured
        self._params: list[torch.Tensor] = []  # owner's trainable parameters, and per parameter
        self._owned: list[weakref.ref | None] = []  # the gradient _own_grads last gave it

    def _moved(self) -> bool:
        """Whether a parameter or buffer of ``owner`` has new storage since the captures
        (``.to()``, ``.cuda()``, ``.half()``): the graphs would read the old memory."""
        return [t.data_ptr() for t in self._tensors] != self._addresses

    def _mode(self, args: tuple) -> str | None:
        """How a call with ``args`` runs: "train" or "infer" (from graphs) or None (eagerly)."""
        if self.failed is not None or not args:
            return None
        if not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            return None
        if torch.is_grad_enabled():
            return "train" if self.owner.training else None
        return "infer" if self.inference else None

    def _key(self, mode: str, args: tuple[torch.Tensor, ...]) -> tuple:
        """(mode, owner.training, inference mode, autocast on, autocast dtype, then per argument
        its shape, dtype and requires_grad)."""
        amp = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if amp else None
        state = (mode, self.owner.training, torch.is_inference_mode_enabled(), amp, dtype)
        return state + tuple((a.shape, a.dtype, a.requires_grad) for a in args)

    def __call__(self, *args: torch.Tensor):
        mode = self._mode(args)
        if mode is None:
            return self.fn(*args)
        with on_device_of(args[0]):  # captures and replays on the inputs' GPU, not the current one
            return self._replay(mode, args)

    def _replay(self, mode: str, args: tuple[torch.Tensor, ...]):
        if self.graphs and self._moved():
            log.info("the model's tensors moved since the CUDA graphs were captured: capturing again")
            self.graphs.clear()
        if mode == "train" and self.graphs:
            self._own_grads()
        key = self._key(mode, args)
        graphed = self.graphs.get(key)
        if graphed is None:
            if sum(k[0] == mode for k in self.graphs) >= self.max_graphs:
                return self.fn(*args)
            graphed = self._capture(mode, key, args)
            if graphed is None:
                return self.fn(*args)
        out = graphed(*args)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    def _remember_tensors(self) -> None:
        """At the first capture: the owner's tensors and where they are, and its trainable
        parameters (whose gradients :meth:`_own_grads` looks after)."""
        self._tensors = [*self.owner.parameters(), *self.owner.buffers()]
        self._addresses = [t.data_ptr() for t in self._tensors]
        self._params = [p for p in self.owner.parameters() if p.requires_grad]
        self._owned = [None] * len(self._params)

    def _own_grads(self) -> None:
        """Give every parameter that has a gradient before a training replay a copy of its own.

        A replayed backward returns each parameter's gradient as a view of the graph's static
        buffer, and autograd keeps that view as ``.grad`` when the parameter had none (it steals
        tensors nobody else holds). The next backward replay would overwrite the buffer under the
        ``.grad`` it then adds to: accumulated gradients (``accumulate_grad_batches``, several
        backward calls before a step) or ones zeroed in place (``zero_grad(set_to_none=False)``)
        would come out as twice the last micro-batch's. Gradients set to None between steps (the
        default) cost one attribute read per parameter here; a copy made once is not copied
        again."""
        for i, p in enumerate(self._params):
            grad = p.grad
            if grad is None:
                continue
            mine = self._owned[i]
            if mine is not None and mine() is grad:
                continue
            p.grad = grad.clone()
            self._owned[i] = weakref.ref(p.grad)

    def _capture(self, mode: str, key: tuple, args: tuple[torch.Tensor, ...]):
        amp, dtype = key[3], key[4]
        try:
            # autocast's weight-cast cache would free tensors the graph reads, or keep casts made
            # before the capture in it: off while capturing
            with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=amp, cache_enabled=False):
                if mode == "infer":
                    graphed = _Inference(self.fn, args)
                else:
                    samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
                    graphed = torch.cuda.make_graphed_callables(_Captured(self.owner, self.fn), samples)
        except Exception as err:  # capture is best effort: the eager step is always correct
            self.failed = f"{type(err).__name__}: {err}"
            log.warning("CUDA graph capture failed, running eagerly from now on: %s", self.failed)
            return None
        if not self.graphs:
            self._remember_tensors()
        self.graphs[key] = graphed
        step = "inference" if mode == "infer" else "training"
        log.info("captured a CUDA graph of the %s step for inputs %s", step, [tuple(a.shape) for a in args])
        return graphed


def check_cuda_graphs(grad_checkpointing: bool) -> None:
    """The LightningModules' ``cuda_graphs`` option: reject the combinations it does not support."""
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


def eager_gpu_hint(
    cuda_graphs: bool, world_size: int, device: torch.device, grad_checkpointing: bool
) -> str | None:
    """What to tell a single-GPU run that trains eagerly although it could replay its steps from
    CUDA graphs (None when it does, or cannot: several processes, the CPU, grad checkpointing)."""
    if cuda_graphs or world_size > 1 or device.type != "cuda" or grad_checkpointing:
        return None
    return (
        "training eagerly on one GPU: model.init_args.cuda_graphs=true replays each step from CUDA graphs, "
        "which removes the Python and kernel-launch time that bounds eager Vim steps (most of a Vim-T "
        "step, about a tenth of a Vim-S step on the triton path; README, Performance)"
    )


def check_graphs_at_fit_start(
    cuda_graphs: bool, world_size: int, device: torch.device, grad_checkpointing: bool
) -> None:
    """The LightningModules' ``on_fit_start`` check of ``cuda_graphs``: refused with several
    processes (:func:`check_single_device`), suggested to a single-GPU run without it
    (:func:`eager_gpu_hint`)."""
    check_single_device(cuda_graphs, world_size)
    if hint := eager_gpu_hint(cuda_graphs, world_size, device, grad_checkpointing):
        log.info(hint)

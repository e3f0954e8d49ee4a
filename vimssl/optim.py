"""Optimiser helpers shared by pretraining and transfer: parameter groups (weight-decay
exclusions, layer-wise learning-rate decay) and the warm-up + cosine schedule. Pure functions,
no Lightning."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    no_decay: set[str] = frozenset(),
    layer_id: Callable[[str], int] | None = None,
    num_layers: int | None = None,
    layer_decay: float = 1.0,
) -> list[dict]:
    """AdamW parameter groups.

    Parameters named in ``no_decay``, and every parameter with fewer than 2 dimensions (norms,
    biases), get no weight decay. With ``layer_id``/``num_layers`` and ``layer_decay < 1``, a
    parameter of layer i gets ``lr_scale = layer_decay ** (num_layers - 1 - i)`` (BEiT/MAE
    fine-tuning): the last layer (head) trains at the full rate. Frozen parameters are skipped.
    Each group carries ``lr_scale``; the caller multiplies it into the learning rate.
    """
    if layer_decay != 1.0 and (layer_id is None or num_layers is None):
        raise ValueError("layer_decay needs layer_id and num_layers")
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or name in no_decay)
        lid = layer_id(name) if layer_id is not None else 0
        key = (lid, decay)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - lid) if num_layers is not None else 1.0
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up from 0 to 1 over ``warmup_steps``, then cosine
    decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_adamw(
    groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` output, each group's lr = lr * lr_scale."""
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def effective_batch_size(trainer) -> int:
    """Images per optimiser step: the data module's batch_size x processes x accumulation."""
    batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if batch is None:
        raise ValueError("cannot scale base_lr without the data module's batch_size; set model.lr instead")
    return batch * trainer.world_size * trainer.accumulate_grad_batches


def schedule_steps(trainer, warmup_epochs: float, warmup_steps: int | None) -> tuple[int, int]:
    """(warm-up steps, total optimiser steps) of the run the trainer will do."""
    total = int(trainer.estimated_stepping_batches)
    if warmup_steps is None:
        epochs = max(1, trainer.max_epochs or 1)
        warmup_steps = int(warmup_epochs * total / epochs)
    return min(warmup_steps, max(total - 1, 0)), total


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR; ``min_lr`` is relative to the largest group lr (the head's)."""
    top = max(g["lr"] for g in optimizer.param_groups)
    ratio = min_lr / top if top > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps, ratio)
    )

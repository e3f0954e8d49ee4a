"""Stochastic depth (Huang et al. 2016): drop a residual branch per sample while training."""

from __future__ import annotations

import torch
from torch import nn

# A drawn drop: (mask (B,) float32 of 0/1, keep probability), or None for no drop.
Drop = tuple[torch.Tensor, float] | None


def draw(batch: int, p: float, training: bool, device: torch.device) -> Drop:
    """One keep/drop draw per sample, for :func:`apply_drop` (or a kernel that fuses it)."""
    if p == 0.0 or not training:
        return None
    keep = 1.0 - p
    return torch.empty(batch, device=device, dtype=torch.float32).bernoulli_(keep), keep


def apply_drop(x: torch.Tensor | None, drop: Drop) -> torch.Tensor | None:
    """``x`` (B, ...) with the dropped samples zeroed and the rest rescaled by ``1 / keep`` (None
    stays None)."""
    if x is None or drop is None:
        return x
    mask, keep = drop
    return x * mask.view((x.shape[0],) + (1,) * (x.ndim - 1)).to(x.dtype) / keep


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole samples of ``x`` with probability ``p`` and rescale the rest by ``1 / (1 - p)``."""
    return apply_drop(x, draw(x.shape[0], p, training, x.device))


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def draw(self, batch: int, device: torch.device) -> Drop:
        """This module's draw for a batch, applied later (the blocks fuse it into the next norm)."""
        return draw(batch, self.p, self.training, device)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"

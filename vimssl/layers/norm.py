"""RMSNorm and the pre-norm "add then normalise" step of Mamba-style residual blocks.

The residual stream is kept in float32 (``residual_in_fp32`` in the released Vim), whatever the
autocast dtype; the normalised output takes the dtype of the norm's weight (or autocast's).
"""

from __future__ import annotations

import torch
from torch import nn

from vimssl.layers.drop_path import Drop, apply_drop


class RMSNorm(nn.Module):
    """Root-mean-square norm with a weight and no bias (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., D); statistics in float32 for bf16/fp16 inputs
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def add_rms_norm(
    x: torch.Tensor | None, residual: torch.Tensor, norm: RMSNorm, drop: Drop = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual <- residual + x`` (x may be None), returns ``(norm(residual), residual)``.

    residual: (B, L, D), returned in float32. The normalised tensor has the norm weight's dtype
    (float32 unless the model was cast); under autocast the next linear layer casts it.
    ``drop``: a drop-path draw (:func:`vimssl.layers.drop_path.draw`) applied to x first.
    """
    x = apply_drop(x, drop)
    residual = residual.float() if x is None else residual.float() + x.float()
    return norm(residual.to(norm.weight.dtype)), residual

"""Absolute position embeddings with the cls token's slot in the *middle* of the sequence.

Vim inserts the cls token at index ``M // 2`` of the M patch tokens, and its learned position
embedding (1, M + 1, D) holds the cls slot at that index. Resampling to another grid must take
that slot out, resample the patch part as an image (bicubic, float32) and put it back at the
new middle. (The released fine-tuning code assumed a leading cls slot, which is wrong for these
checkpoints.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_pos_embed(pos_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, M + 1, D) -> cls slot (1, 1, D) and patch part (1, M, D), cls taken from index M // 2."""
    m = pos_embed.shape[1] - 1
    mid = m // 2
    cls = pos_embed[:, mid : mid + 1]
    patches = torch.cat([pos_embed[:, :mid], pos_embed[:, mid + 1 :]], dim=1)
    return cls, patches


def join_pos_embed(cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_pos_embed`: put the cls slot back at index M // 2."""
    mid = patches.shape[1] // 2
    return torch.cat([patches[:, :mid], cls, patches[:, mid:]], dim=1)


def resample_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resample a middle-cls position embedding from ``old_grid`` to ``new_grid`` (rows, cols).

    pos_embed: (1, gh*gw + 1, D) -> (1, gh'*gw' + 1, D), same dtype. A pure function: also used to
    convert checkpoints between resolutions.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, M + 1, D), got {tuple(pos_embed.shape)}")
    gh, gw = old_grid
    if pos_embed.shape[1] != gh * gw + 1:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} slots but grid {gh}x{gw} needs {gh * gw + 1}")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    cls, patches = split_pos_embed(pos_embed)
    d = patches.shape[-1]
    img = patches.float().reshape(1, gh, gw, d).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    img = F.interpolate(img, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = img.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos_embed.dtype)
    return join_pos_embed(cls, patches)

"""Pixel targets and the reconstruction loss of masked image modeling (MAE, He et al. 2021;
SimMIM, Xie et al. 2021).

Images are cut into non-overlapping ``p x p`` patches in raster order, each flattened as
``(p, p, C)`` (MAE's layout), so a patch target lines up with the encoder's patch token of the
same index. NOTE: that holds only when the patch embedding's stride equals its patch size; the
overlapping stride-8 Vim variants have no one-to-one patch targets, and
:func:`check_mim_compatible` rejects them.

Pure functions on tensors; no model, masking or training code.
"""

from __future__ import annotations

import torch
from torch import nn


def check_mim_compatible(model: nn.Module) -> int:
    """Raise unless ``model``'s patch embedding is non-overlapping; returns its patch size.

    Masked image modeling predicts one non-overlapping pixel patch per token, so it needs
    ``stride == patch_size`` (e.g. not the ``*_stride8_*`` models).
    """
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(embed, "patch_size") or not hasattr(embed, "stride"):
        raise TypeError(f"{type(model).__name__} has no patch_embed with patch_size and stride")
    if embed.stride != embed.patch_size:
        name = getattr(model, "model_name", type(model).__name__)
        raise ValueError(
            f"masked image modeling needs non-overlapping patches (stride == patch_size), but {name} "
            f"has patch_size {embed.patch_size} and stride {embed.stride}; pretrain a model with "
            "stride == patch_size (e.g. vim_small_patch16_224 instead of vim_small_patch16_stride8_224)"
        )
    return int(embed.patch_size)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, M, p*p*C): non-overlapping patches in raster order, M = (H/p) * (W/p)."""
    if imgs.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(imgs.shape)}")
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("bchpwq->bhwpqc", x)  # (B, gh, gw, p, p, C)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3
) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, M, p*p*C) -> (B, C, gh*p, gw*p)."""
    b, m, d = patches.shape
    gh, gw = grid
    p = patch_size
    if m != gh * gw or d != p * p * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit grid {gh}x{gw} of {p}x{p}x{channels} patches"
        )
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)  # (B, C, gh, p, gw, p)
    return x.reshape(b, channels, gh * p, gw * p)


def _patch_stats(patches: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # patches: (B, M, P) -> mean, std (B, M, 1); MAE's unbiased variance
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return mean, (var + eps).sqrt()


def pixel_target(
    imgs: torch.Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Regression target (B, M, p*p*C), float32; with ``norm_pix`` each patch is normalised by its
    own mean and (unbiased) variance, as MAE's ``norm_pix_loss``."""
    target = patchify(imgs.float(), patch_size)  # (B, M, P)
    if norm_pix:
        mean, std = _patch_stats(target, eps)
        target = (target - mean) / std
    return target


def denormalize_prediction(
    pred: torch.Tensor, imgs: torch.Tensor, patch_size: int, eps: float = 1e-6
) -> torch.Tensor:
    """Undo ``norm_pix`` for display: pred (B, M, P) in per-patch normalised units -> pixel patches
    (B, M, P), using the statistics of the true patches of ``imgs`` (B, C, H, W)."""
    mean, std = _patch_stats(patchify(imgs.float(), patch_size), eps)
    return pred.float() * std + mean


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked patches only: pred, target (B, M, P), mask (B, M) with
    True = masked -> scalar (float32).

    Visible patches are selected out before the subtraction, so they neither contribute nor get
    gradient (not even NaN/inf values there). With no masked patch at all the loss is 0.
    """
    if pred.shape != target.shape or pred.shape[:2] != mask.shape:
        raise ValueError(
            f"shapes do not match: pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)}"
        )
    mask = mask.bool()
    zero = pred.new_zeros((), dtype=torch.float32)
    diff = torch.where(mask.unsqueeze(-1), pred.float() - target.float(), zero)  # (B, M, P)
    per_patch = diff.pow(2).mean(dim=-1)  # (B, M)
    return per_patch.sum() / mask.sum().clamp(min=1)

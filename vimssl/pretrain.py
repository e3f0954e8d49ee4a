"""Masked-image-modeling pretraining of a Vim encoder, as a LightningModule.

Two methods behind ``method``:

- ``"mae"`` (He et al. 2021): the encoder sees only the visible patch tokens (raster order, cls
  in their middle); a light decoder (bidirectional Mamba blocks by default, Transformer as an
  option) sees them plus mask tokens at the masked places and predicts the masked patches' pixels.
- ``"simmim"`` (Xie et al. 2021): a learned mask token replaces masked patches in place, the
  encoder sees the whole sequence, a linear head predicts pixels.

Masks: ``random``, ``block`` or ``row`` (row-aligned runs, after MAP / Mamba-R). Target: per-patch
normalised (default) or raw pixels, MSE on masked patches only. The pure pieces live in
:mod:`vimssl.mim`; the model in :mod:`vimssl.models`.
"""

from __future__ import annotations

import logging
from typing import Literal

import lightning as L
import torch
from torch import nn

from vimssl.layers.patch_embed import grid_size
from vimssl.mim import (
    LinearDecoder,
    build_decoder,
    check_mim_compatible,
    denormalize_prediction,
    make_mask,
    mask_to_ids,
    masked_mse,
    num_masked,
    pixel_target,
    unpatchify,
)
from vimssl.models import create_model
from vimssl.models.graphs import CudaGraphed, check_cuda_graphs, check_graphs_at_fit_start
from vimssl.optim import (
    build_adamw,
    effective_batch_size,
    param_groups,
    schedule_steps,
    warmup_cosine_scheduler,
)
from vimssl.throughput import ImagesPerSecond

log = logging.getLogger("vimssl")


class MaskedPretraining(ImagesPerSecond, L.LightningModule):
    """MAE- or SimMIM-style pretraining of ``vimssl.create_model(model_name, ...)``.

    The learning rate is ``lr`` if given, else ``base_lr * effective_batch / 256`` (MAE's rule),
    with linear warm-up then cosine decay to ``min_lr``, per optimiser step. ``num_classes`` is the
    data's class count where it has labels, filled in by the CLI (the same link serves the
    classifier); pretraining does not use labels and only records it in checkpoints.
    """

    def __init__(
        self,
        model_name: str = "vim_tiny_patch16_224",
        img_size: int = 224,
        embed_dim: int | None = None,
        depth: int | None = None,
        drop_path_rate: float = 0.0,
        backend: Literal["auto", "torch", "cuda", "triton"] = "auto",
        grad_checkpointing: bool = False,
        method: Literal["mae", "simmim"] = "mae",
        mask_kind: Literal["random", "block", "row"] = "random",
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder: Literal["mamba", "transformer"] = "mamba",
        decoder_dim: int = 512,
        decoder_depth: int = 4,
        lr: float | None = None,
        base_lr: float = 1.5e-4,
        min_lr: float = 0.0,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 5.0,
        warmup_steps: int | None = None,
        nonfinite_loss: Literal["raise", "skip"] = "raise",
        num_classes: int | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        overrides = dict(img_size=img_size, num_classes=0, drop_path_rate=drop_path_rate, backend=backend)
        if embed_dim is not None:
            overrides["embed_dim"] = embed_dim
        if depth is not None:
            overrides["depth"] = depth
        self.encoder = create_model(model_name, **overrides)
        self.encoder.set_grad_checkpointing(grad_checkpointing)
        self.patch_size = check_mim_compatible(self.encoder)
        patch_dim = self.patch_size**2 * self.encoder.patch_embed.in_chans
        if method == "mae":
            self.decoder = build_decoder(
                decoder, encoder_dim=self.encoder.embed_dim, patch_dim=patch_dim, grid=self.encoder.grid,
                decoder_dim=decoder_dim, depth=decoder_depth,
                **({"backend": backend} if decoder == "mamba" else {}),
            )  # fmt: skip
            self.mask_token = None
        else:
            self.decoder = LinearDecoder(self.encoder.embed_dim, patch_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.encoder.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        # the training loss (masking, encoder, decoder) replayed from CUDA graphs
        self._graphed = None
        if cuda_graphs:
            check_cuda_graphs(grad_checkpointing)
            self._graphed = CudaGraphed(self, lambda imgs: self(imgs)["loss"])

    # ------------------------------------------------------------------ model
    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """imgs (B, C, H, W) -> dict(loss, pred (B, M, p*p*C), mask (B, M) True = masked).

        H and W must be multiples of the patch size. A mask is drawn when none is given."""
        b, _, h, w = imgs.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}; "
                "resize or crop the images (data.image_size)"
            )
        grid = grid_size((h, w), self.patch_size, self.patch_size)
        visible = None  # known for a mask drawn here (every kind masks exactly num_masked): no host sync
        if mask is None:
            mask = make_mask(self.hparams.mask_kind, b, grid, self.hparams.mask_ratio, device=imgs.device)
            visible = grid[0] * grid[1] - num_masked(grid[0] * grid[1], self.hparams.mask_ratio)
        if self.hparams.method == "mae":
            ids_keep, _, ids_restore = mask_to_ids(mask, visible)
            feats = self.encoder.forward_features(imgs, ids_keep=ids_keep)  # (B, K+1, D)
            pred = self.decoder(feats, ids_restore, grid=grid)  # (B, M, p*p*C)
        else:
            feats = self.encoder.forward_features(imgs, mask=mask, mask_token=self.mask_token)  # (B, M+1, D)
            pred = self.decoder(feats)  # (B, M, p*p*C)
        target = pixel_target(imgs, self.patch_size, norm_pix=self.hparams.norm_pix_loss)
        loss = masked_mse(pred.float(), target, mask)
        return {"loss": loss, "pred": pred, "mask": mask}

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Pictures for people: the masked input and the reconstruction (visible patches pasted
        from the input), all (B, C, H, W) in the input's (normalised) pixel space."""
        out = self(imgs, mask)
        mask, pred = out["mask"], out["pred"].float()
        p, grid = self.patch_size, (imgs.shape[2] // self.patch_size, imgs.shape[3] // self.patch_size)
        if self.hparams.norm_pix_loss:
            pred = denormalize_prediction(pred, imgs, p)
        channels = imgs.shape[1]
        masked_px = unpatchify(mask.unsqueeze(-1).expand_as(pred).float(), p, grid, channels).bool()
        recon = unpatchify(pred, p, grid, channels).to(imgs.dtype)
        return {
            "original": imgs,
            "masked": torch.where(masked_px, imgs.amin(), imgs),  # masked patches shown dark
            "reconstruction": torch.where(masked_px, recon, imgs),  # visible patches from the input
            "loss": out["loss"],
        }

    # --------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        hp = self.hparams
        check_graphs_at_fit_start(hp.cuda_graphs, self.trainer.world_size, self.device, hp.grad_checkpointing)

    def training_loss(self, imgs: torch.Tensor) -> torch.Tensor:
        """The masked-modelling loss of a batch: from CUDA graphs with ``cuda_graphs`` (when
        training with gradients on a GPU), else eagerly."""
        return self._graphed(imgs) if self._graphed is not None else self(imgs)["loss"]

    def training_step(self, batch, batch_idx: int):
        imgs = batch[0]
        loss = self.training_loss(imgs)
        if not self.loss_is_usable(loss):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=imgs.shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=imgs.shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        imgs = batch[0]
        # a fixed mask per batch index makes validation losses comparable across epochs
        gen = torch.Generator().manual_seed(batch_idx)
        grid = (imgs.shape[2] // self.patch_size, imgs.shape[3] // self.patch_size)
        mask = make_mask(self.hparams.mask_kind, imgs.shape[0], grid, self.hparams.mask_ratio, generator=gen)
        loss = self(imgs, mask.to(imgs.device))["loss"]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=imgs.shape[0])

    # -------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr if hp.lr is not None else hp.base_lr * effective_batch_size(self.trainer) / 256
        no_decay = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        no_decay |= {f"decoder.{n}" for n in getattr(self.decoder, "no_weight_decay", set)()}
        no_decay |= {"mask_token"}
        opt = build_adamw(
            param_groups(self.named_parameters(), hp.weight_decay, no_decay), lr, tuple(hp.betas)
        )
        warmup, total = schedule_steps(self.trainer, hp.warmup_epochs, hp.warmup_steps)
        sched = warmup_cosine_scheduler(opt, warmup, total, hp.min_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what export / transfer need to rebuild the encoder without this class
        checkpoint["vimssl"] = {
            "kind": "pretraining",
            "model_name": self.hparams.model_name,
            "encoder_config": dict(self.encoder.config),
            "encoder_prefix": "encoder.",
        }

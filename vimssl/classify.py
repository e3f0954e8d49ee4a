"""Transfer of a Vim encoder to a labelled dataset: full fine-tuning or linear probing, as one
LightningModule.

- ``mode="finetune"``: the whole encoder trains, with layer-wise lr decay (BEiT / MAE fine-tuning),
  drop path, label smoothing, mixup / cutmix (torchvision), AdamW with warm-up + cosine, and an
  optional EMA of the weights that validation uses and checkpoints keep beside the raw ones.
  RandAugment and random erasing are data-side (``ImageDataModule`` arguments).
- ``mode="linear"``: the encoder is frozen (no gradients, eval mode every step); a BatchNorm
  without affine parameters, then a linear head, on the cls feature or the mean of the patch
  features (the MAE linear-probing protocol), optionally of the last k blocks concatenated
  (``last_k_layers``).

The encoder comes from one argument (:func:`vimssl.transfer.load_encoder`). Metrics: top-1 /
top-5 accuracy via torchmetrics for train / val / test; ``predict`` gives class probabilities
(:class:`CSVPredictionWriter` writes them to a CSV file).
"""

from __future__ import annotations

import csv
import functools
import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics.classification import MulticlassAccuracy

from vimssl.checkpoint import fold_feature_norm  # noqa: F401  (re-exported)
from vimssl.models.graphs import CudaGraphed, check_cuda_graphs, check_graphs_at_fit_start
from vimssl.optim import (
    build_adamw,
    effective_batch_size,
    param_groups,
    schedule_steps,
    warmup_cosine_scheduler,
)
from vimssl.throughput import ImagesPerSecond
from vimssl.transfer import load_encoder

log = logging.getLogger("vimssl")


class ImageClassifier(ImagesPerSecond, L.LightningModule):
    def __init__(
        self,
        encoder: str = "vim_tiny_patch16_224",
        num_classes: int = 1000,
        img_size: int = 224,
        mode: Literal["finetune", "linear"] = "finetune",
        which: Literal["auto", "model", "model_ema"] = "auto",
        pool: Literal["cls", "mean"] = "cls",
        last_k_layers: int = 1,
        drop_path_rate: float = 0.1,
        backend: Literal["auto", "torch", "cuda", "triton"] = "auto",
        grad_checkpointing: bool = False,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float | None = None,
        base_lr: float = 5e-4,
        min_lr: float = 1e-6,
        weight_decay: float = 0.05,
        layer_decay: float = 0.75,
        warmup_epochs: float = 5.0,
        warmup_steps: int | None = None,
        ema_decay: float | None = None,
        class_names: list[str] | None = None,
        nonfinite_loss: Literal["raise", "skip"] = "raise",
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        linear = mode == "linear"
        if last_k_layers != 1 and not linear:
            raise ValueError(
                "last_k_layers > 1 (concatenated features of several blocks) is for mode='linear'"
            )
        self.model = load_encoder(
            encoder, num_classes=num_classes, img_size=img_size, which=which,
            drop_path_rate=0.0 if linear else drop_path_rate, backend=backend,
        )  # fmt: skip
        # a fresh head for the new task (MAE: small init)
        nn.init.trunc_normal_(self.model.head.weight, std=2e-5 if not linear else 0.01)
        nn.init.zeros_(self.model.head.bias)
        if linear:
            if not 1 <= last_k_layers <= self.model.depth:
                raise ValueError(
                    f"last_k_layers must be in [1, depth={self.model.depth}], got {last_k_layers}"
                )
            self.model.requires_grad_(False)
            self.model.eval()  # also the state Lightning restores after its loops
            dim = self.model.embed_dim * last_k_layers
            if last_k_layers > 1:  # the head reads the concatenated features of several blocks
                self.model.head = nn.Linear(dim, num_classes)
                nn.init.trunc_normal_(self.model.head.weight, std=0.01)
                nn.init.zeros_(self.model.head.bias)
            self.model.head.requires_grad_(True)
            self.feat_norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        else:
            self.feat_norm = nn.Identity()
            self.model.set_grad_checkpointing(grad_checkpointing)
        self.ema = None
        if ema_decay is not None:
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True
            )
            self.ema.requires_grad_(False)
        self.mix = self._mixing(mixup_alpha, cutmix_alpha, num_classes)
        # CUDA graphs (vimssl.models.graphs), per encoder (the trained one, its EMA copy): the
        # fine-tuning forward + backward and the evaluation forward; the frozen features when probing
        self._graphs: dict[str, CudaGraphed] = {}
        if cuda_graphs:
            check_cuda_graphs(grad_checkpointing and not linear)
            encoders = {"model": self.model} | ({"ema": self.ema.module} if self.ema is not None else {})
            for name, enc in encoders.items():
                self._graphs[name] = CudaGraphed(
                    enc, functools.partial(self._encode, model=enc), inference=True
                )
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for stage in ("train", "val", "test")
                for name, k in (("acc1", 1), ("acc5", top5))
            }
        )

    @staticmethod
    def _mixing(mixup: float, cutmix: float, num_classes: int):
        from torchvision.transforms import v2

        choices = []
        if mixup > 0:
            choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        return v2.RandomChoice(choices) if choices else None

    # ------------------------------------------------------------------ model
    def features(self, imgs: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """(B, C, H, W) -> pooled features (B, D), or (B, k*D) for the last k blocks concatenated:
        the cls feature or the mean of patch features."""
        model = model or self.model
        k = self.hparams.last_k_layers
        layers = model.forward_intermediates(imgs, k) if k > 1 else [model.forward_features(imgs)]
        pooled = []
        for feats in layers:  # (B, K+1, D) each
            if self.hparams.pool == "cls":
                pooled.append(model.forward_head(feats, pre_logits=True))
            else:
                pooled.append(model.split_features(feats)[1].mean(dim=1))
        return torch.cat(pooled, dim=-1)

    def forward(self, imgs: torch.Tensor, use_ema: bool = False) -> torch.Tensor:
        """Logits (B, num_classes)."""
        ema = use_ema and self.ema is not None
        model = self.ema.module if ema else self.model
        # from CUDA graphs with cuda_graphs (eager on the CPU and for unseen shapes)
        encode = self._graphs.get("ema" if ema else "model") or functools.partial(self._encode, model=model)
        if self.hparams.mode == "linear":
            with torch.no_grad():
                feats = encode(imgs)
            return model.head(self.feat_norm(feats.float()))
        return encode(imgs)

    def _encode(self, imgs: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """Logits of ``model`` (the trained encoder or its EMA copy); its pooled features when
        probing (the probe's norm and head then run outside the graphs, with gradients)."""
        feats = self.features(imgs, model)
        return feats if self.hparams.mode == "linear" else model.head(feats)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.hparams.mode == "linear":
            self.model.eval()  # frozen encoder: no dropout / drop path, whatever the trainer says
        if self.ema is not None:
            self.ema.eval()
        return self

    # --------------------------------------------------------------- training
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # labels checked while the batch is still on the host: on the GPU each check would wait for
        # the GPU to finish the step before (prediction batches may be unlabelled)
        if not self.trainer.predicting and isinstance(batch, (list, tuple)) and len(batch) > 1:
            self._labels(batch[1])
            self._host_checked = True
        return batch

    # whether on_before_batch_transfer checks the labels (a datamodule's own hook replaces it)
    _host_checked = False

    def _checked(self, labels: torch.Tensor) -> torch.Tensor:
        """The batch's labels, checked here unless they were checked on the host before the transfer."""
        return labels if self._host_checked else self._labels(labels)

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        if (labels < 0).any():
            raise ValueError(
                "the batch has samples without a label (-1): a classifier needs a label column "
                "(set data.init_args.label_column)"
            )
        if (labels >= self.hparams.num_classes).any():
            raise ValueError(
                f"label {int(labels.max())} is out of range for num_classes={self.hparams.num_classes}"
            )
        return labels

    def training_step(self, batch, batch_idx: int):
        imgs, labels = batch[0], self._checked(batch[1])
        targets = labels
        if self.mix is not None and self.hparams.mode == "finetune":
            imgs, targets = self.mix(imgs, labels)  # soft targets (B, C)
        logits = self(imgs)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.hparams.label_smoothing)
        if not self.loss_is_usable(loss):
            return None
        self._update_metrics("train", logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=imgs.shape[0])
        self.log("train/lr", self.optimizers().param_groups[-1]["lr"], batch_size=imgs.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _update_metrics(self, stage: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        for name in ("acc1", "acc5"):
            metric = self.metrics[f"{stage}_{name}"]
            metric(logits.detach(), labels)
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "acc1")

    def _eval_step(self, stage: str, batch) -> None:
        imgs, labels = batch[0], self._checked(batch[1])
        logits = self(imgs, use_ema=True)  # EMA weights when enabled
        loss = F.cross_entropy(logits.float(), labels)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=imgs.shape[0])
        self._update_metrics(stage, logits, labels)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        probs = self(batch[0], use_ema=True).float().softmax(-1)
        return {"probs": probs, "labels": batch[1]}

    # -------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr if hp.lr is not None else hp.base_lr * effective_batch_size(self.trainer) / 256
        m = self.model
        groups = param_groups(
            m.named_parameters(), hp.weight_decay, m.no_weight_decay(),
            layer_id=m.layer_id, num_layers=m.num_layer_ids,
            layer_decay=hp.layer_decay if hp.mode == "finetune" else 1.0,
        )  # fmt: skip
        if hp.optimizer == "adamw":
            opt = build_adamw(groups, lr)
        else:
            for g in groups:
                g["lr"] = g["initial_lr"] = lr * g["lr_scale"]
            opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
        warmup, total = schedule_steps(self.trainer, hp.warmup_epochs, hp.warmup_steps)
        sched = warmup_cosine_scheduler(opt, warmup, total, hp.min_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        hp = self.hparams
        gc = hp.grad_checkpointing and hp.mode != "linear"  # (a frozen encoder has no backward)
        check_graphs_at_fit_start(hp.cuda_graphs, self.trainer.world_size, self.device, gc)
        names = getattr(self.trainer.datamodule, "class_names", None)
        if self.hparams.class_names is None and names is not None:
            self.hparams.class_names = list(names)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vimssl"] = {
            "kind": "classifier",
            "mode": self.hparams.mode,
            "model_name": getattr(self.model, "model_name", None),
            "encoder_config": dict(self.model.config),
            "encoder_prefix": "model.",
            "ema_prefix": "ema.module." if self.ema is not None else None,
            # linear probes: BatchNorm statistics to fold into the head for export
            "feature_norm_prefix": "feat_norm." if self.hparams.mode == "linear" else None,
            "last_k_layers": self.hparams.last_k_layers,
            "class_names": self.hparams.class_names,
        }


class CSVPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results to ``<output_dir>/predictions.csv``: one row per image with its
    index in the predict split, the predicted class name and probability, the top-5 classes, and
    the true label when the split has one."""

    def __init__(self, output_dir: str | None = None, top_k: int = 5) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir, self.top_k = output_dir, top_k
        self.path: Path | None = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        names = pl_module.hparams.class_names or getattr(trainer.datamodule, "class_names", None)
        names = names or [str(i) for i in range(pl_module.hparams.num_classes)]
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        suffix = "" if trainer.world_size == 1 else f"_rank{trainer.global_rank}"
        self.path = folder / f"predictions{suffix}.csv"
        indices = batch_indices[0] if batch_indices and isinstance(batch_indices[0], list) else batch_indices
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "prediction", "probability", f"top{self.top_k}", "label"])
            for out, idx in zip(predictions, indices or [None] * len(predictions)):
                probs, labels = out["probs"].cpu(), out["labels"].cpu()
                top_p, top_i = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
                for row in range(probs.shape[0]):
                    writer.writerow([
                        idx[row] if idx is not None else "",
                        names[top_i[row, 0]],
                        f"{top_p[row, 0]:.4f}",
                        " ".join(f"{names[i]}:{p:.3f}" for p, i in zip(top_p[row].tolist(), top_i[row].tolist())),
                        names[labels[row]] if labels[row] >= 0 else "",
                    ])  # fmt: skip
        log.info("wrote %s", self.path)

"""Weighted k-nearest-neighbour evaluation of frozen encoder features.

The classifier of InstDisc (Wu et al. 2018, arXiv 1805.01978) as used by DINO (Caron et al. 2021,
``eval_knn.py``): L2-normalised features, cosine similarity to a bank of labelled train features,
the ``k`` most similar neighbours vote for their class with weight ``exp(sim / T)``.

- :func:`knn_predict`, :func:`knn_accuracy`: pure functions on feature tensors;
- :func:`extract_features`: frozen features of a loader (cls token or mean of patch tokens);
- :class:`KNNEvaluation`: a LightningModule for ``python cli.py validate|test --config
  configs/knn.yaml`` on any encoder :func:`vimssl.transfer.load_encoder` takes;
- :class:`KNNMonitor`: a callback that reports kNN accuracy during pretraining.

Training (linear probing, fine-tuning) does not belong here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Subset

from vimssl.data.errors import DataError
from vimssl.transfer import load_encoder

__all__ = ["KNNEvaluation", "KNNMonitor", "extract_features", "knn_accuracy", "knn_predict"]

log = logging.getLogger("vimssl")


# ---------------------------------------------------------------------------- pure functions
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores (Q, C) of ``query_feats`` (Q, D) against a labelled bank
    ``train_feats`` (N, D), ``train_labels`` (N,) in ``[0, num_classes)``.

    Score of class c = sum over the k most cosine-similar bank entries of class c of
    ``exp(sim / temperature)``, divided by the same sum over all k (so each row sums to 1).
    ``k`` is clipped to N; queries are processed ``chunk_size`` at a time, so memory is
    O(chunk_size * N).
    NOTE: DINO returns the unnormalised sums; dividing by the total changes no ranking and lets us
    compute the weights as a softmax over the neighbours, which cannot overflow for small T.
    """
    if train_feats.ndim != 2 or query_feats.ndim != 2 or train_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(
            f"expected train (N, D) and query (Q, D) features, got {tuple(train_feats.shape)} and "
            f"{tuple(query_feats.shape)}"
        )
    if train_labels.shape != train_feats.shape[:1]:
        raise ValueError(
            f"train_labels has shape {tuple(train_labels.shape)}, expected ({train_feats.shape[0]},)"
        )
    if train_feats.shape[0] == 0:
        raise ValueError("the feature bank is empty")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"k and chunk_size must be >= 1 and temperature > 0, got {k}, {chunk_size}, {temperature}"
        )
    labels = train_labels.to(train_feats.device, torch.long)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"train labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    k = min(k, train_feats.shape[0])
    bank = F.normalize(train_feats.float(), dim=1)  # (N, D)
    out = []
    for queries in query_feats.split(chunk_size):
        q = F.normalize(queries.to(bank.device, torch.float32), dim=1)  # (q, D)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k), (q, k)
        weights = (sim / temperature).softmax(dim=1)  # exp(sim / T) / sum over the k neighbours
        scores = torch.zeros(q.shape[0], num_classes, device=bank.device)
        out.append(scores.scatter_add_(1, labels[idx], weights))  # (q, C)
    if not out:
        return torch.zeros(0, num_classes, device=bank.device)
    return torch.cat(out)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` (fractions in [0, 1]) of the weighted kNN classifier;
    ``top5`` only when there are at least 5 classes."""
    scores = knn_predict(train_feats, train_labels, query_feats, num_classes, k, temperature, chunk_size)
    target = query_labels.to(scores.device, torch.long)
    if target.shape != scores.shape[:1] or target.numel() == 0:
        raise ValueError(
            f"query_labels has shape {tuple(query_labels.shape)}, expected ({scores.shape[0]},) with Q > 0"
        )
    out = {"top1": (scores.argmax(1) == target).float().mean().item()}
    if num_classes >= 5:
        top5 = scores.topk(5, dim=1).indices  # (Q, 5)
        out["top5"] = (top5 == target[:, None]).any(1).float().mean().item()
    return out


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    pool: Literal["cls", "mean"] = "cls",
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 and labels (N,) long, both on ``device``, of every ``(images, labels)``
    batch of ``loader``, with ``encoder`` in eval mode (each submodule's mode is restored after).

    pool: ``"cls"``, the cls token (``forward_head(..., pre_logits=True)``); ``"mean"``, the mean of
    the patch tokens. amp: autocast (float16 on CUDA, bfloat16 on CPU). Images are cast to the
    encoder's dtype when it is not float32 (half-precision weights).
    """
    if pool not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    device = torch.device(device)
    param = next(encoder.parameters(), None)
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    modes = {m: m.training for m in encoder.modules()}
    encoder.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            images, target = batch[0], batch[1]
            if images.shape[0] == 0:
                continue  # every image of the batch was undecodable and skipped
            images = images.to(device, dtype, non_blocking=True)
            with torch.autocast(device.type, enabled=amp):
                tokens = encoder.forward_features(images)  # (B, K+1, D)
                if pool == "cls":
                    f = encoder.forward_head(tokens, pre_logits=True)  # (B, D)
                else:
                    f = encoder.split_features(tokens)[1].mean(dim=1)  # (B, K, D) -> (B, D)
            feats.append(f.float())
            labels.append(torch.as_tensor(target).to(device, torch.long))
    finally:
        for m, training in modes.items():
            m.training = training
    if not feats:
        raise ValueError("the loader gave no images to extract features from")
    return torch.cat(feats), torch.cat(labels)


def _num_classes(datamodule: Any, who: str) -> int:
    """The data module's number of classes, or a :class:`DataError` saying why there is none."""
    if datamodule is None or not hasattr(datamodule, "feature_dataloader"):
        raise DataError(
            f"{who} needs a data module with feature_dataloader(role) and num_classes "
            "(vimssl.data.ImageDataModule)"
        )
    num_classes = getattr(datamodule, "num_classes", None)
    if not num_classes:
        column = getattr(datamodule, "label_column_name", None)
        raise DataError(
            f"{who} needs labelled data, but the data module has no labels (label column: {column!r}); "
            "set data.init_args.label_column to the column holding the classes"
        )
    return int(num_classes)


def _labelled(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = labels >= 0  # -1: a sample without a label
    return (feats, labels) if bool(keep.all()) else (feats[keep], labels[keep])


# ---------------------------------------------------------------------------- Lightning system
class KNNEvaluation(L.LightningModule):
    """kNN accuracy of a frozen encoder: ``python cli.py validate --config configs/knn.yaml
    --model.init_args.encoder <source>`` (or ``test``), where ``<source>`` is anything
    :func:`vimssl.transfer.load_encoder` takes (registry name, ``.ckpt``, Hub id or folder, ``.pth``).

    At the start of each validation / test epoch the data module's whole train split (evaluation
    transform) is encoded into the bank; every val / test batch is then classified against it and
    ``knn/top1`` (and ``knn/top5`` with >= 5 classes) is logged.

    Several processes (DDP): each rank encodes the full bank, Lightning shards the queries, and the
    torchmetrics accuracies are reduced over ranks at the end of the epoch. Samples without a
    label (-1) are left out of the bank and ignored by the metrics.
    """

    def __init__(
        self,
        encoder: str = "vim_test",
        img_size: int = 224,
        which: str = "auto",
        k: int = 20,
        temperature: float = 0.07,
        pool: Literal["cls", "mean"] = "cls",
        backend: Literal["auto", "torch", "cuda", "triton"] = "auto",
        chunk_size: int = 1024,
        num_classes: int | None = None,
    ) -> None:
        # num_classes: filled in by the CLI from the data (a link shared by every module); the
        # classes are read from the data module at setup either way
        super().__init__()
        self.save_hyperparameters()
        if k < 1 or temperature <= 0:
            raise ValueError(f"k must be >= 1 and temperature > 0, got {k} and {temperature}")
        self.encoder = load_encoder(encoder, num_classes=0, img_size=img_size, which=which, backend=backend)
        self.encoder.requires_grad_(False).eval()
        self.metrics = nn.ModuleDict()
        self.num_classes: int | None = None
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images (B, C, H, W) -> features (B, D)
        tokens = self.encoder.forward_features(images)
        if self.hparams.pool == "cls":
            return self.encoder.forward_head(tokens, pre_logits=True)
        return self.encoder.split_features(tokens)[1].mean(dim=1)

    def setup(self, stage: str) -> None:
        from torchmetrics.classification import MulticlassAccuracy

        self.num_classes = _num_classes(self.trainer.datamodule, "KNNEvaluation")
        if len(self.metrics) == 0:
            tops = [1, 5] if self.num_classes >= 5 else [1]
            for top in tops:
                self.metrics[f"top{top}"] = MulticlassAccuracy(
                    self.num_classes, top_k=top, average="micro", ignore_index=-1
                )

    def configure_optimizers(self) -> None:
        return None

    # ------------------------------------------------------------------ bank
    def _build_bank(self) -> None:
        loader = self.trainer.datamodule.feature_dataloader("train")
        with self.trainer.precision_plugin.forward_context():
            feats, labels = extract_features(self.encoder, loader, self.device, pool=self.hparams.pool)
        self._bank = _labelled(feats, labels)  # (N, D), (N,) on self.device
        if self._bank[0].shape[0] == 0:
            raise DataError("the train split has no labelled samples for the kNN bank")
        log.info("kNN bank: %d train features of dimension %d", *self._bank[0].shape)

    def on_validation_epoch_start(self) -> None:
        self._build_bank()

    def on_test_epoch_start(self) -> None:
        self._build_bank()

    # ------------------------------------------------------------------ steps
    def _knn_step(self, batch) -> None:
        images, labels = batch[0], batch[1]
        if images.shape[0] == 0:
            return
        scores = knn_predict(
            *self._bank, self(images), self.num_classes,
            k=self.hparams.k, temperature=self.hparams.temperature, chunk_size=self.hparams.chunk_size,
        )  # fmt: skip
        for name, metric in self.metrics.items():
            metric.update(scores, labels)
            self.log(f"knn/{name}", metric, prog_bar=name == "top1", batch_size=images.shape[0])

    def validation_step(self, batch, batch_idx: int) -> None:
        self._knn_step(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._knn_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._bank = None  # free the memory until the next epoch

    def on_test_epoch_end(self) -> None:
        self._bank = None


# ---------------------------------------------------------------------------- callback
class KNNMonitor(L.Callback):
    """Logs ``knn/top1`` (and ``knn/top5``) of ``pl_module.encoder``'s cls features at the end of
    every ``every_n_epochs``-th validation epoch of a training run (not in the sanity check).

    Bank: a fixed, seeded random subset of ``max_train_samples`` samples of the data module's train
    split (None: all of it); queries: the whole validation split; both with the evaluation
    transform. Rank zero computes and broadcasts the numbers, every rank logs them, so they can be
    monitored (``ModelCheckpoint(monitor="knn/top1", mode="max")``). Skipped, with one warning,
    when the data has no labels.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        k: int = 20,
        temperature: float = 0.07,
        max_train_samples: int | None = 10000,
        pool: Literal["cls", "mean"] = "cls",
    ) -> None:
        super().__init__()
        if every_n_epochs < 1 or k < 1 or temperature <= 0:
            raise ValueError("every_n_epochs and k must be >= 1 and temperature > 0")
        if max_train_samples is not None and max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1 or None, got {max_train_samples}")
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature
        self.max_train_samples, self.pool = max_train_samples, pool
        self._disabled = False
        self.last: dict[str, float] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._disabled or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        encoder = getattr(pl_module, "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise AttributeError(
                f"KNNMonitor needs the LightningModule's encoder; {type(pl_module).__name__} has no `encoder`"
            )
        try:
            num_classes = _num_classes(trainer.datamodule, "KNNMonitor")
        except DataError as err:
            rank_zero_warn(f"{err}: kNN monitoring is off for this run")
            self._disabled = True
            return
        result = self.evaluate(trainer, encoder, num_classes) if trainer.is_global_zero else None
        result = trainer.strategy.broadcast(result, src=0)
        self.last = result
        for name, value in result.items():
            # the same value on every rank: sync_dist averages identical numbers (and keeps Lightning quiet)
            pl_module.log(f"knn/{name}", value, prog_bar=name == "top1", sync_dist=True)

    def evaluate(self, trainer: L.Trainer, encoder: nn.Module, num_classes: int) -> dict[str, float]:
        dm = trainer.datamodule
        device = next(encoder.parameters()).device
        train_loader = _subset(dm.feature_dataloader("train"), self.max_train_samples)
        with trainer.precision_plugin.forward_context():
            bank = _labelled(*extract_features(encoder, train_loader, device, pool=self.pool))
            queries = _labelled(
                *extract_features(encoder, dm.feature_dataloader("val"), device, pool=self.pool)
            )
        return knn_accuracy(*bank, *queries, num_classes, k=self.k, temperature=self.temperature)


def _subset(loader: DataLoader, n: int | None, seed: int = 0) -> DataLoader:
    """The same loader over a seeded random subset of ``n`` samples (kept in order)."""
    size = len(loader.dataset)
    if n is None or n >= size:
        return loader
    idx = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return DataLoader(
        Subset(loader.dataset, idx.tolist()),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )

"""``ImageDataModule``: a LightningDataModule over anything ``datasets`` can open.

Batches are tuples ``(images, labels)``: ``images`` a float tensor ``(B, 3, image_size,
image_size)`` normalised with ``mean`` / ``std``, ``labels`` a long tensor ``(B,)`` (-1 where the
dataset has no label column or a sample has no label).

Distributed training: the train loader is a plain shuffled loader and Lightning swaps in its
``DistributedSampler`` (``use_distributed_sampler=True``, the default), which shards and reshuffles
every epoch. For validation / test Lightning's ``DistributedSampler`` would pad the last shard by
repeating up to ``world_size - 1`` samples, so metrics would count those samples twice. With
``exact_distributed_eval=True`` (the default) the val/test loaders instead carry Lightning's
``UnrepeatedDistributedSampler`` when the trainer runs on more than one process: every sample is
evaluated exactly once, and ranks may run one batch more or fewer than each other. That is safe
for metrics that are reduced at the end of the epoch (torchmetrics, ``self.log(...,
sync_dist=True)`` with the default ``on_epoch=True`` in validation); do not run per-step
collectives (``all_gather``, ``on_step=True`` with ``sync_dist``) in ``validation_step`` then, or
set ``exact_distributed_eval=False`` to get Lightning's padded sampler back. Predict loaders are
left to Lightning, which already uses the unrepeated sampler for them.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from vimssl.data.dataset import ImageSplitDataset, SkipBadCollate
from vimssl.data.errors import DataError
from vimssl.data.quickstart import QUICKSTART_MEAN, QUICKSTART_STD
from vimssl.data.sources import (
    QUICKSTART_NAME,
    VAL_SPLIT_NAMES,
    get_split,
    label_kind,
    open_dataset,
    pick_image_column,
    pick_label_column,
    read_labels,
    split_indices,
)
from vimssl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_train_transform,
)

__all__ = ["ImageDataModule", "ImageSplitDataset", "SkipBadCollate"]

log = logging.getLogger(__name__)

_STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}


class ImageDataModule(L.LightningDataModule):
    """Image classification / pretraining data from the Hub, local folders or files, or the built-in digits.

    Args:
        dataset: what to open (see :func:`vimssl.data.open_dataset`): ``"quickstart"`` (built-in
            scikit-learn digits, no network), a Hub id (``"cifar10"``, ``"ILSVRC/imagenet-1k"``), a
            local folder (class sub-folders of images, data files, or a ``save_to_disk`` folder), a
            local data file (``.parquet``/``.arrow``/...), or a packaged builder (``"imagefolder"``,
            ``"parquet"``, ...) together with ``data_dir`` / ``data_files``.
        config_name: the dataset configuration (``name=`` of ``datasets.load_dataset``).
        data_dir: ``data_dir`` of ``datasets.load_dataset`` (the folder for ``"imagefolder"``).
        data_files: ``data_files`` of ``datasets.load_dataset``: a path / glob, a list, or a
            ``{split: path(s)}`` mapping.
        revision: Hub revision (branch, tag or commit).
        cache_dir: where ``datasets`` caches downloads and prepared arrow files.
        train_split: split to train on.
        val_split: validation split. None: the first of ``validation``, ``val``, ``valid``,
            ``dev``, ``test`` that exists, else ``val_fraction`` of the train split is carved out
            (seeded, stratified by label). Setting it to ``train_split`` always carves it out.
        test_split: None: ``test`` if it exists, else the validation data.
        predict_split: None: the test data.
        val_fraction: fraction of the train split carved out for validation when needed; 0 with
            no validation split means no validation.
        train_fraction: keep this fraction of the (remaining) train split, a seeded, stratified
            subset (low-label fine-tuning / linear probing). 1.0 keeps everything.
        image_column: image column; None: the only ``Image()`` column, else the only column with a
            usual image name (image, img, ...).
        label_column: label column; None: the only ``ClassLabel`` column, else the only integer
            or string column with a usual label name (label, labels, fine_label, ...), else no
            labels (all -1).
        image_size: side of the square crops fed to the model.
        crop_scale: ``RandomResizedCrop`` area range for training.
        crop_ratio: ``RandomResizedCrop`` aspect-ratio range for training.
        hflip_prob: probability of a horizontal flip in training (0 disables it).
        randaugment_magnitude: RandAugment magnitude for training (e.g. 9, fine-tuning recipes);
            None disables it. randaugment_num_ops: operations per image.
        random_erasing: probability of random erasing after normalisation in training (e.g. 0.25).
        crop_pct: evaluation resizes the shorter side to ``int(image_size / crop_pct)`` and
            centre-crops ``image_size``.
        interpolation: resampling filter for resizing.
        mean: per-channel normalisation mean; None: ImageNet's, or the digits' own statistics for
            ``"quickstart"``.
        std: per-channel normalisation std; None: as for ``mean``.
        batch_size: training batch size (per process).
        eval_batch_size: val/test/predict batch size; None: ``batch_size``.
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory (only when CUDA is available).
        persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``).
        drop_last: drop the last incomplete training batch (kept anyway when the train split is
            smaller than one batch).
        seed: seed for carving the validation split and drawing the ``train_fraction`` subset.
        skip_bad_images: skip (and count, see :attr:`num_skipped_images`) samples whose image cannot
            be decoded, instead of raising a :class:`DataError`.
        exact_distributed_eval: under multi-process training, evaluate each val/test sample exactly
            once (see the module docstring); False: Lightning's padded ``DistributedSampler``.
    """

    def __init__(
        self,
        dataset: str = QUICKSTART_NAME,
        config_name: str | None = None,
        data_dir: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        predict_split: str | None = None,
        val_fraction: float = 0.1,
        train_fraction: float = 1.0,
        image_column: str | None = None,
        label_column: str | None = None,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        randaugment_magnitude: int | None = None,
        randaugment_num_ops: int = 2,
        random_erasing: float = 0.0,
        crop_pct: float = 0.875,
        interpolation: Literal["bilinear", "bicubic"] = "bicubic",
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        drop_last: bool = True,
        seed: int = 0,
        skip_bad_images: bool = False,
        exact_distributed_eval: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 < train_fraction <= 1.0:
            raise DataError(f"train_fraction must be in (0, 1], got {train_fraction}")
        if image_size <= 0 or batch_size <= 0:
            raise DataError(f"image_size and batch_size must be positive, got {image_size} and {batch_size}")
        if not 0.0 < crop_pct <= 1.0:
            raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.dataset = dataset
        self.config_name = config_name
        self.data_dir = data_dir
        self.data_files = data_files
        self.revision = revision
        self.cache_dir = cache_dir
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.predict_split = predict_split
        self.val_fraction = val_fraction
        self.train_fraction = train_fraction
        self.image_column = image_column
        self.label_column = label_column
        self.image_size = int(image_size)
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.hflip_prob = hflip_prob
        self.randaugment_magnitude = randaugment_magnitude
        self.randaugment_num_ops = randaugment_num_ops
        if not 0.0 <= random_erasing <= 1.0:
            raise DataError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
        self.random_erasing = random_erasing
        self.crop_pct = crop_pct
        self.interpolation = interpolation
        quickstart = dataset.strip().lower() == QUICKSTART_NAME
        self.mean = tuple(mean) if mean is not None else (QUICKSTART_MEAN if quickstart else IMAGENET_MEAN)
        self.std = tuple(std) if std is not None else (QUICKSTART_STD if quickstart else IMAGENET_STD)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise DataError(f"mean and std need 3 values (R, G, B), got {self.mean} and {self.std}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last
        self.seed = seed
        self.skip_bad_images = skip_bad_images
        self.exact_distributed_eval = exact_distributed_eval
        if quickstart and any(v is not None for v in (config_name, data_dir, data_files, revision)):
            rank_zero_warn(
                "config_name, data_dir, data_files and revision are ignored for the 'quickstart' dataset"
            )

        self._raw: Any = None
        self._resolved: dict[str, Any] | None = None
        self.train_dataset: ImageSplitDataset | None = None
        self.val_dataset: ImageSplitDataset | None = None
        self.test_dataset: ImageSplitDataset | None = None
        self.predict_dataset: ImageSplitDataset | None = None

    # ----------------------------------------------------------------- opening / resolving

    def _open(self) -> Any:
        if self._raw is None:
            self._raw = open_dataset(
                self.dataset,
                config_name=self.config_name,
                data_dir=self.data_dir,
                data_files=self.data_files,
                revision=self.revision,
                cache_dir=self.cache_dir,
            )
            if len(self._raw) == 0:
                raise DataError(f"dataset {self.dataset!r} has no splits")
        return self._raw

    def prepare_data(self) -> None:
        """Download and prepare (cache) the dataset; runs once per node before :meth:`setup`."""
        self._open()

    def _where(self, split: str) -> str:
        return f"split {split!r} of dataset {self.dataset!r}"

    def _check_columns(
        self, ds: Any, split: str, image_column: str, label_column: str | None, need_label: bool
    ) -> bool:
        """Check that ``ds`` has the columns; return whether it has the label column."""
        columns = list(ds.column_names)
        if image_column not in columns:
            raise DataError(
                f"image_column {image_column!r} not found in {self._where(split)}; available columns: {columns}"
            )
        if label_column is None:
            return False
        if label_column not in columns:
            if need_label:
                raise DataError(
                    f"label_column {label_column!r} not found in {self._where(split)}; available columns: {columns}"
                )
            rank_zero_warn(f"{self._where(split)} has no label column {label_column!r}: its labels are -1")
            return False
        return True

    def _resolve(self) -> dict[str, Any]:
        """Pick splits, columns, classes and subsets (no transforms); cached."""
        if self._resolved is not None:
            return self._resolved
        raw = self._open()
        available = list(raw.keys())
        train_full = get_split(raw, self.train_split, "train_split", self.dataset)
        where = self._where(self.train_split)
        if len(train_full) == 0:
            raise DataError(f"{where} is empty")
        image_column = pick_image_column(train_full.features, self.image_column, where)
        label_column = pick_label_column(train_full.features, self.label_column, where)
        kind = label_kind(train_full.features[label_column]) if label_column else None

        # --- validation: a named split, or carved out of train
        carve = False
        if self.val_split is None:
            val_name = next((s for s in VAL_SPLIT_NAMES if s in raw and s != self.train_split), None)
            carve = val_name is None and self.val_fraction > 0
        elif self.val_split == self.train_split:
            val_name, carve = None, True
            if self.val_fraction <= 0:
                raise DataError(
                    f"val_split equals train_split ({self.train_split!r}), so a validation split is carved out "
                    "of it: val_fraction must be in (0, 1)"
                )
        else:
            val_name = self.val_split
            get_split(raw, val_name, "val_split", self.dataset)

        train_labels = read_labels(train_full, label_column) if label_column else None
        train_idx: np.ndarray | None = None
        val_idx: np.ndarray | None = None
        if carve:
            n_val = int(round(self.val_fraction * len(train_full)))
            n_val = min(max(n_val, 1), len(train_full) - 1)
            if len(train_full) < 2:
                raise DataError(
                    f"{where} has {len(train_full)} sample(s): too few to carve out a validation split"
                )
            val_idx, train_idx = split_indices(
                train_labels, n_val, seed=self.seed, stream=0, n=len(train_full)
            )
        if self.train_fraction < 1.0:
            base = train_idx if train_idx is not None else np.arange(len(train_full))
            base_labels = train_labels[base] if train_labels is not None else None
            keep = max(1, int(round(self.train_fraction * len(base))))
            taken, _ = split_indices(base_labels, keep, seed=self.seed, stream=1, n=len(base))
            train_idx = base[taken]

        splits: dict[str, dict[str, Any]] = {}
        train_ds = train_full.select(train_idx, keep_in_memory=True) if train_idx is not None else train_full
        splits["train"] = dict(
            data=train_ds, name=self.train_split, source=self.train_split, indices=train_idx
        )
        if carve:
            val_ds = train_full.select(val_idx, keep_in_memory=True)
            splits["val"] = dict(data=val_ds, name="val", source=self.train_split, indices=val_idx)
        elif val_name is not None:
            splits["val"] = dict(data=raw[val_name], name=val_name, source=val_name, indices=None)

        test_name = self.test_split
        if test_name is None and "test" in raw and "test" != self.train_split:
            test_name = "test"
        if test_name is not None:
            splits["test"] = dict(
                data=get_split(raw, test_name, "test_split", self.dataset),
                name=test_name,
                source=test_name,
                indices=None,
            )
        elif "val" in splits:
            splits["test"] = splits["val"]
        if self.predict_split is not None:
            splits["predict"] = dict(
                data=get_split(raw, self.predict_split, "predict_split", self.dataset),
                name=self.predict_split,
                source=self.predict_split,
                indices=None,
            )
        elif "test" in splits:
            splits["predict"] = splits["test"]

        for role, info in splits.items():
            need_label = role in ("train", "val")
            info["has_label"] = self._check_columns(
                info["data"], info["name"], image_column, label_column, need_label
            )
            if len(info["data"]) == 0:
                raise DataError(f"{self._where(info['name'])} ({role}) is empty")

        # --- classes
        class_names: list[str] | None = None
        has_class_names = False
        label_to_index: dict[str, int] | None = None
        if kind == "classlabel":
            class_names = list(train_full.features[label_column].names)
            has_class_names = True
            for info in splits.values():
                feature = info["data"].features.get(label_column) if info["has_label"] else None
                if (
                    feature is not None
                    and label_kind(feature) == "classlabel"
                    and list(feature.names) != class_names
                ):
                    raise DataError(
                        f"the ClassLabel names of {self._where(info['name'])} differ from those of {where}: "
                        f"{list(feature.names)[:10]}... vs {class_names[:10]}..."
                    )
        elif kind is not None:
            label_arrays = [train_labels]
            seen = {self.train_split}
            for info in splits.values():
                if info["has_label"] and info["source"] not in seen:
                    seen.add(info["source"])
                    label_arrays.append(read_labels(raw[info["source"]], label_column))
            if kind == "str":
                class_names = sorted({v for arr in label_arrays for v in arr if v is not None})
                label_to_index = {name: i for i, name in enumerate(class_names)}
                has_class_names = True
            else:
                top = max((int(arr.max()) for arr in label_arrays if len(arr)), default=-1)
                class_names = [str(i) for i in range(top + 1)] if top >= 0 else None

        self._resolved = dict(
            available=available,
            image_column=image_column,
            label_column=label_column,
            label_kind=kind,
            class_names=class_names,
            has_class_names=has_class_names,
            label_to_index=label_to_index,
            splits=splits,
        )
        return self._resolved

    # ----------------------------------------------------------------- metadata

    @property
    def num_classes(self) -> int | None:
        """Number of classes (None without a label column). Opens the dataset if needed."""
        names = self._resolve()["class_names"]
        return len(names) if names is not None else None

    @property
    def class_names(self) -> list[str] | None:
        """Class names: ``ClassLabel`` names, the sorted string labels, or ``str(i)`` for plain integer
        labels; None without a label column. Opens the dataset if needed."""
        names = self._resolve()["class_names"]
        return list(names) if names is not None else None

    @property
    def image_column_name(self) -> str:
        """The image column in use (given or auto-detected)."""
        return self._resolve()["image_column"]

    @property
    def label_column_name(self) -> str | None:
        """The label column in use (given or auto-detected), None for unlabelled data."""
        return self._resolve()["label_column"]

    def require_class_names(self) -> list[str]:
        """The real class names, or a :class:`DataError` if the labels have none (no label column, or
        plain integer labels without ``ClassLabel`` names)."""
        info = self._resolve()
        column = info["label_column"]
        if column is None:
            columns = list(self._open()[self.train_split].column_names)
            raise DataError(
                f"class names are required, but {self._where(self.train_split)} has no label column "
                f"(columns: {columns}); set label_column to a ClassLabel, integer or string column"
            )
        if not info["has_class_names"]:
            raise DataError(
                f"class names are required, but label_column {column!r} of dataset {self.dataset!r} holds plain "
                "integers without names; cast it to datasets.ClassLabel(names=[...]) or use string labels"
            )
        return list(info["class_names"])

    @property
    def num_skipped_images(self) -> dict[str, int]:
        """Per split, the distinct samples skipped so far because their image could not be decoded."""
        out = {}
        for role in ("train", "val", "test", "predict"):
            ds = getattr(self, f"{role}_dataset")
            if ds is not None:
                out[role] = ds.num_skipped
        return out

    # ----------------------------------------------------------------- setup / loaders

    def _make_split(self, role: str, augment: bool | None = None) -> ImageSplitDataset:
        info = self._resolve()
        split = info["splits"][role]
        if augment if augment is not None else role == "train":
            transform = build_train_transform(
                self.image_size,
                scale=self.crop_scale,
                ratio=self.crop_ratio,
                hflip=self.hflip_prob,
                mean=self.mean,
                std=self.std,
                interpolation=self.interpolation,
                randaugment_magnitude=self.randaugment_magnitude,
                randaugment_num_ops=self.randaugment_num_ops,
                random_erasing=self.random_erasing,
            )
        else:
            transform = build_eval_transform(
                self.image_size,
                crop_pct=self.crop_pct,
                mean=self.mean,
                std=self.std,
                interpolation=self.interpolation,
            )
        return ImageSplitDataset(
            split["data"],
            image_column=info["image_column"],
            label_column=info["label_column"] if split["has_label"] else None,
            transform=transform,
            split=split["name"],
            label_to_index=info["label_to_index"],
            skip_bad_images=self.skip_bad_images,
            source_indices=split["indices"],
            source_split=split["source"],
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the torch datasets for ``stage`` (all of them when None)."""
        info = self._resolve()
        roles = (
            _STAGE_SPLITS.get(stage, ("train", "val", "test", "predict"))
            if stage
            else ("train", "val", "test", "predict")
        )
        built = []
        for role in roles:
            attr = f"{role}_dataset"
            if getattr(self, attr) is None and role in info["splits"]:
                setattr(self, attr, self._make_split(role))
                built.append(f"{role}={info['splits'][role]['name']}({len(getattr(self, attr))})")
        if built:
            rank_zero_info(
                f"ImageDataModule: dataset={self.dataset!r} image_column={info['image_column']!r} "
                f"label_column={info['label_column']!r} num_classes={self.num_classes} splits: {', '.join(built)}"
            )

    def _loader(
        self, ds: ImageSplitDataset, batch_size: int, shuffle: bool, drop_last: bool, sampler: Any = None
    ) -> DataLoader:
        workers = max(0, int(self.num_workers))
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=workers,
            pin_memory=bool(self.pin_memory and torch.cuda.is_available()),
            persistent_workers=bool(self.persistent_workers and workers > 0),
            drop_last=drop_last,
            collate_fn=SkipBadCollate(self.image_size),
        )

    def _world_size(self) -> int:
        trainer = self._trainer_or_none()
        return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def _require(self, role: str) -> ImageSplitDataset:
        ds = getattr(self, f"{role}_dataset")
        if ds is None:
            self.setup({"train": "fit", "val": "validate"}.get(role, role))
            ds = getattr(self, f"{role}_dataset")
        if ds is None:
            raise DataError(
                f"dataset {self.dataset!r} has no {role} data (available splits: {self._resolve()['available']})"
            )
        return ds

    def train_dataloader(self) -> DataLoader:
        ds = self._require("train")
        drop_last = self.drop_last
        if drop_last and len(ds) < self.batch_size * self._world_size():
            rank_zero_warn(
                f"the train split has {len(ds)} samples, fewer than one batch ({self.batch_size} x "
                f"{self._world_size()} processes): keeping the incomplete batch instead of dropping it"
            )
            drop_last = False
        return self._loader(ds, self.batch_size, shuffle=True, drop_last=drop_last)

    def _eval_sampler(self, ds: ImageSplitDataset) -> Any:
        trainer = self._trainer_or_none()
        if not self.exact_distributed_eval or trainer is None:
            return None
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None)
        if not kwargs or int(kwargs.get("num_replicas", 1)) <= 1:
            return None
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        return UnrepeatedDistributedSampler(
            ds, num_replicas=kwargs["num_replicas"], rank=kwargs["rank"], shuffle=False
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None and "val" not in self._resolve()["splits"]:
            return []  # no validation split and val_fraction=0: no validation
        ds = self._require("val")
        return self._loader(
            ds, self.eval_batch_size, shuffle=False, drop_last=False, sampler=self._eval_sampler(ds)
        )

    def test_dataloader(self) -> DataLoader:
        ds = self._require("test")
        return self._loader(
            ds, self.eval_batch_size, shuffle=False, drop_last=False, sampler=self._eval_sampler(ds)
        )

    def feature_dataloader(self, role: str = "train") -> DataLoader:
        """A loader over ``role``'s split with the *evaluation* transform, in order, nothing dropped:
        for feature extraction (kNN, frozen features). Not sharded across processes."""
        if role not in self._resolve()["splits"]:
            raise DataError(f"dataset {self.dataset!r} has no {role} data")
        ds = self._make_split(role, augment=False)
        return self._loader(ds, self.eval_batch_size, shuffle=False, drop_last=False)

    def predict_dataloader(self) -> DataLoader:
        ds = self._require("predict")
        return self._loader(ds, self.eval_batch_size, shuffle=False, drop_last=False)

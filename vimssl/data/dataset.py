"""Torch-side pieces of the data module: one split of a ``datasets.Dataset`` as a map-style torch
dataset of ``(image, label)`` with bad-image handling, and the collate function that drops
undecodable samples."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from vimssl.data.errors import DataError
from vimssl.data.transforms import decode_image

log = logging.getLogger(__name__)


class ImageSplitDataset(torch.utils.data.Dataset):
    """One split of a ``datasets.Dataset`` as a map-style torch dataset of ``(image, label)``.

    Images are decoded here with PIL (the image column is read with ``Image(decode=False)``), so a
    file that cannot be decoded raises a :class:`DataError` naming the split and sample. With
    ``skip_bad_images=True`` such a sample is returned as ``None`` instead (drop it with
    :class:`SkipBadCollate`) and flagged in a shared-memory mask, so :attr:`num_skipped` counts
    the distinct bad samples seen so far across all DataLoader worker processes.
    """

    def __init__(
        self,
        data: Any,
        image_column: str,
        label_column: str | None = None,
        transform: Callable[[Any], torch.Tensor] | None = None,
        split: str = "train",
        label_to_index: dict[str, int] | None = None,
        skip_bad_images: bool = False,
        source_indices: np.ndarray | None = None,
        source_split: str | None = None,
    ) -> None:
        import datasets

        columns = [image_column] + ([label_column] if label_column else [])
        data = data.select_columns(columns)
        if isinstance(data.features[image_column], datasets.Image):
            data = data.cast_column(image_column, datasets.Image(decode=False))
        self.data = data.with_format(None)
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.split = split
        self.label_to_index = label_to_index
        self.skip_bad_images = skip_bad_images
        self.source_indices = source_indices
        self.source_split = source_split or split
        self._bad = torch.zeros(max(len(self.data), 1), dtype=torch.bool)
        if skip_bad_images:
            self._bad.share_memory_()

    def __len__(self) -> int:
        return len(self.data)

    def _where(self, index: int, value: Any) -> str:
        where = f"sample {index} of split {self.split!r}"
        if self.source_indices is not None:
            where += f" (row {int(self.source_indices[index])} of source split {self.source_split!r})"
        if isinstance(value, dict) and value.get("path"):
            where += f", file {value['path']!r}"
        return where

    def _label(self, value: Any) -> int:
        if value is None:
            return -1
        if self.label_to_index is not None:
            return self.label_to_index[value]
        return int(value)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        index = int(index)
        row = self.data[index]
        value = row[self.image_column]
        try:
            image = decode_image(value)
        except Exception as err:
            where = self._where(index, value)
            if not self.skip_bad_images:
                raise DataError(
                    f"could not decode the image ({self.image_column!r}) of {where}: {type(err).__name__}: {err}. "
                    "Fix or remove the file, or set skip_bad_images=True to skip undecodable images"
                ) from err
            if not bool(self._bad[index]):
                self._bad[index] = True
                log.warning("skipping undecodable image of %s: %s: %s", where, type(err).__name__, err)
            return None
        label = self._label(row[self.label_column]) if self.label_column else -1
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    @property
    def num_skipped(self) -> int:
        """Distinct samples skipped so far because their image could not be decoded."""
        return int(self._bad[: len(self)].sum())

    @property
    def skipped_indices(self) -> list[int]:
        """Indices (into this split) of the samples skipped so far."""
        return torch.nonzero(self._bad[: len(self)]).flatten().tolist()


class SkipBadCollate:
    """``default_collate`` that drops ``None`` samples (undecodable images).

    A batch whose samples were all dropped becomes ``(empty (0, 3, H, W) float, empty (0,) long)``.
    """

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, batch: Sequence[Any]) -> Any:
        kept = [sample for sample in batch if sample is not None]
        if not kept:
            size = self.image_size
            return torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.long)
        return default_collate(kept)

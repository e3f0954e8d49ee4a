"""Image data for pretraining and transfer: a ``datasets``-backed LightningDataModule.

Imported only explicitly (``import vimssl.data``); it imports Lightning, torchvision and, when a
dataset is opened, ``datasets``.

* :class:`ImageDataModule`: the LightningDataModule (``data.class_path: vimssl.data.ImageDataModule``).
* :func:`open_dataset`: open a Hub id, local folder / file, ``save_to_disk`` folder or the built-in
  ``"quickstart"`` digits as a ``datasets.DatasetDict``.
* :func:`load_quickstart`: the built-in digits (scikit-learn, no network, in memory).
* :class:`DataError`: the ``ValueError`` raised for bad data input.
"""

from vimssl.data.datamodule import ImageDataModule
from vimssl.data.dataset import ImageSplitDataset, SkipBadCollate
from vimssl.data.errors import DataError
from vimssl.data.quickstart import QUICKSTART_MEAN, QUICKSTART_STD, load_quickstart
from vimssl.data.sources import is_saved_dataset, open_dataset, split_indices
from vimssl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_train_transform,
    decode_image,
    to_rgb,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "QUICKSTART_MEAN",
    "QUICKSTART_STD",
    "DataError",
    "ImageDataModule",
    "ImageSplitDataset",
    "SkipBadCollate",
    "build_eval_transform",
    "build_train_transform",
    "decode_image",
    "is_saved_dataset",
    "load_quickstart",
    "open_dataset",
    "split_indices",
    "to_rgb",
]

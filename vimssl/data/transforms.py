"""Image decoding, colour-mode normalisation and the train / eval transform pipelines.

Every image is decoded here (never inside ``datasets``), converted to 8-bit RGB, and then
handed to a torchvision ``transforms.v2`` pipeline that returns a normalised float tensor
``(3, image_size, image_size)``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_eval_transform",
    "build_train_transform",
    "decode_image",
    "to_rgb",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB image.

    Grey-scale (``L``, ``1``), palette (``P``, with or without transparency), ``LA``/``RGBA``
    (alpha dropped), ``CMYK`` and ``YCbCr`` go through PIL's own conversion. 16/32-bit integer
    and float grey images (``I;16``, ``I``, ``F``) are rescaled to 0..255 first, because PIL
    would otherwise clip them.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 257.0
        elif img.mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _array_to_pil(value: Any) -> Image.Image:
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def decode_image(value: Any) -> Image.Image:
    """Decode one stored image value into a fully loaded RGB PIL image.

    Accepts what a ``datasets`` image column holds with ``Image(decode=False)`` (a dict with
    ``bytes`` and/or ``path``), raw encoded bytes, a file path, an already decoded PIL image, or
    an ``(H, W)`` / ``(H, W, C)`` / ``(C, H, W)`` array. Raises whatever PIL raises for a file it
    cannot read; callers turn that into a :class:`~vimssl.data.DataError`.
    """
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            img = Image.open(io.BytesIO(data))
        elif path:
            if os.path.isfile(path):
                img = Image.open(path)
            else:  # remote or inside an archive: let datasets resolve it
                import datasets

                img = datasets.Image().decode_example(value)
        else:
            raise ValueError("the image value is empty (neither bytes nor a path)")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, (str, os.PathLike)):
        img = Image.open(value)
    elif value is None:
        raise ValueError("the image is missing (None)")
    else:
        img = _array_to_pil(value)
    img.load()  # decode now, so truncated / corrupt files fail here
    return to_rgb(img)


def _interp(name: str) -> v2.InterpolationMode:
    try:
        return _INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {name!r}") from None


def _tail(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def build_train_transform(
    image_size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
    randaugment_magnitude: int | None = None,
    randaugment_num_ops: int = 2,
    random_erasing: float = 0.0,
) -> v2.Compose:
    """RandomResizedCrop(image_size, scale, ratio) -> RandomHorizontalFlip(hflip) -> [RandAugment]
    -> float tensor -> Normalize -> [RandomErasing(p=random_erasing)]."""
    ops: list[v2.Transform] = [
        v2.RandomResizedCrop(
            image_size, scale=tuple(scale), ratio=tuple(ratio), interpolation=_interp(interpolation)
        )
    ]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip))
    if randaugment_magnitude is not None:
        ops.append(
            v2.RandAugment(
                num_ops=randaugment_num_ops,
                magnitude=randaugment_magnitude,
                interpolation=_interp(interpolation),
            )
        )
    ops += _tail(mean, std)
    if random_erasing > 0:
        ops.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(ops)


def build_eval_transform(
    image_size: int,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> v2.Compose:
    """Resize(int(image_size / crop_pct)) (shorter side) -> CenterCrop(image_size) -> float tensor -> Normalize."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize = int(image_size / crop_pct)
    return v2.Compose(
        [v2.Resize(resize, interpolation=_interp(interpolation)), v2.CenterCrop(image_size)]
        + _tail(mean, std)
    )

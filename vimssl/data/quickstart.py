"""The built-in ``quickstart`` dataset: scikit-learn's bundled handwritten digits.

1,797 real 8x8 grey-scale digit images (values 0..16, 10 classes) ship inside scikit-learn, so
this dataset needs no network and no disk. :func:`load_quickstart` turns them into a
``datasets.DatasetDict`` with

* ``image``: an ``Image()`` column of PIL ``L`` images, scaled to 0..255 and upscaled from 8x8 to
  ``size x size`` (32 by default) with bicubic interpolation (smooth strokes, values clipped to
  0..255);
* ``label``: a ``ClassLabel`` column with names ``"0"`` .. ``"9"``;

split into a fixed ``train`` (1,500 images) and ``test`` (297 images) split: stratified by class
and drawn with a fixed seed, so it is the same on every machine and every call. The result is
built once per process and kept in memory (well under a second).

Normalisation: the digits are white strokes on black, far from ImageNet statistics, so the data
module normalises them with their own statistics, :data:`QUICKSTART_MEAN` / :data:`QUICKSTART_STD`
(the pixel mean / std of the 32x32 train split, the same for all three RGB channels).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "QUICKSTART_MEAN",
    "QUICKSTART_NUM_TRAIN",
    "QUICKSTART_SEED",
    "QUICKSTART_SIZE",
    "QUICKSTART_STD",
    "load_quickstart",
]

QUICKSTART_SIZE = 32
QUICKSTART_NUM_TRAIN = 1500
QUICKSTART_SEED = 0
# Pixel statistics of the 32x32 train split (grey, repeated for R, G, B).
QUICKSTART_MEAN: tuple[float, float, float] = (0.3094, 0.3094, 0.3094)
QUICKSTART_STD: tuple[float, float, float] = (0.3491, 0.3491, 0.3491)


def load_quickstart(size: int = QUICKSTART_SIZE):
    """Return the digits as a ``DatasetDict`` with ``train`` (1,500) and ``test`` (297) splits.

    The arrow data is built once per ``size`` and cached in memory; every call returns fresh
    ``Dataset`` objects over it, so changing their format does not affect later calls.
    """
    import datasets

    cached = _build(int(size))
    return datasets.DatasetDict({name: ds.with_format(None) for name, ds in cached.items()})


@functools.lru_cache(maxsize=4)
def _build(size: int):
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    from vimssl.data.sources import split_indices

    if size < 8:
        raise ValueError(f"quickstart size must be at least 8 (the digits are 8x8), got {size}")
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = []
    for arr in pixels:
        img = Image.fromarray(arr, mode="L")
        if size != 8:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        images.append(img)
    labels = digits.target.astype(np.int64)

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    train_idx, test_idx = split_indices(labels, QUICKSTART_NUM_TRAIN, seed=QUICKSTART_SEED, stream=0)

    def make(indices: np.ndarray, split: str):
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in indices], "label": labels[indices].tolist()},
            features=features,
            split=split,
        )

    return datasets.DatasetDict({"train": make(train_idx, "train"), "test": make(test_idx, "test")})

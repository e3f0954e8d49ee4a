"""Opening datasets, and picking splits, columns and reproducible subsets.

Everything here raises :class:`~vimssl.data.DataError` with a message that names the dataset,
split or column at fault and says what exists instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vimssl.data.errors import DataError

__all__ = [
    "IMAGE_COLUMN_NAMES",
    "LABEL_COLUMN_NAMES",
    "QUICKSTART_NAME",
    "VAL_SPLIT_NAMES",
    "get_split",
    "is_saved_dataset",
    "label_kind",
    "open_dataset",
    "pick_image_column",
    "pick_label_column",
    "read_labels",
    "split_indices",
]

QUICKSTART_NAME = "quickstart"
#: Split names tried, in order, for the validation split when ``val_split`` is None.
VAL_SPLIT_NAMES = ("validation", "val", "valid", "dev", "test")
#: Column names taken as the image column when no column has an ``Image()`` feature.
IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "picture", "jpg", "jpeg", "png", "webp")
#: Column names taken as the label column when no column has a ``ClassLabel`` feature.
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target", "targets", "cls", "category")

# Markers of a folder written by ``Dataset.save_to_disk`` (state.json + dataset_info.json) or
# ``DatasetDict.save_to_disk`` (dataset_dict.json).
_SAVED_MARKERS = ("dataset_dict.json", "state.json")
_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".tar": "webdataset",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FALLBACK_BUILDERS = frozenset(
    {"arrow", "csv", "imagefolder", "json", "pandas", "parquet", "text", "webdataset", "hdf5"}
)


def _packaged_builders() -> frozenset[str]:
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        return frozenset(_PACKAGED_DATASETS_MODULES)
    except Exception:  # private API: fall back to the common ones
        return _FALLBACK_BUILDERS


def is_saved_dataset(path: str | Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    path = Path(path)
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS)


def _looks_like_path(name: str) -> bool:
    if name.startswith((".", "~", "/")) or "\\" in name or not _HUB_ID.match(name):
        return True
    return Path(name).suffix.lower() in _FILE_BUILDERS


def _as_dict(obj: Any, origin: str):
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        return obj
    if isinstance(obj, datasets.Dataset):
        # A single saved Dataset: expose it under its own split name, else "train".
        name = str(obj.split) if obj.split is not None else "train"
        return datasets.DatasetDict({name: obj})
    raise DataError(
        f"{origin} gave a {type(obj).__name__}; only map-style (non-streaming) datasets are supported"
    )


def _load_dataset(path: str, origin: str, **kwargs: Any):
    import datasets

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        obj = datasets.load_dataset(path, **kwargs)
    except DataError:
        raise
    except Exception as err:
        hint = ""
        if isinstance(err, ConnectionError):
            hint = (
                " (check the name and the network; a dataset already in the cache opens without network "
                "with HF_HUB_OFFLINE=1, gated datasets need `hf auth login` or HF_TOKEN)"
            )
        raise DataError(f"could not open {origin}: {type(err).__name__}: {err}{hint}") from err
    return _as_dict(obj, origin)


def open_dataset(
    dataset: str,
    *,
    config_name: str | None = None,
    data_dir: str | None = None,
    data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
):
    """Open ``dataset`` as a ``datasets.DatasetDict`` (every split it has).

    ``dataset`` is, in the order tried:

    1. ``"quickstart"``: the built-in digits (:mod:`vimssl.data.quickstart`);
    2. an existing local path: a ``save_to_disk`` folder (found by its ``dataset_dict.json`` /
       ``state.json``) is opened with ``datasets.load_from_disk``; a single data file
       (``.parquet``, ``.arrow``, ``.csv``, ``.json[l]``, ``.tar``) with the matching packaged
       builder; any other folder with ``datasets.load_dataset(folder)``, which infers the format
       (class sub-folders of images become an ``imagefolder`` with a ``ClassLabel`` column);
    3. a packaged builder name (``"imagefolder"``, ``"parquet"``, ``"arrow"``, ...) together with
       ``data_dir`` and/or ``data_files``;
    4. a Hugging Face Hub dataset id (``"cifar10"``, ``"ILSVRC/imagenet-1k"``), downloaded and
       cached by ``datasets`` (under ``cache_dir`` when given).
    """
    import datasets

    if not isinstance(dataset, str) or not dataset.strip():
        raise DataError(
            f"dataset must be a non-empty string (a Hub id, a local path or 'quickstart'), got {dataset!r}"
        )
    dataset = dataset.strip()
    load_kwargs = dict(
        name=config_name, data_dir=data_dir, data_files=data_files, revision=revision, cache_dir=cache_dir
    )

    if dataset.lower() == QUICKSTART_NAME:
        from vimssl.data.quickstart import load_quickstart

        return load_quickstart()

    path = Path(dataset).expanduser()
    if path.exists():
        if is_saved_dataset(path):
            try:
                obj = datasets.load_from_disk(str(path))
            except Exception as err:
                raise DataError(
                    f"could not open the save_to_disk folder {str(path)!r}: {type(err).__name__}: {err}"
                ) from err
            return _as_dict(obj, f"save_to_disk folder {str(path)!r}")
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"cannot tell the format of data file {str(path)!r}: known suffixes are "
                    f"{sorted(_FILE_BUILDERS)}; or pass the builder as dataset (e.g. 'parquet') with data_files"
                )
            if data_files is not None:
                raise DataError(
                    f"dataset is the data file {str(path)!r}, so data_files ({data_files!r}) must not be set"
                )
            load_kwargs["data_files"] = str(path)
            return _load_dataset(builder, f"data file {str(path)!r} (as {builder})", **load_kwargs)
        return _load_dataset(str(path), f"local folder {str(path)!r}", **load_kwargs)

    if dataset in _packaged_builders():
        if data_dir is None and data_files is None:
            raise DataError(
                f"dataset {dataset!r} is a generic '{dataset}' loader: set data_dir (a folder) or data_files"
            )
        if data_dir is not None and not Path(data_dir).expanduser().exists():
            raise DataError(
                f"data_dir {data_dir!r} for dataset {dataset!r} does not exist "
                f"(resolved to {str(Path(data_dir).expanduser().resolve())!r})"
            )
        if data_dir is not None:
            load_kwargs["data_dir"] = str(Path(data_dir).expanduser())
        return _load_dataset(
            dataset, f"{dataset!r} data (data_dir={data_dir!r}, data_files={data_files!r})", **load_kwargs
        )

    resolved = str(path.resolve())
    if _looks_like_path(dataset):
        raise DataError(
            f"dataset path {dataset!r} does not exist (resolved to {resolved!r}); it is not the built-in "
            f"{QUICKSTART_NAME!r} and does not look like a Hugging Face Hub id"
        )
    return _load_dataset(
        dataset,
        f"dataset {dataset!r}: it is not the built-in {QUICKSTART_NAME!r}, not an existing local path "
        f"(looked for {resolved!r}), and loading it from the Hugging Face Hub failed",
        **load_kwargs,
    )


def get_split(splits: Mapping[str, Any], name: str, argument: str, dataset: str):
    """``splits[name]``, or a DataError listing the available splits."""
    if name not in splits:
        raise DataError(
            f"split {name!r} ({argument}) not found in dataset {dataset!r}; available splits: {sorted(splits)}"
        )
    return splits[name]


def label_kind(feature: Any) -> str | None:
    """``"classlabel"``, ``"int"`` or ``"str"`` for a usable label feature, else None."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return "classlabel"
    if isinstance(feature, datasets.Value):
        dtype = str(feature.dtype)
        if dtype.startswith(("int", "uint")) or dtype == "bool":
            return "int"
        if dtype in ("string", "large_string"):
            return "str"
    return None


def _ambiguous(
    kind: str, candidates: Sequence[str], argument: str, where: str, columns: Sequence[str]
) -> DataError:
    return DataError(
        f"cannot auto-detect the {kind} column of {where}: several candidates {list(candidates)}; "
        f"set {argument} to one of them (columns: {list(columns)})"
    )


def _missing(argument: str, column: str, where: str, columns: Sequence[str]) -> DataError:
    return DataError(f"{argument} {column!r} not found in {where}; available columns: {list(columns)}")


def pick_image_column(features: Mapping[str, Any], requested: str | None, where: str) -> str:
    """The requested column (checked), else the only ``Image()`` column, else the only common image name."""
    import datasets

    columns = list(features)
    if requested is not None:
        if requested not in features:
            raise _missing("image_column", requested, where, columns)
        return requested
    typed = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    if len(typed) == 1:
        return typed[0]
    if len(typed) > 1:
        raise _ambiguous("image", typed, "image_column", where, columns)
    named = [c for c in columns if c.lower() in IMAGE_COLUMN_NAMES]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise _ambiguous("image", named, "image_column", where, columns)
    raise DataError(
        f"no image column found in {where}: no column has an Image() feature or a usual image name "
        f"{list(IMAGE_COLUMN_NAMES)}; set image_column to one of the columns {columns}"
    )


def pick_label_column(features: Mapping[str, Any], requested: str | None, where: str) -> str | None:
    """The requested column (checked), else the only ``ClassLabel`` column, else the only usable
    column with a common label name, else None (unlabelled data)."""
    import datasets

    columns = list(features)
    if requested is not None:
        if requested not in features:
            raise _missing("label_column", requested, where, columns)
        if label_kind(features[requested]) is None:
            raise DataError(
                f"label_column {requested!r} of {where} has type {features[requested]}; expected a ClassLabel, "
                "integer or string column"
            )
        return requested
    typed = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if len(typed) == 1:
        return typed[0]
    if len(typed) > 1:
        raise _ambiguous("label", typed, "label_column", where, columns)
    named = [c for c in columns if c.lower() in LABEL_COLUMN_NAMES and label_kind(features[c]) is not None]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise _ambiguous("label", named, "label_column", where, columns)
    return None


def read_labels(ds: Any, column: str) -> np.ndarray:
    """All values of a label column: int64 with missing values as -1, or an object array of
    strings (None where missing) for string columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(ds) == 0:
        return np.zeros(0, dtype=np.int64)
    table = ds.select_columns([column]).with_format("arrow")[:]
    values = table.column(column)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return np.array(values.to_pylist(), dtype=object)
    values = pc.fill_null(values.cast(pa.int64()), -1)
    return np.asarray(values.to_numpy(), dtype=np.int64)


def split_indices(
    labels: np.ndarray | None, count: int, seed: int, stream: int = 0, n: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` of ``n`` rows reproducibly; return ``(taken, rest)``, both sorted.

    With ``labels`` the draw is stratified: every label value (missing labels included, as one
    group) gets its share of ``count`` by the largest-remainder rule, so class proportions are
    kept as closely as whole numbers allow. ``seed`` and ``stream`` seed a NumPy generator
    (different ``stream`` values give independent draws from one seed).
    """
    if labels is not None:
        labels = np.asarray(labels)
        n = len(labels)
    if n is None:
        raise ValueError("split_indices needs labels or n")
    count = int(min(max(count, 0), n))
    rng = np.random.default_rng([int(seed), int(stream)])
    if labels is None or count in (0, n):
        taken = rng.permutation(n)[:count]
    else:
        keys = np.array([str(v) for v in labels]) if labels.dtype == object else labels
        _, inverse = np.unique(keys, return_inverse=True)
        inverse = inverse.reshape(-1)
        sizes = np.bincount(inverse)
        quotas = sizes * (count / n)
        share = np.floor(quotas).astype(np.int64)
        left = count - int(share.sum())
        if left > 0:
            # largest remainders first; ties broken by a seeded shuffle
            order = rng.permutation(len(sizes))
            order = order[np.argsort(-(quotas - share)[order], kind="stable")]
            share[order[:left]] += 1
        groups = np.split(np.argsort(inverse, kind="stable"), np.cumsum(sizes)[:-1])
        parts = [rng.permutation(members)[:k] for members, k in zip(groups, share)]
        taken = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    taken = np.sort(taken.astype(np.int64))
    mask = np.ones(n, dtype=bool)
    mask[taken] = False
    return taken, np.flatnonzero(mask).astype(np.int64)

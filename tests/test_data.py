"""Tests for vimssl.data: opening datasets, splits, columns, transforms, loaders and errors.

CPU only, no network: every dataset is the built-in quickstart digits or made under tmp_path.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vimssl.data import (
    IMAGENET_MEAN,
    QUICKSTART_MEAN,
    QUICKSTART_STD,
    DataError,
    ImageDataModule,
    build_eval_transform,
    build_train_transform,
    decode_image,
    is_saved_dataset,
    load_quickstart,
    open_dataset,
    split_indices,
    to_rgb,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # datasets reads the offline flag at import time: force it even if it was imported earlier.
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _dm(**kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("image_size", 16)
    kwargs.setdefault("batch_size", 4)
    return ImageDataModule(**kwargs)


def _image(mode: str, size=(20, 14), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode == "RGBA":
        return rgb.convert("RGBA")
    return rgb.convert(mode)


MODES = ["RGB", "L", "RGBA", "P"]


@pytest.fixture
def image_folder(tmp_path):
    """cat/ and dog/ sub-folders, 6 images each, in RGB, grey, RGBA and palette modes and several sizes."""
    root = tmp_path / "images"
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            img = _image(MODES[i % 4], size=(18 + 3 * i, 12 + 2 * c + i), seed=10 * c + i)
            img.save(root / cls / f"{i}.png")
    return root


def _hf_dataset(n=20, image_column="image", label_column="label", names=("a", "b", "c"), extra=None):
    rng = np.random.default_rng(0)
    images = [_image(MODES[i % 4], size=(10 + i % 5, 12), seed=i) for i in range(n)]
    labels = [i % len(names) for i in range(n)]
    columns = {image_column: images, label_column: labels}
    features = {image_column: datasets.Image(), label_column: datasets.ClassLabel(names=list(names))}
    for name, feature in (extra or {}).items():
        columns[name] = rng.integers(0, 2, n).tolist()
        features[name] = feature
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _all_batches(loader):
    return [batch for batch in loader]


# ------------------------------------------------------------------------------ quickstart


def test_quickstart_dataset():
    t0 = time.perf_counter()
    dd = load_quickstart()
    assert time.perf_counter() - t0 < 3.0
    assert set(dd) == {"train", "test"}
    assert len(dd["train"]) == 1500 and len(dd["test"]) == 297
    assert isinstance(dd["train"].features["image"], datasets.Image)
    assert dd["train"].features["label"].names == [str(i) for i in range(10)]
    img = dd["train"][0]["image"]
    assert img.mode == "L" and img.size == (32, 32)
    # fixed, stratified split: the same on every call, every class in both splits
    again = load_quickstart()
    assert np.array_equal(np.asarray(again["test"]["label"]), np.asarray(dd["test"]["label"]))
    assert np.array_equal(np.asarray(again["test"][5]["image"]), np.asarray(dd["test"][5]["image"]))
    assert np.bincount(np.asarray(dd["test"]["label"]), minlength=10).min() >= 29
    # fresh Dataset objects: formatting one does not leak into the next call
    dd["train"].set_format("numpy")
    assert isinstance(load_quickstart()["train"][0]["image"], Image.Image)
    # the documented normalisation statistics match the train split
    pix = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in again["train"]["image"]])
    assert abs(pix.mean() - QUICKSTART_MEAN[0]) < 2e-3 and abs(pix.std() - QUICKSTART_STD[0]) < 2e-3


def test_quickstart_datamodule():
    dm = _dm(dataset="quickstart", image_size=32, batch_size=64)
    assert dm.mean == QUICKSTART_MEAN and dm.std == QUICKSTART_STD
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 10
    assert dm.class_names == [str(i) for i in range(10)]
    assert dm.require_class_names() == dm.class_names
    assert len(dm.train_dataset) == 1500 and len(dm.val_dataset) == 297  # val falls back to "test"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.long and 0 <= y.min() and y.max() <= 9
    assert len(dm.train_dataloader()) == 1500 // 64  # drop_last
    val = _all_batches(dm.val_dataloader())
    assert sum(len(b[1]) for b in val) == 297
    assert abs(torch.cat([b[0] for b in val]).mean().item()) < 0.2  # roughly normalised
    dm.setup("test")
    assert len(dm.test_dataset) == 297
    assert next(iter(dm.predict_dataloader()))[0].shape[1:] == (3, 32, 32)


def test_import_vimssl_stays_light():
    code = "import sys, vimssl; print('datasets' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------------------ local sources


@pytest.mark.parametrize("as_builder", [False, True])
def test_imagefolder_modes_become_rgb(image_folder, tmp_path, as_builder):
    if as_builder:
        dm = _dm(
            dataset="imagefolder",
            data_dir=str(image_folder),
            cache_dir=str(tmp_path / "cache"),
            val_fraction=0.25,
        )
    else:
        dm = _dm(dataset=str(image_folder), cache_dir=str(tmp_path / "cache"), val_fraction=0.25)
    dm.prepare_data()
    dm.setup()
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert len(dm.train_dataset) == 9 and len(dm.val_dataset) == 3
    train = _all_batches(dm.train_dataloader())
    assert len(train) == 2 and all(b[0].shape == (4, 3, 16, 16) for b in train)  # drop_last
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        batches = _all_batches(loader)
        assert sum(len(b[1]) for b in batches) == 3
        assert all(b[0].shape[1:] == (3, 16, 16) and b[0].dtype == torch.float32 for b in batches)
    # every colour mode decodes to RGB
    modes = set()
    for split in (dm.train_dataset, dm.val_dataset):
        for i in range(len(split)):
            value = split.data[i]["image"]
            modes.add(Image.open(value["path"]).mode)
            assert decode_image(value).mode == "RGB"
            assert split[i][0].shape == (3, 16, 16)
    assert modes == {"L", "RGBA", "P", "RGB"}


def test_imagefolder_with_split_folders(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("x", "y"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                _image("RGB", seed=i).save(d / f"{i}.jpg")
    dm = _dm(dataset=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert len(dm.train_dataset) == 8 and len(dm.val_dataset) == 4
    assert dm.val_dataset.split == "validation"  # datasets maps "val" folders to "validation"


def test_parquet_file_and_builder(tmp_path):
    ds = _hf_dataset(
        n=12,
        image_column="img",
        label_column="fine_label",
        extra={"coarse_label": datasets.ClassLabel(names=["p", "q"])},
    )
    path = tmp_path / "train.parquet"
    ds.to_parquet(str(path))
    # two ClassLabel columns: auto-detection must refuse and say which argument to set
    with pytest.raises(DataError, match=r"label column.*\['fine_label', 'coarse_label'\].*set label_column"):
        _dm(dataset=str(path), cache_dir=str(tmp_path / "c1")).setup()
    dm = _dm(dataset=str(path), label_column="fine_label", cache_dir=str(tmp_path / "c1"), val_fraction=0.25)
    dm.setup()
    assert dm.image_column_name == "img" and dm.class_names == ["a", "b", "c"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.long
    dm2 = _dm(
        dataset="parquet",
        data_files={"train": str(path), "test": str(path)},
        label_column="fine_label",
        cache_dir=str(tmp_path / "c2"),
    )
    dm2.setup()
    assert len(dm2.train_dataset) == 12 and len(dm2.val_dataset) == 12  # val falls back to "test"


def test_save_to_disk_dict_and_single(tmp_path):
    dd = datasets.DatasetDict({"train": _hf_dataset(n=10), "validation": _hf_dataset(n=6)})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert is_saved_dataset(tmp_path / "dict")
    dm = _dm(dataset=str(tmp_path / "dict"))
    dm.setup()
    assert len(dm.train_dataset) == 10 and len(dm.val_dataset) == 6 and dm.num_classes == 3
    assert next(iter(dm.val_dataloader()))[0].shape == (4, 3, 16, 16)

    _hf_dataset(n=10).save_to_disk(str(tmp_path / "single"))
    assert is_saved_dataset(tmp_path / "single")
    before = sorted(p.name for p in (tmp_path / "single").iterdir())
    dm = _dm(dataset=str(tmp_path / "single"), val_fraction=0.2)
    dm.setup()
    assert len(dm.train_dataset) == 8 and len(dm.val_dataset) == 2
    _all_batches(dm.train_dataloader())
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == before  # nothing written into it


# ------------------------------------------------------------------------------ splits and subsets


def test_carved_validation_is_reproducible_and_disjoint():
    def carve(seed):
        dm = _dm(dataset="quickstart", val_split="train", val_fraction=0.2, seed=seed)
        dm.setup("fit")
        return dm.train_dataset.source_indices, dm.val_dataset.source_indices, dm

    train, val, dm = carve(0)
    train2, val2, _ = carve(0)
    _, val3, _ = carve(1)
    assert len(val) == 300 and len(train) == 1200
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.union1d(train, val), np.arange(1500))
    assert np.array_equal(val, val2) and np.array_equal(train, train2)
    assert not np.array_equal(val, val3)
    labels = np.asarray(load_quickstart()["train"]["label"])
    assert np.bincount(labels[val], minlength=10).min() >= 28  # stratified: ~30 per class
    dm.setup("test")
    assert dm.test_dataset.split == "test"  # the real test split stays the test split


def test_train_fraction_subset():
    dm = _dm(dataset="quickstart", train_fraction=0.1, seed=3)
    dm.setup("fit")
    idx = dm.train_dataset.source_indices
    assert len(dm.train_dataset) == 150
    labels = np.asarray(load_quickstart()["train"]["label"])
    assert np.bincount(labels[idx], minlength=10).tolist() == [15] * 10
    again = _dm(dataset="quickstart", train_fraction=0.1, seed=3)
    again.setup("fit")
    assert np.array_equal(again.train_dataset.source_indices, idx)
    assert len(dm.val_dataset) == 297  # validation untouched


def test_split_indices_stratified_counts():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    taken, rest = split_indices(labels, 10, seed=0)
    assert np.bincount(labels[taken]).tolist() == [5, 3, 2]
    assert np.array_equal(np.sort(np.concatenate([taken, rest])), np.arange(100))
    taken_u, _ = split_indices(None, 7, seed=0, n=100)
    assert len(taken_u) == 7


def test_no_validation_when_val_fraction_zero(image_folder, tmp_path):
    dm = _dm(dataset=str(image_folder), val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert dm.val_dataset is None and dm.val_dataloader() == []
    assert len(dm.train_dataset) == 12


def test_plain_int_and_string_labels(tmp_path):
    images = [_image("RGB", seed=i) for i in range(8)]
    ints = datasets.Dataset.from_dict({"image": images, "label": [0, 4, 2, 4, 1, 0, 2, 3]}).cast_column(
        "image", datasets.Image()
    )
    ints.save_to_disk(str(tmp_path / "ints"))
    dm = _dm(dataset=str(tmp_path / "ints"), val_fraction=0.25)
    dm.setup()
    assert dm.num_classes == 5 and dm.class_names == ["0", "1", "2", "3", "4"]
    with pytest.raises(DataError, match=r"label_column 'label'.*plain integers"):
        dm.require_class_names()

    strs = datasets.Dataset.from_dict(
        {"img": images, "category": ["dog", "cat", "cow", "cat"] * 2}
    ).cast_column("img", datasets.Image())
    strs.save_to_disk(str(tmp_path / "strs"))
    dm = _dm(dataset=str(tmp_path / "strs"), val_fraction=0.25, batch_size=8)
    dm.setup()
    assert dm.require_class_names() == ["cat", "cow", "dog"]
    _, y = next(iter(dm.train_dataloader()))
    assert sorted(set(y.tolist())) <= [0, 1, 2]

    unlabelled = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    unlabelled.save_to_disk(str(tmp_path / "none"))
    dm = _dm(dataset=str(tmp_path / "none"), val_fraction=0.25)
    dm.setup()
    assert dm.num_classes is None and dm.class_names is None
    _, y = next(iter(dm.train_dataloader()))
    assert y.tolist() == [-1] * 4
    with pytest.raises(DataError, match=r"no label column.*set label_column"):
        dm.require_class_names()


# ------------------------------------------------------------------------------ errors


def test_missing_path_error(tmp_path):
    missing = tmp_path / "nope" / "images"
    with pytest.raises(DataError, match=r"does not exist") as err:
        _dm(dataset=str(missing)).setup()
    assert str(missing) in str(err.value)
    with pytest.raises(DataError, match=r"data_dir .* does not exist"):
        _dm(dataset="imagefolder", data_dir=str(missing)).setup()
    with pytest.raises(DataError, match=r"set data_dir"):
        _dm(dataset="imagefolder").setup()


def test_unknown_hub_name_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"'no-such-org/no-such-dataset'.*Hugging Face Hub"):
        _dm(dataset="no-such-org/no-such-dataset").prepare_data()
    assert time.perf_counter() - t0 < 10


def test_unknown_split_lists_available():
    with pytest.raises(
        DataError, match=r"split 'training' \(train_split\).*available splits: \['test', 'train'\]"
    ):
        _dm(dataset="quickstart", train_split="training").setup()
    with pytest.raises(DataError, match=r"split 'valid' \(val_split\).*available splits"):
        _dm(dataset="quickstart", val_split="valid").setup()


def test_missing_column_lists_columns():
    with pytest.raises(
        DataError, match=r"image_column 'pixels' not found.*available columns: \['image', 'label'\]"
    ):
        _dm(dataset="quickstart", image_column="pixels").setup()
    with pytest.raises(DataError, match=r"label_column 'target' not found.*\['image', 'label'\]"):
        _dm(dataset="quickstart", label_column="target").setup()


def test_ambiguous_image_column(tmp_path):
    images = [_image("RGB", seed=i) for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "img": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": images, "img": images}, features=features)
    ds.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"image column.*\['image', 'img'\].*set image_column"):
        _dm(dataset=str(tmp_path / "two")).setup()
    dm = _dm(dataset=str(tmp_path / "two"), image_column="img", val_fraction=0.25)
    dm.setup()
    assert dm.image_column_name == "img"


@pytest.fixture
def folder_with_bad_image(tmp_path):
    root = tmp_path / "bad"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            _image("RGB", seed=i).save(root / cls / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def test_undecodable_image_names_the_sample(folder_with_bad_image, tmp_path):
    dm = _dm(
        dataset=str(folder_with_bad_image), val_fraction=0.0, cache_dir=str(tmp_path / "cache"), batch_size=16
    )
    dm.setup("fit")
    bad = next(
        i for i in range(len(dm.train_dataset)) if "broken" in dm.train_dataset.data[i]["image"]["path"]
    )
    with pytest.raises(DataError, match=rf"sample {bad} of split 'train'.*broken\.png.*skip_bad_images=True"):
        dm.train_dataset[bad]
    with pytest.raises(DataError, match=r"broken\.png"):
        _all_batches(dm.train_dataloader())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_bad_images_skips_and_counts(folder_with_bad_image, tmp_path, num_workers):
    dm = _dm(
        dataset=str(folder_with_bad_image),
        val_fraction=0.0,
        cache_dir=str(tmp_path / "cache"),
        skip_bad_images=True,
        batch_size=3,
        drop_last=False,
        num_workers=num_workers,
    )
    dm.setup("fit")
    assert len(dm.train_dataset) == 9
    for _ in range(2):  # counted once per sample, not once per epoch
        batches = _all_batches(dm.train_dataloader())
        assert sum(len(b[1]) for b in batches) == 8
        assert all(b[0].shape[1:] == (3, 16, 16) for b in batches)
    assert dm.num_skipped_images == {"train": 1}
    assert "broken" in dm.train_dataset.data[dm.train_dataset.skipped_indices[0]]["image"]["path"]


def test_bad_arguments():
    with pytest.raises(DataError, match="val_fraction"):
        ImageDataModule(val_fraction=1.5)
    with pytest.raises(DataError, match="train_fraction"):
        ImageDataModule(train_fraction=0.0)
    with pytest.raises(DataError, match="val_fraction must be in"):
        ImageDataModule(val_split="train", val_fraction=0.0).setup()


# ------------------------------------------------------------------------------ transforms


def test_to_rgb_modes():
    assert to_rgb(_image("CMYK")).mode == "RGB"
    assert to_rgb(_image("LA")).mode == "RGB"
    p = _image("P")
    p.info["transparency"] = 0
    assert to_rgb(p).mode == "RGB"
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    out = to_rgb(deep)
    assert out.mode == "RGB" and np.asarray(out).max() == 255
    assert decode_image(np.zeros((3, 5, 6), dtype=np.uint8)).size == (6, 5)


def test_transforms_shapes():
    img = _image("RGB", size=(50, 30))
    train = build_train_transform(24, scale=(0.2, 1.0), mean=IMAGENET_MEAN)
    evalt = build_eval_transform(24, crop_pct=0.875)
    for t in (train, evalt):
        out = t(img)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert [type(t).__name__ for t in evalt.transforms][:2] == ["Resize", "CenterCrop"]
    assert evalt.transforms[0].size == [27]  # int(24 / 0.875)


# ------------------------------------------------------------------------------ distributed / Lightning


def test_exact_distributed_eval_sampler():
    dm = _dm(dataset="quickstart", batch_size=64)
    dm.setup("fit")
    seen = []
    for rank in range(3):
        dm.trainer = SimpleNamespace(
            world_size=3, distributed_sampler_kwargs={"num_replicas": 3, "rank": rank}
        )
        loader = dm.val_dataloader()
        assert type(loader.sampler).__name__ == "UnrepeatedDistributedSampler"
        seen.extend(loader.sampler)
        assert type(dm.train_dataloader().sampler).__name__ == "RandomSampler"  # Lightning shards it
    assert sorted(seen) == list(range(297))  # each sample exactly once
    dm.exact_distributed_eval = False
    assert type(dm.val_dataloader().sampler).__name__ == "SequentialSampler"
    dm.trainer = None


def test_lightning_fit_smoke():
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3 * 16 * 16, 10)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.head(x.flatten(1)), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.head(x.flatten(1)), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(dataset="quickstart", batch_size=32)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Probe(), datamodule=dm)
    assert "val_loss" in trainer.callback_metrics


def test_config_files_parse():
    from jsonargparse import ArgumentParser

    files = sorted((REPO / "configs" / "data").glob("*.yaml"))
    assert {f.stem for f in files} >= {"quickstart", "imagefolder", "cifar10", "cifar100", "imagenet-1k"}
    for f in files:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(ImageDataModule, "data")
        cfg = parser.parse_path(str(f))
        assert cfg.data.class_path == "vimssl.data.ImageDataModule", f
        if f.stem == "quickstart":
            instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
            dm = instantiate(cfg).data
            assert isinstance(dm, ImageDataModule) and dm.image_size == 32
    expect = {
        "cifar10": ("img", "label"),
        "cifar100": ("img", "fine_label"),
        "imagenet-1k": ("image", "label"),
    }
    for stem, (img_col, label_col) in expect.items():
        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(ImageDataModule, "data")
        init = parser.parse_path(str(REPO / "configs" / "data" / f"{stem}.yaml")).data.init_args
        assert (init.image_column, init.label_column) == (img_col, label_col)


def test_open_dataset_quickstart_and_errors(tmp_path):
    assert set(open_dataset("quickstart")) == {"train", "test"}
    (tmp_path / "notes.xyz").write_text("hello")
    with pytest.raises(DataError, match=r"cannot tell the format"):
        open_dataset(str(tmp_path / "notes.xyz"))
    with pytest.raises(DataError, match=r"non-empty string"):
        open_dataset("  ")

"""Weighted kNN evaluation: the pure functions, the LightningModule through the CLI, the
pretraining callback (CPU, tiny model, small banks)."""

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from tests.cli_args import fit_args
from vimssl.cli import main as cli_main
from vimssl.data import DataError, ImageDataModule
from vimssl.knn import KNNEvaluation, KNNMonitor, extract_features, knn_accuracy, knn_predict
from vimssl.models import create_model

ROOT = Path(__file__).resolve().parents[1]


def brute_force_knn(train, labels, queries, num_classes, k, temperature):
    """One query at a time, textbook: sum exp(sim / T) per class over the k nearest, normalised."""
    out = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    for i, q in enumerate(queries.double()):
        sims = [(float(t @ q / q.norm()), int(y)) for t, y in zip(train, labels)]
        sims.sort(key=lambda s: -s[0])
        for sim, y in sims[: min(k, len(sims))]:
            out[i, y] += np.exp(sim / temperature)
        out[i] /= out[i].sum()
    return out


@pytest.mark.parametrize("k,temperature,chunk", [(5, 0.07, 3), (20, 0.5, 1024), (1, 0.1, 7)])
def test_knn_predict_matches_brute_force(k, temperature, chunk):
    train, queries = torch.randn(60, 8), torch.randn(17, 8)
    labels = torch.randint(0, 4, (60,))
    scores = knn_predict(train, labels, queries, 4, k=k, temperature=temperature, chunk_size=chunk)
    assert scores.shape == (17, 4)
    expected = brute_force_knn(train, labels, queries, 4, k, temperature)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.sum(1), torch.ones(17))


def test_clustered_features_are_perfect_and_shuffled_labels_near_chance():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=gen) * 5
    labels = torch.arange(10).repeat_interleave(100)  # 1000 samples, 10 clusters
    feats = centres[labels] + torch.randn(1000, 64, generator=gen)
    train, test = torch.arange(1000) % 5 != 0, torch.arange(1000) % 5 == 0
    acc = knn_accuracy(feats[train], labels[train], feats[test], labels[test], 10)
    assert acc == {"top1": 1.0, "top5": 1.0}

    shuffled = labels[torch.randperm(1000, generator=gen)]
    acc = knn_accuracy(feats[train], shuffled[train], feats[test], shuffled[test], 10)
    assert abs(acc["top1"] - 0.1) < 0.08 and abs(acc["top5"] - 0.5) < 0.15
    assert "top5" not in knn_accuracy(feats[train], labels[train] % 3, feats[test], labels[test] % 3, 3)


def test_k_larger_than_bank_uses_every_neighbour():
    train, labels = torch.randn(3, 4), torch.tensor([0, 1, 1])
    queries = torch.randn(5, 4)
    scores = knn_predict(train, labels, queries, 3, k=100)
    torch.testing.assert_close(scores, knn_predict(train, labels, queries, 3, k=3))
    assert (scores[:, 0] > 0).all() and (scores[:, 1] > 0).all() and (scores[:, 2] == 0).all()


def test_low_temperature_lets_the_closest_neighbour_win():
    query = torch.tensor([[1.0, 0.0]])
    angle = lambda sim: [sim, (1 - sim**2) ** 0.5]  # noqa: E731  (a unit vector at cosine `sim`)
    train = torch.tensor([angle(0.99), angle(0.9), angle(0.9), angle(0.9)])
    labels = torch.tensor([1, 0, 0, 0])  # one very close neighbour of class 1, three of class 0
    assert knn_predict(train, labels, query, 2, k=4, temperature=1.0).argmax() == 0  # votes count
    assert knn_predict(train, labels, query, 2, k=4, temperature=0.01).argmax() == 1  # closeness wins
    low = knn_predict(train, labels, query, 2, k=4, temperature=0.001)  # exp(990): no overflow
    assert torch.isfinite(low).all() and low[0, 1] > 0.99


def test_knn_predict_rejects_bad_input():
    with pytest.raises(ValueError, match="labels must lie"):
        knn_predict(torch.randn(4, 3), torch.tensor([0, 1, -1, 0]), torch.randn(2, 3), 2)
    with pytest.raises(ValueError, match="expected train"):
        knn_predict(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 5), 2)
    with pytest.raises(ValueError, match="empty"):
        knn_predict(torch.randn(0, 3), torch.zeros(0, dtype=torch.long), torch.randn(2, 3), 2)


def test_extract_features_pools_and_restores_modes():
    encoder = create_model("vim_test", num_classes=0).train()
    encoder.layers[0].eval()  # a submodule in its own mode stays so
    images = torch.randn(6, 3, 32, 32)
    loader = [(images[:4], torch.tensor([0, 1, 2, 3])), (images[4:], torch.tensor([4, 5]))]
    feats, labels = extract_features(encoder, loader, "cpu")
    assert encoder.training and not encoder.layers[0].training and encoder.layers[1].training
    assert feats.shape == (6, 32) and feats.dtype == torch.float32 and labels.tolist() == list(range(6))
    encoder.eval()
    with torch.no_grad():
        tokens = encoder.forward_features(images)
        torch.testing.assert_close(feats, encoder(images))
        mean, _ = extract_features(encoder, loader, "cpu", pool="mean")
        torch.testing.assert_close(mean, encoder.split_features(tokens)[1].mean(1))
    assert not torch.is_grad_enabled() or feats.grad_fn is None


def knn_args(tmp_path, command: str, *extra: str) -> list[str]:
    """A small kNN run: a 75-image bank (train_fraction 0.05), two query batches of 16."""
    return [
        command,
        "--config", str(ROOT / "configs/knn.yaml"),
        "--data.init_args.train_fraction", "0.05",
        "--data.init_args.eval_batch_size", "16",
        "--data.init_args.num_workers", "0",
        f"--trainer.limit_{'val' if command == 'validate' else 'test'}_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("command", ["validate", "test"])
def test_knn_config_through_the_cli(tmp_path, command):
    cli = cli_main(knn_args(tmp_path, command))
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["knn/top1"]) <= float(metrics["knn/top5"]) <= 1.0
    # even a random tiny encoder's cls features carry class information (chance: 0.1)
    assert float(metrics["knn/top1"]) > 0.3
    assert isinstance(cli.model, KNNEvaluation) and cli.model.encoder.img_size == (32, 32)
    assert cli.model._bank is None  # released at the end of the epoch


@pytest.fixture(scope="module")
def pretraining_run(tmp_path_factory):
    """One short MAE run on the digits with the kNN monitor: 2 steps, validation on 2 batches."""
    tmp_path = tmp_path_factory.mktemp("pretrain")
    return cli_main(
        fit_args(
            tmp_path,
            "--trainer.callbacks+=vimssl.knn.KNNMonitor",
            "--trainer.callbacks.every_n_epochs", "1",
            "--trainer.callbacks.max_train_samples", "128",
        )
    )  # fmt: skip


def test_knn_monitor_during_pretraining(pretraining_run):
    trainer = pretraining_run.trainer
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["knn/top1"]) <= float(metrics["knn/top5"]) <= 1.0
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, KNNMonitor))
    assert monitor.last["top1"] == pytest.approx(float(metrics["knn/top1"]))
    assert pretraining_run.model.training  # the encoder went back to train mode
    assert "knn/top1" in (Path(trainer.log_dir) / "metrics.csv").read_text()


def test_knn_evaluation_of_a_pretraining_checkpoint(pretraining_run, tmp_path):
    ckpt = Path(pretraining_run.trainer.log_dir) / "checkpoints" / "last.ckpt"
    cli = cli_main(knn_args(tmp_path, "validate", "--model.init_args.encoder", str(ckpt)))
    torch.testing.assert_close(cli.model.encoder.state_dict(), pretraining_run.model.encoder.state_dict())
    assert 0.0 <= float(cli.trainer.callback_metrics["knn/top1"]) <= 1.0


def _unlabelled_dataset(path: Path) -> str:
    import datasets
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)) for i in range(8)]
    ds = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(path))
    return str(path)


def test_unlabelled_data_is_a_clear_error_or_a_single_warning(tmp_path, recwarn):
    dm = ImageDataModule(dataset=_unlabelled_dataset(tmp_path / "none"), image_size=32, val_fraction=0.25)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.raises(DataError, match="needs labelled data.*label_column"):
        trainer.validate(KNNEvaluation(img_size=32), datamodule=dm)

    monitor = KNNMonitor(every_n_epochs=1)
    fake_trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, datamodule=dm)
    module = SimpleNamespace(encoder=create_model("vim_test", num_classes=0))
    recwarn.clear()
    monitor.on_validation_epoch_end(fake_trainer, module)
    monitor.on_validation_epoch_end(fake_trainer, module)
    assert sum("kNN monitoring is off" in str(w.message) for w in recwarn) == 1
    assert monitor._disabled and monitor.last is None

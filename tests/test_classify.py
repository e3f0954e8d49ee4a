"""Transfer: fine-tuning, linear probing, encoder sources, EMA, layer decay, predictions, errors."""

import argparse
import csv
from pathlib import Path

import pytest
import torch

from vimssl.checkpoint import NotAVimCheckpointError
from vimssl.classify import ImageClassifier, fold_feature_norm
from vimssl.cli import main as cli_main
from vimssl.hub import save_pretrained
from vimssl.models import create_model
from vimssl.transfer import EncoderSourceError

ROOT = Path(__file__).resolve().parents[1]


def cls_args(tmp_path, config="configs/quickstart_finetune.yaml", *extra, steps=3, subcommand="fit"):
    args = [
        subcommand,
        "--config", str(ROOT / config),
        "--model.init_args.encoder", "vim_test",
        "--data.init_args.batch_size", "16",
        "--data.init_args.num_workers", "0",
        "--data.init_args.persistent_workers", "false",
        "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2",
        "--trainer.limit_predict_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        *extra,
    ]  # fmt: skip
    if subcommand == "fit":
        args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(steps)]
    return args


def test_finetune_then_test_and_predict_through_cli(tmp_path):
    cli = cli_main(
        cls_args(tmp_path, "configs/quickstart_finetune.yaml", "--model.init_args.ema_decay", "0.9")
    )
    assert cli.trainer.global_step == 3
    assert cli.model.hparams.num_classes == 10  # linked from the data
    assert cli.model.hparams.class_names == [str(i) for i in range(10)]
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/acc1"]) <= 1.0 and "val/acc5" in metrics
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["vimssl"]
    assert meta["kind"] == "classifier" and meta["ema_prefix"] == "ema.module."

    tested = cli_main(cls_args(tmp_path / "t", subcommand="test") + ["--ckpt_path", str(ckpt)])
    assert "test/acc1" in tested.trainer.callback_metrics

    out = tmp_path / "pred"
    cli_main(
        cls_args(tmp_path / "p", subcommand="predict")
        + [
            "--ckpt_path",
            str(ckpt),
            "--trainer.callbacks.output_dir",
            str(out),
            "--return_predictions",
            "false",
        ]
    )
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 32
    assert {r["prediction"] for r in rows} <= {str(i) for i in range(10)}
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)


def test_linear_probe_keeps_encoder_frozen_and_in_eval(tmp_path):
    import lightning as L

    from vimssl.data import ImageDataModule

    module = ImageClassifier(
        encoder="vim_test", num_classes=10, img_size=32, mode="linear", lr=0.1, optimizer="sgd"
    )
    before = {n: p.clone() for n, p in module.model.named_parameters()}
    stats_before = module.feat_norm.running_mean.clone()
    modes = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((pl_module.model.training, pl_module.feat_norm.training))

    dm = ImageDataModule(dataset="quickstart", image_size=32, batch_size=16, num_workers=0)
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert modes and all(m == (False, True) for m in modes), modes  # encoder eval, probe BN trains
    changed = [n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.startswith("head.") for n in changed), changed
    assert all(not p.requires_grad for n, p in module.model.named_parameters() if not n.startswith("head."))
    assert not torch.equal(module.feat_norm.running_mean, stats_before)  # the probe's BatchNorm learns


def test_linear_head_folds_into_plain_classifier():
    module = ImageClassifier(encoder="vim_test", num_classes=10, img_size=32, mode="linear")
    module.feat_norm.running_mean.uniform_(-1, 1)
    module.feat_norm.running_var.uniform_(0.5, 2)
    module.eval()
    x = torch.randn(3, 3, 32, 32)
    plain = create_model("vim_test")
    norm = {k: v for k, v in module.feat_norm.state_dict().items()}
    plain.load_state_dict(fold_feature_norm(module.model.state_dict(), norm))
    torch.testing.assert_close(plain.eval()(x), module(x), atol=1e-5, rtol=1e-4)


def test_layer_decay_learning_rates(tmp_path):
    cli = cli_main(
        cls_args(
            tmp_path, "configs/quickstart_finetune.yaml", "--model.init_args.layer_decay", "0.5", steps=1
        )
    )
    opt = cli.trainer.optimizers[0]
    initial = {n: g["initial_lr"] for g in opt.param_groups for n in g["names"]}
    top = initial["head.weight"]
    assert top == pytest.approx(1e-3)
    assert initial["layers.1.mixer.in_proj.weight"] == pytest.approx(top * 0.5)
    assert initial["layers.0.mixer.in_proj.weight"] == pytest.approx(top * 0.25)
    assert initial["pos_embed"] == pytest.approx(top * 0.125)


def test_ema_differs_and_is_what_validation_uses():
    module = ImageClassifier(
        encoder="vim_test", num_classes=10, img_size=32, ema_decay=0.5, drop_path_rate=0.0
    )
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    module.on_train_batch_end(None, None, 0)  # first update copies the weights
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    module.on_train_batch_end(None, None, 1)
    ema_w = module.ema.module.head.weight
    assert not torch.allclose(ema_w, module.model.head.weight)
    module.eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    module.validation_step((x, y), 0)
    expected = torch.nn.functional.cross_entropy(module.ema.module(x), y)
    raw = torch.nn.functional.cross_entropy(module.model(x), y)
    torch.testing.assert_close(logged["val/loss"], expected)
    assert not torch.isclose(expected, raw)


def _pretraining_ckpt(tmp_path) -> Path:
    from tests.cli_args import fit_args

    cli = cli_main(fit_args(tmp_path, steps=1))
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def test_encoder_sources(tmp_path):
    # 1. a pretraining .ckpt of this project
    ckpt = _pretraining_ckpt(tmp_path / "pre")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    m = ImageClassifier(encoder=str(ckpt), num_classes=3, img_size=32)
    assert m.model.head.out_features == 3
    torch.testing.assert_close(m.model.layers[1].mixer.A_b_log, state["encoder.layers.1.mixer.A_b_log"])
    # ... at another image size: position embedding resampled
    m16 = ImageClassifier(encoder=str(ckpt), num_classes=3, img_size=16)
    assert m16.model.pos_embed.shape[1] == 17

    # 2. a Hub-format folder
    enc = create_model("vim_test", num_classes=0)
    save_pretrained(enc, tmp_path / "hub")
    m = ImageClassifier(encoder=str(tmp_path / "hub"), num_classes=4, img_size=32)
    torch.testing.assert_close(m.model.pos_embed, enc.pos_embed)

    # 3. a released-format .pth training dictionary
    released = create_model("vim_test", num_classes=1000)
    pth = tmp_path / "vim_released.pth"
    torch.save(
        {"model": {f"module.{k}": v for k, v in released.state_dict().items()}, "epoch": 3,
         "args": argparse.Namespace(model="vim_test")},
        pth,
    )  # fmt: skip
    m = ImageClassifier(encoder=str(pth), num_classes=5, img_size=32)
    assert m.model.head.out_features == 5
    torch.testing.assert_close(m.model.norm_f.weight, released.norm_f.weight)

    # 4. a registry name: from scratch
    assert ImageClassifier(encoder="vim_test", num_classes=2, img_size=32).model.head.out_features == 2


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="class_names"):
        ImageClassifier(encoder="vim_test", num_classes=3, class_names=["a", "b"], img_size=32)
    module = ImageClassifier(encoder="vim_test", num_classes=3, img_size=32, lr=1e-3)
    with pytest.raises(ValueError, match="out of range for num_classes=3"):
        module._labels(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="label column"):
        module._labels(torch.tensor([0, -1]))
    vit = tmp_path / "vit.pth"
    torch.save(
        {"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3), "cls_token": torch.zeros(1, 1, 3)}}, vit
    )
    with pytest.raises(NotAVimCheckpointError):
        ImageClassifier(encoder=str(vit), num_classes=3, img_size=32)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(EncoderSourceError, match="not a vimssl training checkpoint"):
        ImageClassifier(encoder=str(other), num_classes=3, img_size=32)


def test_missing_label_column_is_a_clear_error(tmp_path):
    from datasets import Dataset, Image

    from vimssl.data import DataError, ImageDataModule

    imgs = [torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy() for _ in range(8)]
    ds = Dataset.from_dict({"image": imgs}).cast_column("image", Image())
    ds.save_to_disk(str(tmp_path / "unlabelled"))
    dm = ImageDataModule(dataset=str(tmp_path / "unlabelled"), image_size=32, num_workers=0)
    with pytest.raises(DataError):
        dm.require_class_names()


def test_low_label_benchmark_pipeline_runs_with_a_tiny_budget():
    """The benchmark script end to end with a budget far too small to mean anything: it must run,
    evaluate all four models and print its JSON line. (The real comparison is in docs/.)"""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks/low_label.py"), "--pretrain-epochs", "1",
            "--finetune-epochs", "1", "--linear-epochs", "1", "--label-fraction", "0.05",
        ],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("finetune_pretrained", "finetune_scratch", "linear_pretrained", "linear_random"):
        assert 0.0 <= result[key] <= 1.0
    assert "| fine-tune" in proc.stdout and "| linear probe" in proc.stdout


def test_linear_probe_on_concatenated_last_k_layers():
    module = ImageClassifier(encoder="vim_test", num_classes=10, img_size=32, mode="linear", last_k_layers=2)
    x = torch.randn(3, 3, 32, 32)
    feats = module.features(x)
    assert feats.shape == (3, 64)  # 2 blocks x 32
    # the second half is the usual (last block) cls feature
    torch.testing.assert_close(
        feats[:, 32:], module.model.forward_head(module.model.forward_features(x), True)
    )
    assert module(x).shape == (3, 10)
    inter = module.model.forward_intermediates(x, 2)
    assert len(inter) == 2 and not torch.allclose(inter[0], inter[1])
    with pytest.raises(ValueError, match="last_k_layers"):
        ImageClassifier(encoder="vim_test", num_classes=10, img_size=32, mode="finetune", last_k_layers=2)
    with pytest.raises(ValueError, match="depth=2"):
        ImageClassifier(encoder="vim_test", num_classes=10, img_size=32, mode="linear", last_k_layers=3)


def test_nonfinite_loss_raises_with_the_step_or_skips():
    batch = (torch.full((2, 3, 32, 32), float("nan")), torch.tensor([1, 2]))
    module = ImageClassifier(encoder="vim_test", num_classes=10, img_size=32)
    with pytest.raises(FloatingPointError, match="global step 0"):
        module.training_step(batch, 0)
    module = ImageClassifier(encoder="vim_test", num_classes=10, img_size=32, nonfinite_loss="skip")
    assert module.training_step(batch, 0) is None and module.skipped_steps == 1


def test_labels_are_checked_on_the_host_before_the_transfer(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    def loader(labels):
        return DataLoader(
            TensorDataset(torch.randn(len(labels), 3, 32, 32), torch.tensor(labels)), batch_size=4
        )

    def trainer():
        return L.Trainer(
            max_steps=1, limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
        )  # fmt: skip

    module = ImageClassifier(encoder="vim_test", num_classes=3, img_size=32, lr=1e-3)
    checked = []
    original = module._labels
    module._labels = lambda labels: checked.append(labels.device.type) or original(labels)
    trainer().fit(module, loader([0, 1, 2, 1]), loader([2, 1, 0, 0]))
    assert checked and set(checked) == {"cpu"} and module._host_checked  # checked before the transfer
    with pytest.raises(ValueError, match="out of range for num_classes=3"):
        trainer().fit(
            ImageClassifier(encoder="vim_test", num_classes=3, img_size=32, lr=1e-3), loader([0, 1, 7, 1])
        )
    with pytest.raises(ValueError, match="without a label"):
        trainer().validate(
            ImageClassifier(encoder="vim_test", num_classes=3, img_size=32, lr=1e-3), loader([0, -1, 2, 1])
        )
    # prediction batches may be unlabelled (-1)
    preds = trainer().predict(
        ImageClassifier(encoder="vim_test", num_classes=3, img_size=32, lr=1e-3), loader([-1] * 4)
    )
    assert preds[0]["probs"].shape == (4, 3)

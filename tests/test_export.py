"""From a Lightning checkpoint to a Hub folder: ``vimssl export`` and the ``PushToHub`` callback
(CPU, tiny model, no network: uploads fail in offline mode, on purpose)."""

import datetime
import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import vimssl
import vimssl.cli
from tests.cli_args import fit_args as shared_fit_args
from vimssl.callbacks import PushToHub
from vimssl.checkpoint import UnsafeCheckpointError
from vimssl.data.quickstart import QUICKSTART_MEAN, QUICKSTART_STD
from vimssl.export import export_checkpoint, main, write_export
from vimssl.hub import HubUploadError
from vimssl.pretrain import MaskedPretraining

ROOT = Path(__file__).resolve().parents[1]
REPO = "me/vim-test-export"


def fit_args(tmp_path, *extra: str, steps: int = 2) -> list[str]:
    """One epoch of ``steps`` batches of 16 quickstart digits with a 32-wide, 2-deep Vim."""
    return shared_fit_args(tmp_path, "--model.init_args.model_name", "vim_test", *extra, steps=steps)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-step MAE run through the CLI: its last.ckpt and the trained module."""
    cli = vimssl.cli.main(fit_args(tmp_path_factory.mktemp("fit")))
    log_dir = Path(cli.trainer.log_dir)
    return SimpleNamespace(ckpt=log_dir / "checkpoints" / "last.ckpt", module=cli.model.eval())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir())}


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------- pretraining runs
def test_export_matches_the_checkpoint_and_the_module(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main([str(run.ckpt), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    model = vimssl.from_pretrained(out).eval()
    encoder = {
        k[len("encoder.") :]: v for k, v in load(run.ckpt)["state_dict"].items() if k.startswith("encoder.")
    }
    state = model.state_dict()
    assert state.keys() == encoder.keys() and all(torch.equal(state[k], encoder[k]) for k in state)
    with torch.no_grad():
        x = images()
        assert torch.equal(model(x), run.module.encoder(x))
        assert torch.equal(model.forward_features(x), run.module.encoder.forward_features(x))

    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0 and config["model_args"]["embed_dim"] == 32
    assert config["mean"] == pytest.approx(QUICKSTART_MEAN) and config["std"] == pytest.approx(QUICKSTART_STD)
    card = (out / "README.md").read_text()
    for row in ("| method | mae |", "| dataset | quickstart |", "| epochs | 1 |"):
        assert row in card
    assert "seed_everything: 0" in card  # the run's config.yaml
    assert "pipeline_tag: image-feature-extraction" in card and "- quickstart" in card


def test_push_failure_keeps_checkpoint_and_export(run, tmp_path, offline, capsys):
    before = sha256(run.ckpt)
    out = tmp_path / "export"
    assert main([str(run.ckpt), str(out), "--push-to-hub", REPO, "--private"]) == 1
    err = capsys.readouterr().err
    assert "upload failed" in err and "HF_HUB_OFFLINE=1" in err and "complete and unchanged" in err
    assert sha256(run.ckpt) == before
    exported = folder_hashes(out)
    assert f'from_pretrained("{REPO}")' in (out / "README.md").read_text()  # the card names the repo
    vimssl.from_pretrained(out)

    with pytest.raises(HubUploadError, match=r"creating the repository.*export at .* is complete"):
        export_checkpoint(run.ckpt, tmp_path / "again", push_to_hub=REPO)
    assert sha256(run.ckpt) == before
    assert folder_hashes(tmp_path / "again") == exported
    assert sha256(run.ckpt) == before and folder_hashes(out) == exported


def test_refuses_a_folder_that_is_not_an_export(run, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    assert main([str(run.ckpt), str(user), "--overwrite"]) == 1
    assert "is not a vimssl export" in capsys.readouterr().err
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and (
        user / "notes.txt"
    ).read_text() == "precious"
    assert not list(tmp_path.glob(".mine-*"))  # no temporary folder left behind

    out = tmp_path / "export"
    export_checkpoint(run.ckpt, out)
    (out / "eval.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="previous vimssl export.*overwrite=True"):
        export_checkpoint(run.ckpt, out)
    assert main([str(run.ckpt), str(out), "--overwrite", "--metric", "val/loss=0.5"]) == 0
    assert (out / "eval.txt").read_text() == "mine"  # other files are left alone
    assert "| val/loss | 0.5 |" in (out / "README.md").read_text()


def test_checkpoint_without_vimssl_entry_or_unsafe(run, tmp_path, capsys):
    ckpt = load(run.ckpt)
    del ckpt["vimssl"]
    foreign = tmp_path / "foreign.ckpt"
    torch.save(ckpt, foreign)
    with pytest.raises(
        ValueError, match=r"foreign\.ckpt has no 'vimssl' entry.*configuration and key prefix"
    ):
        export_checkpoint(foreign, tmp_path / "out")
    assert main([str(foreign), str(tmp_path / "out")]) == 1
    assert "has no 'vimssl' entry" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    ckpt = load(run.ckpt)
    ckpt["hyper_parameters"]["when"] = datetime.date(2024, 1, 1)  # not a plain value: never unpickled
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save(ckpt, unsafe)
    with pytest.raises(UnsafeCheckpointError, match="datetime.date"):
        export_checkpoint(unsafe, tmp_path / "out")
    assert main([str(unsafe), str(tmp_path / "out")]) == 1
    assert "weights_only=True" in capsys.readouterr().err

    with pytest.raises(KeyError, match="no EMA weights"):
        export_checkpoint(run.ckpt, tmp_path / "out", which="model_ema")


def test_cli_routes_export(run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        vimssl.cli.main(["export", "--help"])
    if "usage: vimssl export" not in capsys.readouterr().out:
        pytest.skip("vimssl.cli does not route `export` yet")
    assert vimssl.cli.main(["export", str(run.ckpt), str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------- classifiers
def classifier_checkpoint(**meta) -> tuple[dict, vimssl.VisionMamba]:
    """A checkpoint in the layout of the classifier LightningModule: weights under ``model.``,
    EMA weights under ``ema.module.``."""
    model = vimssl.create_model("vim_test", depth=1, num_classes=3).eval()
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    weights |= {f"ema.module.{k}": v + 1 for k, v in model.state_dict().items()}
    entry = {
        "kind": "classifier", "model_name": "vim_test", "encoder_config": dict(model.config),
        "encoder_prefix": "model.", "ema_prefix": "ema.module.", "class_names": ["zero", "one", "two"],
        "mean": [0.5] * 3, "std": [0.25] * 3, **meta,
    }  # fmt: skip
    ckpt = {"state_dict": weights, "hyper_parameters": {"mode": "finetune", "pool": "cls"}, "vimssl": entry}
    return ckpt, model


def test_classifier_exports_with_class_names(tmp_path):
    ckpt, model = classifier_checkpoint()
    torch.save(ckpt, tmp_path / "cls.ckpt")
    out = export_checkpoint(tmp_path / "cls.ckpt", tmp_path / "export")
    loaded = vimssl.from_pretrained(out).eval()
    assert loaded.num_classes == 3 and loaded.pretrained_cfg["class_names"] == ["zero", "one", "two"]
    assert loaded.pretrained_cfg["mean"] == [0.5] * 3
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "| method | finetune classifier |" in card

    ema = vimssl.from_pretrained(
        export_checkpoint(tmp_path / "cls.ckpt", tmp_path / "ema", which="model_ema")
    )
    assert torch.equal(ema.head.weight, model.head.weight + 1)

    ckpt["hyper_parameters"]["pool"] = "mean"
    with pytest.raises(ValueError, match="pool='mean'"):
        write_export(ckpt, tmp_path / "mean")


def test_linear_probe_folds_its_feature_norm(tmp_path):
    pytest.importorskip("vimssl.classify")
    ckpt, model = classifier_checkpoint(feature_norm_prefix="feat_norm.")
    mean, var = torch.randn(32), torch.rand(32) + 0.5
    ckpt["state_dict"] |= {"feat_norm.running_mean": mean, "feat_norm.running_var": var,
                           "feat_norm.num_batches_tracked": torch.tensor(10)}  # fmt: skip
    loaded = vimssl.from_pretrained(write_export(ckpt, tmp_path / "export")).eval()
    with torch.no_grad():
        cls = model.forward_head(model.forward_features(images()), pre_logits=True)  # (B, D)
        expected = model.head((cls - mean) / torch.sqrt(var + 1e-6))
        torch.testing.assert_close(loaded(images()), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- PushToHub
def test_push_to_hub_callback_offline_warns_and_keeps_export(tmp_path, offline, caplog):
    args = fit_args(
        tmp_path, "--trainer.callbacks+=vimssl.callbacks.PushToHub", "--trainer.callbacks.repo_id", REPO,
        "--trainer.callbacks.token", "hf_secret",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="vimssl"):
        cli = vimssl.cli.main(args)
    assert cli.trainer.global_step == 2
    assert any("PushToHub: uploading failed" in r.getMessage() and "HF_HUB_OFFLINE" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    log_dir = Path(cli.trainer.log_dir)
    out = log_dir / "hub_export"
    ckpt = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert ckpt.is_file() and ckpt.parent == log_dir / "checkpoints"
    model = vimssl.from_pretrained(out)
    encoder = {
        k[len("encoder.") :]: v for k, v in load(ckpt)["state_dict"].items() if k.startswith("encoder.")
    }
    assert all(torch.equal(model.state_dict()[k], v) for k, v in encoder.items())
    card = (out / "README.md").read_text()
    assert f'from_pretrained("{REPO}")' in card and "| method | mae |" in card
    assert "token: <redacted>" in card and "hf_secret" not in card


def test_push_to_hub_callback_without_checkpoint_uses_the_module(tmp_path, offline, caplog):
    module = MaskedPretraining(
        model_name="vim_test", img_size=32, embed_dim=32, depth=1, decoder_dim=32, decoder_depth=1, lr=1e-3
    )
    data = DataLoader(
        TensorDataset(torch.randn(32, 3, 32, 32), torch.zeros(32, dtype=torch.long)), batch_size=16
    )
    callback = PushToHub(REPO, token="hf_secret")
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="vimssl"):
        trainer.fit(module, data)
    assert any("PushToHub: uploading failed" in r.getMessage() for r in caplog.records)
    assert callback.export_dir == tmp_path / "hub_export" and callback.url is None
    model = vimssl.from_pretrained(tmp_path / "hub_export").eval()
    with torch.no_grad():
        assert torch.equal(model(images()), module.eval().encoder(images()))
    card = (tmp_path / "hub_export" / "README.md").read_text()
    assert "| method | mae |" in card and "hf_secret" not in card

    strict = PushToHub(REPO, strict=True)
    with pytest.raises(HubUploadError, match="HF_HUB_OFFLINE"):
        strict.on_fit_end(trainer, module)

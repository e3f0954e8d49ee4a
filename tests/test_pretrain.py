"""Masked-image-modeling pretraining through the CLI and the LightningModule (CPU, tiny model)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_args import ROOT, fit_args
from vimssl.cli import main as cli_main
from vimssl.pretrain import MaskedPretraining


def run_fit(tmp_path, *extra: str, steps: int = 2, epochs: int = 1):
    return cli_main(fit_args(tmp_path, *extra, steps=steps, epochs=epochs))


@pytest.mark.parametrize(
    "method,mask,decoder",
    [
        ("mae", "random", "mamba"),
        ("mae", "row", "mamba"),
        ("mae", "block", "transformer"),
        ("simmim", "block", "mamba"),
        ("simmim", "random", "mamba"),
        ("simmim", "row", "mamba"),
    ],
)
def test_fit_each_method_and_mask(tmp_path, method, mask, decoder):
    cli = run_fit(
        tmp_path,
        "--model.init_args.method", method,
        "--model.init_args.mask_kind", mask,
        "--model.init_args.decoder", decoder,
    )  # fmt: skip
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.method == method and cli.model.hparams.mask_kind == mask
    assert cli.model.encoder.img_size == (32, 32)  # linked from data.image_size
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "config.yaml").is_file()  # resolved config beside the checkpoints
    assert list((log_dir / "checkpoints").glob("*.ckpt"))
    metrics = (log_dir / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics


def test_checkpoint_records_encoder_config_and_resume_continues(tmp_path):
    cli = run_fit(tmp_path, steps=3)
    ckpt_path = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["vimssl"]["encoder_config"]["embed_dim"] == 32
    opt_state = ckpt["optimizer_states"][0]["state"]

    resumed = cli_main(fit_args(tmp_path / "resumed", "--ckpt_path", str(ckpt_path), steps=3, epochs=2))
    assert resumed.trainer.global_step == 6
    # the resumed optimiser started from the saved state: Adam's step count went on from 3
    steps = {int(s["step"]) for s in resumed.trainer.optimizers[0].state.values()}
    assert steps == {6}
    assert {int(s["step"]) for s in opt_state.values()} == {3}
    sched = resumed.trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 6


def test_loss_decreases_on_quickstart_data(tmp_path):
    cli = run_fit(tmp_path, "--model.init_args.lr", "3e-3", "--model.init_args.warmup_steps", "2", steps=40)
    assert cli.trainer.global_step == 40
    import csv

    rows = list(csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 6
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.8 * first, losses


def test_reconstruction_pictures_are_written(tmp_path):
    cli = run_fit(
        tmp_path,
        "--trainer.callbacks+=vimssl.callbacks.ReconstructionPictures",
        "--trainer.callbacks.every_n_epochs", "1",
        "--trainer.callbacks.num_images", "4",
    )  # fmt: skip
    pngs = sorted(Path(cli.trainer.log_dir).glob("reconstructions/epoch_*.png"))
    assert pngs, list(Path(cli.trainer.log_dir).rglob("*"))
    from PIL import Image

    img = Image.open(pngs[0])
    assert img.width > img.height / 4 * 2  # 3 columns: original | masked | reconstruction
    assert img.height > 4 * 32


def small_module(**kw) -> MaskedPretraining:
    args = dict(
        model_name="vim_test", img_size=32, embed_dim=32, depth=2, decoder_dim=32, decoder_depth=1, lr=1e-3
    )
    args.update(kw)
    return MaskedPretraining(**args)


def test_loss_is_only_on_masked_patches():
    module = small_module(method="mae").eval()
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::2] = True
    out = module(imgs, mask)
    changed = imgs.clone()
    changed[..., :4, :4] = torch.randn(2, 3, 4, 4)  # new content in patch 0, which is masked
    assert not torch.isclose(module(changed, mask)["loss"], out["loss"])
    assert torch.equal(out["mask"], mask)
    assert out["pred"].shape == (2, 64, 48) and out["mask"].sum() == 64


def test_reconstruct_keeps_visible_patches():
    module = small_module(method="simmim").eval()
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :8] = True  # the first row of patches
    out = module.reconstruct(imgs, mask)
    assert torch.equal(out["reconstruction"][..., 4:, :], imgs[..., 4:, :])
    assert torch.equal(out["masked"][..., 4:, :], imgs[..., 4:, :])
    assert (out["masked"][..., :4, :] == imgs.amin()).all()


def test_nonfinite_loss_raises_with_step_or_skips():
    module = small_module()
    batch = (torch.full((2, 3, 32, 32), float("nan")), torch.zeros(2, dtype=torch.long))

    with pytest.raises(FloatingPointError, match="global step 0"):
        module.training_step(batch, 0)
    module = small_module(nonfinite_loss="skip")
    assert module.training_step(batch, 0) is None and module.skipped_steps == 1


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="mask_ratio"):
        small_module(mask_ratio=1.0)
    with pytest.raises(ValueError, match="stride"):
        MaskedPretraining(model_name="vim_tiny_patch16_stride8_224", depth=1)
    module = small_module()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        module(torch.randn(1, 3, 30, 30))


@pytest.mark.parametrize(
    "config",
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")),
)
def test_print_config_works_for_every_shipped_config(config, capsys):
    base = [] if config == "configs/quickstart.yaml" else ["--config", str(ROOT / "configs/quickstart.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *base, "--config", str(ROOT / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path" in out and "trainer:" in out


def test_ddp_two_cpu_processes(tmp_path):
    args = fit_args(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", steps=2)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = list(Path(tmp_path).rglob("last.ckpt"))
    assert len(ckpts) == 1
    ckpt = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    # the CLI shows vimssl's information, once for both processes (the backend auto chose)
    assert proc.stderr.count("vimssl: backend 'auto' chose 'torch' for cpu tensors") == 1, proc.stderr[-3000:]
    assert "not recommended to provide both args and command line" not in proc.stderr  # (LightningCLI)

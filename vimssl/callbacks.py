"""Lightning callbacks: reconstruction pictures for masked-image pretraining, and pushing the
trained model to the Hub at the end of fit."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger("vimssl")


class ReconstructionPictures(L.Callback):
    """Every ``every_n_epochs`` epochs, saves a PNG grid of ``num_images`` validation images, one
    row per image: original | masked | reconstruction; also logs it where the logger takes images
    (TensorBoard, Weights & Biases). Files: ``<log_dir>/reconstructions/epoch_XXX.png``.

    The images and masks are the same every time, so the pictures show what the model learned.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, dirpath: str | None = None) -> None:
        super().__init__()
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError("every_n_epochs and num_images must be at least 1")
        self.every_n_epochs, self.num_images, self.dirpath = every_n_epochs, num_images, dirpath
        self._images: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self.saved: list[Path] = []

    def _fixed_batch(self, trainer: L.Trainer, pl_module) -> torch.Tensor | None:
        if self._images is None:
            loaders = trainer.val_dataloaders or trainer.train_dataloader
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            if loader is None:
                return None
            imgs = []
            for batch in loader:
                imgs.append(batch[0])
                if sum(x.shape[0] for x in imgs) >= self.num_images:
                    break
            if not imgs:
                return None
            self._images = torch.cat(imgs)[: self.num_images]
            from vimssl.mim import make_mask

            p = pl_module.patch_size
            grid = (self._images.shape[2] // p, self._images.shape[3] // p)
            gen = torch.Generator().manual_seed(0)
            hp = pl_module.hparams
            self._mask = make_mask(hp.mask_kind, self._images.shape[0], grid, hp.mask_ratio, generator=gen)
        return self._images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or not trainer.is_global_zero or (epoch + 1) % self.every_n_epochs:
            return
        imgs = self._fixed_batch(trainer, pl_module)
        if imgs is None:
            return
        from torchvision.utils import make_grid, save_image

        was_training = pl_module.training
        pl_module.eval()
        with torch.autocast(pl_module.device.type, enabled=False):
            out = pl_module.reconstruct(imgs.to(pl_module.device), self._mask.to(pl_module.device))
        pl_module.train(was_training)
        mean, std = _normalisation(trainer)
        rows = torch.stack([out["original"], out["masked"], out["reconstruction"]], dim=1)  # (B, 3, C, H, W)
        rows = (rows.float().cpu() * std + mean).clamp(0, 1).flatten(0, 1)
        grid = make_grid(rows, nrow=3, padding=2, pad_value=1.0)
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir) / "reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch_{epoch:03d}.png"
        save_image(grid, path)
        self.saved.append(path)
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):  # TensorBoard
                exp.add_image("reconstructions", grid, global_step=trainer.global_step)
            elif hasattr(logger, "log_image"):  # W&B and others
                logger.log_image(key="reconstructions", images=[grid], step=trainer.global_step)


def _normalisation(trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    dm = trainer.datamodule
    mean = getattr(dm, "mean", None) or (0.0, 0.0, 0.0)
    std = getattr(dm, "std", None) or (1.0, 1.0, 1.0)
    return torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)


class PushToHub(L.Callback):
    """At the end of ``fit``, exports the model as a vimssl Hub folder and uploads it.

    The exported weights are those of the best checkpoint (``trainer.checkpoint_callback``'s
    ``best_model_path``, else ``last_model_path``), or of the live module when no checkpoint was
    written. The folder is ``<dirpath or log_dir>/hub_export`` (a previous export there is
    replaced; any other non-empty folder is refused). Global rank zero only.

    A failed export or upload logs a warning and training ends normally (``strict=True``:
    raises instead); the checkpoints are only read, and the exported folder stays for a later
    ``vimssl.push_to_hub(folder, repo_id)``. Prefer ``HF_TOKEN`` or ``hf auth login`` over
    ``token``: LightningCLI writes callback arguments into ``config.yaml`` (the model card
    redacts it).
    """

    def __init__(
        self,
        repo_id: str,
        private: bool = False,
        token: str | None = None,
        revision: str | None = None,
        strict: bool = False,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        self.repo_id, self.private, self.token, self.revision = repo_id, private, token, revision
        self.strict, self.dirpath = strict, dirpath
        self.export_dir: Path | None = None  # set once the export is written
        self.url: str | None = None  # set once the upload succeeded

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank calls it
        if not trainer.is_global_zero:
            return
        from vimssl.export import find_run_config, push_export, read_lightning_checkpoint, write_export

        out_dir = Path(self.dirpath or run_dir) / "hub_export"
        callback = trainer.checkpoint_callback
        ckpt = (callback.best_model_path or callback.last_model_path) if callback is not None else ""
        step = "exporting"
        try:
            if ckpt and Path(ckpt).is_file():
                checkpoint, source = read_lightning_checkpoint(ckpt), ckpt
                config_text = find_run_config(ckpt)
            else:
                checkpoint, source = module_checkpoint(trainer, pl_module), "the trained module"
                config_file = run_dir / "config.yaml"
                config_text = config_file.read_text() if config_file.is_file() else None
            self.export_dir = write_export(
                checkpoint, out_dir, config_text=config_text, repo_id=self.repo_id, overwrite=True,
                source=source,
            )  # fmt: skip
            log.info("PushToHub: exported %s to %s", source, out_dir)
            step = "uploading"
            self.url = push_export(
                out_dir, self.repo_id, private=self.private, token=self.token, revision=self.revision
            )
        except Exception as err:
            if self.strict:
                raise
            log.warning("PushToHub: %s failed, training itself is unaffected: %s", step, err)
            return
        log.info("PushToHub: uploaded %s to %s", out_dir, self.url)


def module_checkpoint(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
    """What ``vimssl.export`` reads from a ``.ckpt``, taken from the live module: weights,
    hyper-parameters, progress and the module's ``vimssl`` entry (its ``on_save_checkpoint``)."""
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
        "global_step": trainer.global_step,
        "loops": {"fit_loop": {"epoch_progress": trainer.fit_loop.epoch_progress.state_dict()}},
        "hyper_parameters": dict(pl_module.hparams),
    }
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and getattr(datamodule, "hparams", None):
        checkpoint["datamodule_hyper_parameters"] = dict(datamodule.hparams)
    pl_module.on_save_checkpoint(checkpoint)
    return checkpoint

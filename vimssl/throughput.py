"""Training-loop pieces shared by the LightningModules (a mixin, not a model piece): images/s
logging and the non-finite-loss guard."""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("vimssl")


class ImagesPerSecond:
    """Logs ``train/images_per_sec``: images of all processes over the wall time between two
    training batches (data loading, compute and optimiser step together). Also holds
    :meth:`loss_is_usable`, the non-finite-loss guard (``hparams.nonfinite_loss``)."""

    _t_last: float | None = None
    skipped_steps: int = 0

    def loss_is_usable(self, loss: torch.Tensor) -> bool:
        """False when the step must be skipped (``nonfinite_loss="skip"`` and a non-finite loss on
        any process); raises ``FloatingPointError`` with the step number under ``"raise"``."""
        bad = not bool(torch.isfinite(loss))
        if self._trainer is not None and self.trainer.world_size > 1:
            # every process must take the same decision, or DDP's gradient all-reduce would hang
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return True
        msg = (
            f"non-finite loss ({loss.item()}) at global step {self.global_step} (epoch {self.current_epoch})"
        )
        if self.hparams.nonfinite_loss == "raise":
            raise FloatingPointError(
                msg + "; lower the learning rate, check the data, or set model.init_args.nonfinite_loss=skip"
            )
        self.skipped_steps += 1
        log.warning("%s: step skipped (%d so far)", msg, self.skipped_steps)
        return False

    def on_train_epoch_start(self) -> None:
        self._t_last = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._trainer is None:  # called by hand, outside a Trainer
            return
        now = time.perf_counter()
        n = batch[0].shape[0]
        if self._t_last is not None:
            rate = n * self.trainer.world_size / max(now - self._t_last, 1e-9)
            self.log("train/images_per_sec", rate, prog_bar=True, batch_size=n)
        self._t_last = now

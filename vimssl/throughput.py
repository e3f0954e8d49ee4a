"""Images-per-second logging shared by the LightningModules (a mixin, not a model piece)."""

from __future__ import annotations

import time


class ImagesPerSecond:
    """Logs ``train/images_per_sec``: images of all processes over the wall time between two
    training batches (data loading, compute and optimiser step together)."""

    _t_last: float | None = None

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

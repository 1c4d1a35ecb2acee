"""Training callbacks shared by the language model and the image classifier."""

import time

import pytorch_lightning as pl
import torch


class Throughput(pl.Callback):
    """Logs `perf/train_<unit>_per_sec`: items of the batch (tokens, images) over the wall time of
    the whole step, data loading and optimizer included, summed over all ranks."""

    def __init__(self, unit: str = "tokens", key: str = "targets"):
        self.unit = unit
        self.key = key
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        items = batch[self.key].numel() * trainer.world_size
        rate = items / max(now - self._start, 1e-9)
        self._start = now
        pl_module.log(f"perf/train_{self.unit}_per_sec", torch.tensor(rate, dtype=torch.float32))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start = None  # validation time is not training time

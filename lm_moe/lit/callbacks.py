"""Training callbacks shared by the language model and the image classifier."""

import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info


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


class TextPredictionWriter(BasePredictionWriter):
    """Decodes what `predict` generated with the data module's tokenizer, appends it to
    `<log dir>/predictions.jsonl` (one {"prompt", "generated"} per line) and prints the first few."""

    def __init__(self, shown: int = 3):
        super().__init__(write_interval="batch")
        self.shown = shown
        self._printed = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        tokenizer = trainer.datamodule.tokenizer
        path = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as out:
            for prompt, generated in zip(prediction["prompt_ids"].tolist(), prediction["generated_ids"].tolist()):
                record = {"prompt": tokenizer.decode(prompt), "generated": tokenizer.decode(generated)}
                out.write(json.dumps(record) + "\n")
                if self._printed < self.shown:
                    rank_zero_info(f"--- prompt ---\n{record['prompt']}\n--- generated ---\n{record['generated']}")
                    self._printed += 1

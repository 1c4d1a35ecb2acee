"""Training callbacks shared by the language model and the image classifier."""

import json
import os
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


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes what `predict` returns to `<log dir>/predictions.jsonl` (a fresh file each run), one
    record per line, and prints the first `shown` records. Subclasses say what a batch's records
    are and how one reads."""

    def __init__(self, shown: int = 3):
        super().__init__(write_interval="batch")
        self.shown = shown
        self._printed = 0

    def records(self, trainer, prediction: dict[str, torch.Tensor], indices: list[int]) -> list[dict]:
        """The records of one batch, whose items are `indices` of the predicted dataset."""
        raise NotImplementedError

    def describe(self, record: dict) -> str:
        raise NotImplementedError

    def on_predict_start(self, trainer, pl_module) -> None:
        # Found once, on every rank together: trainer.log_dir broadcasts from rank zero, and under
        # DDP the ranks may get different numbers of batches, so no per-batch collective.
        self._path = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        if trainer.is_global_zero:  # each run starts a fresh file (without a logger, runs share a folder)
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._path.unlink(missing_ok=True)
        trainer.strategy.barrier()  # no rank appends before the old file is gone

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        records = self.records(trainer, prediction, batch_indices)
        # One write of the whole batch on an O_APPEND descriptor: the ranks' batches do not interleave.
        data = "".join(json.dumps(record) + "\n" for record in records).encode("utf-8")
        descriptor = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while data:
                data = data[os.write(descriptor, data) :]
        finally:
            os.close(descriptor)
        for record in records[: max(0, self.shown - self._printed)]:
            rank_zero_info(self.describe(record))
            self._printed += 1


class TextPredictionWriter(JsonlPredictionWriter):
    """Records {"prompt", "generated"}: the language model's continuations, decoded with the data
    module's tokenizer."""

    def records(self, trainer, prediction: dict[str, torch.Tensor], indices: list[int]) -> list[dict]:
        tokenizer = trainer.datamodule.tokenizer
        pairs = zip(prediction["prompt_ids"].tolist(), prediction["generated_ids"].tolist())
        return [{"prompt": tokenizer.decode(prompt), "generated": tokenizer.decode(generated)} for prompt, generated in pairs]

    def describe(self, record: dict) -> str:
        return f"--- prompt ---\n{record['prompt']}\n--- generated ---\n{record['generated']}"


class ImagePredictionWriter(JsonlPredictionWriter):
    """Records {"index", "true", "predicted", "top_classes"}: each image's index in the predicted
    split, its true and predicted class names, and the classifier's most probable classes with
    their probabilities (highest first)."""

    def records(self, trainer, prediction: dict[str, torch.Tensor], indices: list[int]) -> list[dict]:
        names = trainer.datamodule.class_names
        rows = zip(indices, prediction["labels"].tolist(), prediction["top_classes"].tolist(),
                   prediction["top_probabilities"].tolist())
        return [
            {"index": index, "true": names[label], "predicted": names[classes[0]],
             "top_classes": [[names[c], round(p, 6)] for c, p in zip(classes, probabilities)]}
            for index, label, classes, probabilities in rows
        ]

    def describe(self, record: dict) -> str:
        return f"image {record['index']}: predicted {record['predicted']} ({record['top_classes'][0][1]:.3f}), true {record['true']}"

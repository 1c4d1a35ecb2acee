"""The checkpoint callback of every run: the best checkpoints by a metric, and last.ckpt always at
the newest step."""

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn


def write_last_checkpoint(trainer: pl.Trainer, checkpoint: ModelCheckpoint) -> Path:
    """Write `checkpoint`'s last.ckpt at the trainer's current step, as a file of its own (on every
    rank: saving is collective). With save_last="link", last.ckpt may be a link to a top-k
    checkpoint; Lightning writes a temporary file and renames it over the link, so that
    checkpoint stays as it is."""
    path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
    trainer.save_checkpoint(path, weights_only=False)  # the optimizer too: a resume continues it
    checkpoint.last_model_path = str(path)
    return path


class LastAndBestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with last.ckpt brought to the newest step at every validation
    and at the end of training.

    Lightning (2.6) rewrites last.ckpt at a validation only when it also writes a top-k checkpoint
    there, and at the end of training only if it never wrote one: a run whose validation loss rises
    at the end, or that ends between validations, would keep last.ckpt at an older step, and
    `--ckpt_path last`, sampling and evaluation would silently use an older model.
    """

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        # With save_last="link" Lightning links last.ckpt to the newest top-k checkpoint, which
        # is of this step only if one was written at this step.
        links_elsewhere = self.save_last == "link" and self._last_global_step_saved != trainer.global_step
        if self.save_last and not links_elsewhere:
            self._last_step = trainer.global_step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.bring_last_up_to_date(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.bring_last_up_to_date(trainer)

    def bring_last_up_to_date(self, trainer: pl.Trainer) -> None:
        """Write last.ckpt unless it already holds the current step (fit only, after step 0)."""
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.fast_dev_run
        if not self.save_last or not fitting or trainer.global_step == 0 or self.dirpath is None:
            return
        if getattr(self, "_last_step", None) != trainer.global_step:  # set by the first write
            write_last_checkpoint(trainer, self)
            self._last_step = trainer.global_step

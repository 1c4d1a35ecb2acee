"""Stopping a training run without losing the steps since its last checkpoint."""

import signal
import threading

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lm_moe.lit.checkpoint_callback import write_last_checkpoint


class CheckpointOnInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM (a scheduler's preemption) during `fit` writes last.ckpt at the last
    finished step, so that `--ckpt_path last` resumes there and not at the last validation.

    Ctrl-C: the step under way finishes, last.ckpt is written, then the run stops as Lightning
    stops on Ctrl-C (exit status 1). A second Ctrl-C stops at once, without writing.
    SIGTERM: Lightning stops the run after the step under way; last.ckpt is written there.
    Any other error writes nothing: the state that raised it may be broken (NaN weights), and the
    last.ckpt written before is kept. Single-process runs only: the ranks of a multi-process run
    stop at different points (measured with 2 DDP processes: a collective write on SIGTERM hung),
    so there Lightning's own handling stays, and the checkpoint of the last validation.
    """

    def __init__(self):
        self._stop_requested = False
        self._previous_handler = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_requested = False
        # Signal handlers can only be set from the main thread (not e.g. from a notebook's worker).
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_ctrl_c(self, signum, frame) -> None:
        if self._stop_requested:  # the second Ctrl-C: stop now
            self._restore_handler()
            raise KeyboardInterrupt
        self._stop_requested = True
        rank_zero_info("\nCtrl-C: stopping after this step and writing last.ckpt (Ctrl-C again: stop now, write nothing)")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        # Here, as for ModelCheckpoint's every_n_train_steps, the optimizer and the schedule have stepped.
        if self._stop_requested:
            self._restore_handler()
            self._save_last(trainer)
            raise KeyboardInterrupt

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        fitting_alone = trainer.world_size == 1 and trainer.state.fn == TrainerFn.FITTING
        if isinstance(exception, SIGTERMException) and fitting_alone:
            self._save_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    @staticmethod
    def _save_last(trainer: pl.Trainer) -> None:
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.dirpath is None or trainer.sanity_checking:
            return
        path = write_last_checkpoint(trainer, checkpoint)
        rank_zero_info(f"Stopped at step {trainer.global_step}: wrote {path}; `--ckpt_path last` resumes from there")

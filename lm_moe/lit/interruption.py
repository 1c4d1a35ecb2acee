"""Stopping a training run without losing the steps since its last checkpoint."""

import signal
import threading
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lm_moe.lit.checkpoint_callback import write_last_checkpoint


class CheckpointOnInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM (a scheduler's preemption) during `fit` writes last.ckpt at the last
    finished step, so that `--ckpt_path last` resumes there and not at the last validation.

    Either signal is noted by a handler of this callback. The optimizer step under way finishes,
    and so does a validation due after it (its score and best checkpoint count); last.ckpt is
    written after each, and the run stops before the next step, with exit status 1 for Ctrl-C
    (as Lightning stops on it) and 143 for SIGTERM. A second Ctrl-C stops at once, without
    writing. A signal during the last step lets the run finish as it would have. Any other error
    writes nothing: the state that raised it may be broken (NaN weights), and the last.ckpt
    written before is kept.

    In a multi-process run Ctrl-C is left to Lightning. SIGTERM to any rank, or to all of them as
    a scheduler sends it, is reduced over the ranks after each step and each validation, so that
    all of them write last.ckpt at the same step and stop together. (Lightning 2.6's own handler
    broadcasts from inside the signal handler: with every rank signalled, the ranks' collectives
    stop matching and the run hangs. In one process it stops a validation half-way, which the
    resumed run never redoes.)
    """

    def __init__(self):
        self._stop_requested = False
        self._sigterm_received = False
        self._stopping_with: type[BaseException] | None = None  # raised before the next step
        self._previous_handlers: dict[int, object] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_requested = self._sigterm_received = False
        self._stopping_with = None
        # Signal handlers can only be set from the main thread (not e.g. from a notebook's worker).
        if threading.current_thread() is not threading.main_thread():
            return
        if trainer.world_size == 1:
            self._previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_ctrl_c)
        self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm_received = True  # acted on after the step or validation under way, by every rank together

    def _on_ctrl_c(self, signum, frame) -> None:
        if self._stop_requested:  # the second Ctrl-C: stop now
            self._restore_handler()
            raise KeyboardInterrupt
        self._stop_requested = True
        rank_zero_info(
            "\nCtrl-C: stopping after this step (and its validation) and writing last.ckpt "
            "(Ctrl-C again: stop now, write nothing)"
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        # Here, as for ModelCheckpoint's every_n_train_steps, the optimizer and the schedule have
        # stepped, unless the batch only accumulated gradients, which a checkpoint would lose.
        if self._stopping_with is None and not trainer.fit_loop.epoch_loop._should_accumulate():
            self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._previous_handlers:  # (handlers are set during fit only)
            return
        if self._stopping_with is not None:
            self._save_last(trainer)  # again, with the validation that followed the step done
        else:
            self._stop_if_signalled(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if self._stopping_with is not None:
            self._restore_handler()
            raise self._stopping_with

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        if self._stop_requested:
            self._stopping_with = KeyboardInterrupt
        elif signal.SIGTERM in self._previous_handlers and self._any_rank_received_sigterm(trainer):
            self._stopping_with = SIGTERMException
        else:
            return
        path = self._save_last(trainer)  # collective: every rank is at this step
        if path is not None:
            rank_zero_info(f"Stopping at step {trainer.global_step}: wrote {path}; `--ckpt_path last` resumes from there")

    def _any_rank_received_sigterm(self, trainer: pl.Trainer) -> bool:
        if trainer.world_size == 1:
            return self._sigterm_received
        noted = torch.tensor([int(self._sigterm_received)], device=trainer.strategy.root_device)
        dist.all_reduce(noted, op=dist.ReduceOp.MAX)  # one small collective per step and validation
        return bool(noted.item())

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    @staticmethod
    def _save_last(trainer: pl.Trainer) -> Path | None:
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.dirpath is None:
            return None
        return write_last_checkpoint(trainer, checkpoint)

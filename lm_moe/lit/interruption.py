"""Stopping a training run without losing the steps since its last checkpoint."""

import signal
import threading

import pytorch_lightning as pl
import torch
import torch.distributed as dist
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
    last.ckpt written before is kept.

    In a multi-process run Ctrl-C is left to Lightning. SIGTERM to any rank, or to all of them as
    a scheduler sends it, is noted by a handler of its own: at the end of each step the ranks
    reduce their notes, so all of them write last.ckpt at the same step and stop together with
    SIGTERM's exit status. (Lightning 2.6's handler broadcasts from inside the signal handler: with
    every rank signalled, the ranks' collectives no longer matched and the run hung.)
    """

    def __init__(self):
        self._stop_requested = False
        self._sigterm_received = False
        self._previous_handlers: dict[int, object] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_requested = self._sigterm_received = False
        # Signal handlers can only be set from the main thread (not e.g. from a notebook's worker).
        if threading.current_thread() is not threading.main_thread():
            return
        if trainer.world_size == 1:
            self._previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_ctrl_c)
        else:
            self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm_received = True  # acted on at the end of the step, by every rank together

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
        if signal.SIGTERM in self._previous_handlers and self._any_rank_received_sigterm(trainer):
            self._save_last(trainer)  # collective: every rank is at this step
            # Lightning raises SIGTERMException at the end of this step, on every rank.
            trainer._signal_connector.received_sigterm = True

    def _any_rank_received_sigterm(self, trainer: pl.Trainer) -> bool:
        noted = torch.tensor([int(self._sigterm_received)], device=trainer.strategy.root_device)
        dist.all_reduce(noted, op=dist.ReduceOp.MAX)  # one small collective per step, as Lightning's own check
        return bool(noted.item())

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        fitting_alone = trainer.world_size == 1 and trainer.state.fn == TrainerFn.FITTING
        if isinstance(exception, SIGTERMException) and fitting_alone:
            self._save_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    @staticmethod
    def _save_last(trainer: pl.Trainer) -> None:
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.dirpath is None or trainer.sanity_checking:
            return
        path = write_last_checkpoint(trainer, checkpoint)
        rank_zero_info(f"Stopped at step {trainer.global_step}: wrote {path}; `--ckpt_path last` resumes from there")

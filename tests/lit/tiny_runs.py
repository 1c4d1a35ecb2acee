"""Trainer flags that make any config's run a few seconds long, for the CLI tests of both tasks."""

import json
import os
from pathlib import Path

import pytorch_lightning as pl

from lm_moe.lit.checkpoints import read_checkpoint

REPO = Path(__file__).resolve().parents[2]  # the checkout, whose configs the runs train


def tiny_run_args(cache_dir: Path, steps: int) -> list[str]:
    """`steps` training steps, validation of 2 batches every 2 steps, logging every step, no
    progress bar or model summary, the data cached in `cache_dir`."""
    return [
        f"--data.cache_dir={cache_dir}",
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


class SignalAtStep(pl.Callback):
    """Sends this process signal `signum` as training step `step` starts, as Ctrl-C (SIGINT) or a
    scheduler's preemption (SIGTERM) would; with `in_validation`, during the second batch of the
    validation after step `step` instead. For the CLI: `--trainer.callbacks+=tests.lit.tiny_runs.SignalAtStep`."""

    def __init__(self, step: int, signum: int, in_validation: bool = False):
        self.step = step
        self.signum = signum
        self.in_validation = in_validation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.in_validation and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.in_validation and not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == 1:
            os.kill(os.getpid(), self.signum)


class LastCheckpointSteps(pl.Callback):
    """Records, as each training step starts, the step last.ckpt holds (None before it exists),
    in `steps`: what a run killed at that moment would resume from."""

    def __init__(self):
        self.steps: list[int | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        self.steps.append(read_checkpoint(path)["global_step"] if path.is_file() else None)


class BatchFingerprints(pl.Callback):
    """Records each training batch as (global step, first token of every row), in `batches`."""

    def __init__(self):
        self.batches: list[tuple[int, tuple[int, ...]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((trainer.global_step, tuple(batch["input_ids"][:, 0].tolist())))


class WeightsAtStart(pl.Callback):
    """Records, as training starts, the model's weights (`weights`), the step and the optimizer
    state entries (`step`, `optimizer_entries`): what a run starts from."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.weights = {name: tensor.detach().clone() for name, tensor in pl_module.model.state_dict().items()}
        self.step = trainer.global_step
        self.optimizer_entries = len(trainer.optimizers[0].state)


class ExpertCounts(pl.Callback):
    """Writes, as training starts, the experts each MoE layer holds on this rank, to
    experts_rank<r>.json in the trainer's root folder."""

    def on_train_start(self, trainer, pl_module) -> None:
        from lm_moe.layers.feed_forward_layer import feed_forward_layers

        counts = [layer.experts.num_experts for layer in feed_forward_layers(pl_module.model) if hasattr(layer, "experts")]
        Path(trainer.default_root_dir, f"experts_rank{trainer.global_rank}.json").write_text(json.dumps(counts))

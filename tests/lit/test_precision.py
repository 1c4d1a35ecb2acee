"""bf16-mixed tracks fp32 over a few training steps, for every LM config and the Soft MoE ViT."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lm_moe import cli

from .lm_runs import LM_CONFIGS, REPO, tiny_args
from .vit_runs import tiny_args as tiny_vit_args

# bf16 keeps 8 bits of mantissa: per-step losses (about 6 nats here) may differ in the third digit.
LOSS_TOLERANCE = 0.05


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def training_losses(config: Path, precision: str, cache: Path, work: Path, shrink=tiny_args) -> list[float]:
    """Per-step training losses of 5 steps of `config` made tiny by `shrink`."""
    built = cli.main(
        ["-c", str(config), *shrink(cache, steps=5), f"--trainer.precision={precision}",
         "--seed_everything=7", f"--trainer.logger.init_args.save_dir={work}/runs", f"--trainer.default_root_dir={work}"],
        run=False,
    )
    recorder = LossRecorder()
    built.trainer.callbacks.append(recorder)
    built.trainer.fit(built.model, built.datamodule)
    return recorder.losses


@pytest.mark.parametrize("config", LM_CONFIGS, ids=[path.stem for path in LM_CONFIGS])
def test_bf16_mixed_losses_follow_fp32(config, tmp_path):
    fp32 = training_losses(config, "32-true", tmp_path / "cache", tmp_path)
    bf16 = training_losses(config, "bf16-mixed", tmp_path / "cache", tmp_path)
    assert len(fp32) == len(bf16) == 5
    differences = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert max(differences) <= LOSS_TOLERANCE, (fp32, bf16)
    assert all(torch.isfinite(torch.tensor(bf16)))


def test_bf16_mixed_losses_of_the_soft_moe_vit_follow_fp32(tmp_path):
    config = REPO / "configs/vit/soft_moe.yaml"
    fp32 = training_losses(config, "32-true", tmp_path / "cache", tmp_path, tiny_vit_args)
    bf16 = training_losses(config, "bf16-mixed", tmp_path / "cache", tmp_path, tiny_vit_args)
    assert len(fp32) == len(bf16) == 5
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) <= LOSS_TOLERANCE, (fp32, bf16)


def test_fp16_mixed_falls_back_to_bf16_on_cpu(tmp_path):
    built = cli.main(["-c", str(LM_CONFIGS[0]), *tiny_args(tmp_path / "cache"), "--trainer.precision=16-mixed"], run=False)
    assert built.trainer.precision == "bf16-mixed"

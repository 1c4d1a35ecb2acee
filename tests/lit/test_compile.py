"""`model.compile: true` runs the training forward through torch.compile (inductor, on the CPU here)."""

import pytest
import torch
import torch.nn.functional as F

from lm_moe import cli

from .lm_runs import REPO

TINY = ["--model.n_layer=1", "--model.dim=32", "--model.n_head=2", "--model.dense_hidden_dim=64",
        "--data.max_documents=40", "--data.vocab_size=512", "--data.block_size=32", "--data.batch_size=4",
        "--data.val_fraction=0.2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]


@pytest.mark.parametrize("config", ["dense", "top2"])
def test_compiled_training_forward_matches_eager_and_trains(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["-c", str(REPO / f"configs/lm/{config}.yaml"), *TINY, f"--data.cache_dir={tmp_path}/cache", "--model.compile=true"]
    built = cli.main(args + ["--trainer.max_steps=2"], run=False)
    module, data = built.model, built.datamodule
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert module._forward is not module.model.forward  # the compiled function
    compiled_loss, _ = module._loss(batch["input_ids"], batch["targets"])
    eager = module.model(batch["input_ids"])
    eager_loss = F.cross_entropy(eager.logits.float().flatten(0, 1), batch["targets"].flatten())
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-4)

    built.trainer.fit(module, data)
    assert built.trainer.global_step == 2
    assert torch.isfinite(built.trainer.callback_metrics["train/loss"])

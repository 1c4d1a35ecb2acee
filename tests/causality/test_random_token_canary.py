"""Slow canary: on uniform random tokens nothing is predictable, so a causal model's held-out loss
cannot go below ln(V); a model that sees the future can. It catches gross leaks only."""

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lm_moe import cli
from lm_moe.layers import SoftMoE
from lm_moe.models import GPT

REPO = Path(__file__).resolve().parents[2]
LM_CONFIGS = sorted((REPO / "configs" / "lm").glob("*.yaml"))
VOCAB, BLOCK, STEPS = 64, 16, 300


def held_out_loss_after_training(model: GPT, batch: int = 16) -> float:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (batch, BLOCK + 1), generator=generator)
        output = model(ids[:, :-1])
        loss = F.cross_entropy(output.logits.flatten(0, 1), ids[:, 1:].flatten()) + output.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        ids = torch.randint(0, VOCAB, (256, BLOCK + 1), generator=generator)
        return float(F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten()))


@pytest.mark.slow
@pytest.mark.parametrize("config", LM_CONFIGS, ids=[path.stem for path in LM_CONFIGS])
def test_causal_config_cannot_beat_chance_on_random_tokens(config):
    overrides = ["--model.n_layer=2", "--model.dim=64", "--model.n_head=2", "--model.dense_hidden_dim=128",
                 f"--data.vocab_size={VOCAB + 256}", f"--data.block_size={BLOCK}", "--trainer.logger=false"]
    torch.manual_seed(0)
    model = cli.main(["-c", str(config), *overrides], run=False).model.model
    # The vocabulary is wider than the tokens drawn; ln(VOCAB) is still the floor for these.
    assert held_out_loss_after_training(model) >= math.log(VOCAB) - 0.02


@pytest.mark.slow
def test_canary_catches_a_model_that_sees_the_future():
    torch.manual_seed(0)
    model = GPT(VOCAB, BLOCK, n_layer=2, n_head=2, dim=64, ffn=partial(SoftMoE, hidden_dim=64, num_experts=16),
                allow_noncausal=True)
    assert held_out_loss_after_training(model) < math.log(VOCAB) - 0.1

"""The sparse baseline's recipe (docs/moe_baseline.md): the top-2 config starts at the dense MLP's
output scale, with a small router, and trains level with dense on a tiny corpus."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lm_moe.layers import SegmentMergedMoE, TopKMoE
from lm_moe.lit.optim import build_adamw_with_schedule
from lm_moe.models import GPT
from lm_moe.profiling.models import build_from_config

REPO = Path(__file__).resolve().parents[1]


def initial_ffn_output_rms(config: str) -> float:
    """RMS of block 0's FFN output, at initialisation, on inputs of unit variance per feature
    (what the block's LayerNorm hands it)."""
    torch.manual_seed(0)
    model = build_from_config(REPO / config, block_size=64)
    x = torch.randn(4, 64, model.wte.embedding_dim)  # [B, T, D]
    with torch.no_grad():
        y, _ = model.blocks[0].ffn(x)
    return y.pow(2).mean().sqrt().item()


def test_top2_config_starts_at_the_dense_mlp_output_scale():
    # Renormalised weights make a top-2 output the mean of two experts, half the dense one, unless
    # route_scale scales them up: configs/lm/top2.yaml does, docs/moe_baseline/configs/top2_before.yaml not.
    ratio = initial_ffn_output_rms("configs/lm/top2.yaml") / initial_ffn_output_rms("configs/lm/dense.yaml")
    assert 0.8 < ratio < 1.25
    before = initial_ffn_output_rms("docs/moe_baseline/configs/top2_before.yaml")
    assert before / initial_ffn_output_rms("docs/moe_baseline/configs/dense_before.yaml") < 0.6


def block_ffn_output_rms(model: GPT) -> float:
    torch.manual_seed(1)
    x = torch.randn(4, 64, 256)  # [B, T, D]
    with torch.no_grad():
        y, _ = model.blocks[0].ffn(x)
    return y.pow(2).mean().sqrt().item()


def test_segment_merged_experts_start_so_that_their_mix_has_one_mlps_scale():
    # The merged FFN averages the E experts' weights: each drawn sqrt(E) larger, their mix
    # starts at the scale of one MLP of the same width (drawn at one MLP's scale, at 1/E of its output).
    torch.manual_seed(0)
    merged = GPT(100, 64, n_layer=1, dim=256, ffn=lambda dim: SegmentMergedMoE(dim, 896, num_experts=8, segment_size=16))
    dense = GPT(100, 64, n_layer=1, dim=256, dense_hidden_dim=896, dense_activation="gelu")
    assert 0.8 < block_ffn_output_rms(merged) / block_ffn_output_rms(dense) < 1.25


def test_top2_defaults_sum_the_combine_weights_to_k_and_start_the_router_small():
    torch.manual_seed(0)
    moe = TopKMoE(dim=256, hidden_dim=64, num_experts=8, top_k=2)
    x = torch.randn(512, 256)  # [N, D]
    routing = moe.router(x)
    torch.testing.assert_close(routing.weight.sum(-1), torch.full((512,), 2.0))
    assert routing.logits.std().item() == pytest.approx(0.02 * 256**0.5, rel=0.1)
    raw = TopKMoE(dim=256, hidden_dim=64, num_experts=8, top_k=2, renormalize=False)
    assert raw.router.route_scale == 1.0  # raw probabilities keep their scale (Switch, ST-MoE)


def two_language_corpus(blocks: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows of two kinds, alternating: a walk on one random successor table over the low half of
    the vocabulary, or on another over the high half. [blocks, length + 1] token ids."""
    generator = torch.Generator().manual_seed(seed)
    half = vocab // 2
    successors = [torch.randint(0, half, (half, 2), generator=generator) + offset for offset in (0, half)]
    rows = torch.empty(blocks, length + 1, dtype=torch.long)
    for row in range(blocks):
        table, offset = successors[row % 2], (row % 2) * half
        token = int(torch.randint(0, half, (1,), generator=generator)) + offset
        for t in range(length + 1):
            rows[row, t] = token
            token = int(table[token - offset, int(torch.randint(0, 2, (1,), generator=generator))])
    return rows


def trained_loss(ffn, corpus: torch.Tensor, seed: int, steps: int = 120) -> float:
    """Validation loss of a 1-layer GPT (width 32) with this FFN after `steps` AdamW steps."""
    torch.manual_seed(seed)
    vocab, length = int(corpus.max()) + 1, corpus.shape[1] - 1
    model = GPT(vocab, length, n_layer=1, n_head=2, dim=32, ffn=ffn)
    optimizer = build_adamw_with_schedule(model, 3e-3, 0.1, (0.9, 0.95), 10, steps, 0.1)
    adamw, schedule = optimizer["optimizer"], optimizer["lr_scheduler"]["scheduler"]
    train, val = corpus[:-64], corpus[-64:]
    order = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (16,), generator=order)]
        output = model(batch[:, :-1])
        loss = F.cross_entropy(output.logits.flatten(0, 1), batch[:, 1:].flatten()) + output.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        adamw.step()
        adamw.zero_grad()
        schedule.step()
    with torch.no_grad():
        output = model.eval()(val[:, :-1])
    return F.cross_entropy(output.logits.flatten(0, 1), val[:, 1:].flatten()).item()


def test_top2_trains_level_with_dense_at_matched_active_flops():
    # Dense: the default GELU MLP of width 128 (4 x 32); top-2: 4 GELU experts of width 64 with the
    # layer's defaults. On two kinds of text the experts can take one kind each; top-2 must not
    # trail dense by more than noise.
    corpus = two_language_corpus(blocks=576, length=32, vocab=64, seed=0)
    gaps = []
    for seed in (0, 1):
        dense = trained_loss(None, corpus, seed)
        top2 = trained_loss(lambda dim: TopKMoE(dim, 64, num_experts=4, top_k=2), corpus, seed)
        gaps.append(top2 - dense)
    assert max(gaps) < 0.05, gaps

"""GPT model: cached decoding equals the full forward, causality, block layout, init, generation."""

import math
from functools import partial

import pytest
import torch
from torch import nn

from lm_moe.layers.attention import apply_rotary, rotary_cos_sin
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.ffn import DenseFFN
from lm_moe.layers.layer_output import LayerAux
from lm_moe.layers.mixture_of_tokens import MixtureOfTokens
from lm_moe.layers.soft_moe import SoftMoE
from lm_moe.layers.sparse_moe import TopKMoE
from lm_moe.models import GPT, generate

VOCAB, BLOCK = 37, 16


class CumulativeMeanFFN(FeedForwardLayer):
    """Test-only causal token mixer with decode state: y_t = W mean(x_0..x_t)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask=None):
        counts = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)  # [T]
        return self.proj(x.cumsum(1) / counts[:, None]), LayerAux.empty(x)

    def decode(self, x, state):
        total, count = state if state is not None else (torch.zeros_like(x[:, 0]), 0)
        sums = total[:, None] + x.cumsum(1)  # [B, t, D]
        counts = count + torch.arange(1, x.shape[1] + 1, dtype=x.dtype)  # [t]
        return self.proj(sums / counts[:, None]), (sums[:, -1], count + x.shape[1])


class ConstantLossFFN(DenseFFN):
    """Dense FFN that reports a known aux loss and one stat."""

    LOSS = 0.25

    def __init__(self, dim: int):
        super().__init__(dim, 2 * dim)

    def forward(self, x, mask=None):
        y, _ = super().forward(x)
        return y, LayerAux(loss=torch.tensor(self.LOSS), stats={"marker": torch.tensor(1.0)})


class MarkerFFN(DenseFFN):
    def __init__(self, dim: int):
        super().__init__(dim, dim)


def make_model(positions="learned", ffn=None, moe_blocks="all", n_layer=3, **kwargs):
    torch.manual_seed(0)
    model = GPT(VOCAB, BLOCK, n_layer=n_layer, n_head=2, dim=16, ffn=ffn, moe_blocks=moe_blocks,
                positions=positions, **kwargs)
    return model.double().eval()


def random_ids(batch=2, length=BLOCK, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


FFNS = {
    "dense": None,
    "stateful": CumulativeMeanFFN,
    "top2": partial(TopKMoE, hidden_dim=24, num_experts=4, top_k=2),
}
PIECES = {
    "prefill_then_steps": [4] + [1] * 8,
    "split_prefill": [5, 3] + [1] * 4,
    "three_pieces": [2, 1, 6, 3],
}


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("pieces", PIECES)
def test_cached_decoding_matches_full_forward(positions, ffn, pieces):
    model = make_model(positions, FFNS[ffn], moe_blocks="every_other")
    ids = random_ids(length=sum(PIECES[pieces]))
    with torch.no_grad():
        full = model(ids).logits  # [B, T, V]
        cache = model.new_cache(batch_size=2)
        start, decoded = 0, []
        for n in PIECES[pieces]:
            out = model(ids[:, start:start + n], cache=cache)
            assert out.cache is cache and cache.length == start + n
            decoded.append(out.logits)
            start += n
    torch.testing.assert_close(torch.cat(decoded, dim=1), full, rtol=0, atol=1e-10)
    states = [block.ffn_state is not None for block in cache.blocks]
    assert states == [False, ffn == "stateful", False]  # only the decode() FFN keeps state
    if ffn == "top2":
        assert isinstance(model.blocks[1].ffn, TopKMoE)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("t", [0, 5, BLOCK - 2])
def test_future_tokens_do_not_change_past_logits(positions, t):
    model = make_model(positions, CumulativeMeanFFN, moe_blocks="all")
    ids = random_ids()
    changed = ids.clone()
    changed[:, t + 1:] = (ids[:, t + 1:] + 1 + random_ids(seed=2)[:, t + 1:] % (VOCAB - 1)) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=0)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().amax() > 1e-6  # not vacuous


@pytest.mark.parametrize("moe_blocks, n_layer, expected", [
    ("all", 6, {0, 1, 2, 3, 4, 5}),
    ("every_other", 6, {1, 3, 5}),
    ("every_other", 5, {1, 3}),
    ("second_half", 6, {3, 4, 5}),
    ("second_half", 5, {2, 3, 4}),
    ("none", 6, set()),
])
def test_moe_blocks_placement(moe_blocks, n_layer, expected):
    model = GPT(VOCAB, BLOCK, n_layer=n_layer, n_head=2, dim=8, ffn=MarkerFFN, moe_blocks=moe_blocks,
                dense_hidden_dim=12)
    marked = {i for i, block in enumerate(model.blocks) if isinstance(block.ffn, MarkerFFN)}
    assert marked == expected
    for i, block in enumerate(model.blocks):
        if i not in expected:
            assert type(block.ffn) is DenseFFN and block.ffn.expert.hidden_dim == 12


def test_no_ffn_factory_means_all_dense():
    model = GPT(VOCAB, BLOCK, n_layer=2, n_head=2, dim=8)
    assert all(type(block.ffn) is DenseFFN and block.ffn.expert.hidden_dim == 32 for block in model.blocks)


def test_aux_loss_sums_layers_and_stats_are_keyed_by_block():
    model = make_model(ffn=ConstantLossFFN, moe_blocks="every_other", n_layer=5)
    out = model(random_ids())
    assert out.aux_loss.item() == pytest.approx(2 * ConstantLossFFN.LOSS)
    assert set(out.layer_stats) == {"block_1", "block_3"}
    assert set(out.layer_stats["block_1"]) == {"marker"}
    assert out.cache is None


def test_embeddings_are_tied_and_counted_once():
    model = GPT(VOCAB, BLOCK, n_layer=2, n_head=2, dim=8)
    assert model.lm_head.weight is model.wte.weight
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))
    assert model.num_parameters() < sum(p.numel() for p in model.state_dict().values())


def test_gpt2_init_std():
    n_layer, dim = 4, 256
    torch.manual_seed(0)
    model = GPT(1000, 64, n_layer=n_layer, n_head=4, dim=dim, positions="learned")
    residual = 0.02 / math.sqrt(2 * n_layer)
    block = model.blocks[0]
    expected = {
        "wte": (model.wte.weight, 0.02),
        "wpe": (model.wpe.weight, 0.02),
        "qkv": (block.attn.qkv.weight, 0.02),
        "ffn w_in": (block.ffn.expert.w_in, 0.02),
        "attn proj": (block.attn.proj.weight, residual),
        "ffn w_out": (block.ffn.expert.w_out, residual),
    }
    for name, (weight, std) in expected.items():
        assert weight.std().item() == pytest.approx(std, rel=0.05), name
        assert abs(weight.mean().item()) < std / 10, name


def test_defaults_are_rotary_positions_and_a_4x_gelu_mlp_or_a_swiglu_one_of_its_flops():
    model = GPT(VOCAB, BLOCK, n_layer=1, n_head=2, dim=256)
    assert model.wpe is None and model.blocks[0].attn.rotary
    experts = model.blocks[0].ffn.expert
    assert experts.activation == "gelu" and experts.hidden_dim == 1024
    swiglu = GPT(VOCAB, BLOCK, n_layer=1, n_head=2, dim=256, dense_activation="swiglu").blocks[0].ffn.expert
    # 3 * 256 * 688 multiply-adds against the GELU MLP's 2 * 256 * 1024: within 1%.
    assert swiglu.hidden_dim == 688 and 3 * 688 / (2 * 1024) == pytest.approx(1, abs=0.01)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64).unbind(0)  # [1, 1, 1, hd] each
    def score(i, j):
        cos, sin = rotary_cos_sin(torch.tensor([i, j]), 8, 10000.0, torch.float64)
        return (apply_rotary(q, cos[:1], sin[:1]) * apply_rotary(k, cos[1:], sin[1:])).sum()
    assert score(7, 3).item() == pytest.approx(score(12, 8).item(), abs=1e-12)
    assert score(7, 3).item() != pytest.approx(score(7, 5).item(), abs=1e-6)


def test_too_long_input_raises():
    model = make_model()
    with pytest.raises(ValueError, match=f"{BLOCK + 1}.*block_size {BLOCK}"):
        model(random_ids(length=BLOCK + 1))
    cache = model.new_cache(2)
    model(random_ids(length=BLOCK - 2), cache=cache)
    with pytest.raises(ValueError, match=f"cached {BLOCK - 2} \\+ new 3"):
        model(random_ids(length=3), cache=cache)
    with pytest.raises(ValueError, match="batch size 1"):
        model(random_ids(batch=1, length=1), cache=cache)


@pytest.mark.parametrize("kwargs, name", [
    ({"dim": 10, "n_head": 4}, "dim must be divisible by n_head"),
    ({"moe_blocks": "odd"}, "moe_blocks"),
    ({"positions": "alibi"}, "positions"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"block_size": -1}, "block_size"),
    ({"n_layer": 0}, "n_layer"),
    ({"n_head": 0}, "n_head"),
    ({"dim": 0}, "dim"),
    ({"dense_hidden_dim": 0}, "dense_hidden_dim"),
    ({"dense_activation": "relu"}, "dense_activation"),
    ({"dropout": 1.0}, "dropout"),
    ({"ffn": "topk"}, "ffn"),
    ({"positions": "rotary", "dim": 6, "n_head": 2}, "rotary"),
])
def test_bad_arguments_raise_value_error(kwargs, name):
    args = {"vocab_size": VOCAB, "block_size": BLOCK, "n_layer": 2, "n_head": 2, "dim": 8} | kwargs
    with pytest.raises(ValueError, match=name):
        GPT(**args)


def greedy_rollout(model, ids, n):
    """Greedy decoding with the full forward pass, no cache."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("positions, ffn", [("learned", None), ("rotary", CumulativeMeanFFN)])
def test_greedy_generation_matches_full_forward_rollout(positions, ffn):
    model = make_model(positions, ffn)
    prompt = random_ids(length=4)
    out = generate(model, prompt, max_new_tokens=10, temperature=0)
    assert out.shape == (2, 14) and torch.equal(out[:, :4], prompt)
    assert torch.equal(out, generate(model, prompt, max_new_tokens=10, temperature=0))
    assert torch.equal(out, greedy_rollout(model, prompt, 10))


def test_generation_fills_mixture_of_tokens_groups_and_returns_the_real_rows():
    model = make_model(ffn=partial(MixtureOfTokens, hidden_dim=8, num_experts=2, group_size=4))
    prompt = random_ids(batch=3, length=4)
    out = generate(model, prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (3, 10)
    # The fourth row of the group is a copy of the first, as fill_groups adds it.
    assert torch.equal(out, greedy_rollout(model, torch.cat([prompt, prompt[:1]]), 6)[:3])


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = make_model()
    prompt = random_ids(length=3)
    greedy = generate(model, prompt, 8, temperature=0)
    assert torch.equal(generate(model, prompt, 8, top_k=1), greedy)
    assert torch.equal(generate(model, prompt, 8, top_p=1e-9), greedy)


def test_sampling_is_reproducible_with_a_generator():
    model = make_model()
    prompt = random_ids(length=3)
    def sample(seed):
        return generate(model, prompt, 10, temperature=1.5, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(0), sample(0))
    assert ((sample(0) >= 0) & (sample(0) < VOCAB)).all()


def test_eos_stops_generation_and_pads_finished_rows():
    model = make_model()
    prompt = random_ids(length=3)
    greedy = generate(model, prompt, 10, temperature=0)
    eos = greedy[0, 5].item()
    first = (greedy[0, 3:] == eos).nonzero()[0].item()  # index of row 0's first eos among new tokens

    alone = generate(model, prompt[:1], 10, temperature=0, eos_id=eos)
    assert alone.shape == (1, 3 + first + 1)  # stopped right after its eos
    assert torch.equal(alone, greedy[:1, :3 + first + 1])

    both = generate(model, prompt, 10, temperature=0, eos_id=eos)
    assert torch.equal(both[0, :3 + first + 1], greedy[0, :3 + first + 1])
    assert (both[0, 3 + first:] == eos).all()
    if not (greedy[1, 3:] == eos).any():  # row 1 never finishes, so generation runs to the end
        assert both.shape == (2, 13) and torch.equal(both[1], greedy[1])


def test_generate_rejects_too_long_prompt_and_bad_args():
    model = make_model()
    assert generate(model, random_ids(length=10), max_new_tokens=BLOCK - 10).shape == (2, BLOCK)
    with pytest.raises(ValueError, match=f"prompt length 10 \\+ max_new_tokens {BLOCK - 9}.*block_size {BLOCK}"):
        generate(model, random_ids(length=10), max_new_tokens=BLOCK - 9)
    for kwargs, name in [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                         ({"top_p": 0}, "top_p"), ({"max_new_tokens": -1}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=name):
            generate(model, random_ids(length=2), **({"max_new_tokens": 2} | kwargs))


def test_generate_restores_training_mode():
    model = make_model(dropout=0.1).train()
    generate(model, random_ids(length=2), 3)
    assert model.training
    model.eval()
    generate(model, random_ids(length=2), 3)
    assert not model.training


@pytest.mark.parametrize("ffn", [
    partial(SoftMoE, hidden_dim=8, num_experts=2),
    partial(TopKMoE, hidden_dim=8, num_experts=2, capacity_factor=1.0, capacity_priority="gshard"),
    partial(TopKMoE, hidden_dim=8, num_experts=2, capacity_factor=1.0, capacity_group="batch"),
])
def test_noncausal_ffn_is_refused_unless_allowed(ffn):
    with pytest.raises(ValueError, match="allow_noncausal"):
        make_model(ffn=ffn)
    model = make_model(ffn=ffn, allow_noncausal=True)
    assert not model.blocks[0].ffn.is_causal

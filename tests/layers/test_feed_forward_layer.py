"""The layer contract (`FeedForwardLayer`): the defaults a layer gets by implementing forward alone,
and what each built-in layer declares to the leakage suite, the data code, the logs and the costs."""

import pytest
import torch

from lm_moe import layers
from lm_moe.causality import LayerSubject, ModelSubject
from lm_moe.layers.batch_groups import required_batch_multiple
from lm_moe.models import GPT
from lm_moe.models.vit import ViT


class PerTokenTanh(layers.FeedForwardLayer):
    """A layer of one's own that implements forward only: y = tanh(x W)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        layers.check_layer_input(x, mask, self.proj.in_features)
        y = torch.tanh(self.proj(x))  # [B, T, D]
        return (y if mask is None else y * mask.unsqueeze(-1)), layers.LayerAux.empty(x)


def test_a_layer_with_only_forward_gets_the_per_token_defaults():
    layer = PerTokenTanh(4)
    assert layer.is_causal and layer.per_example_deterministic and layer.no_weight_decay == ()
    assert layer.structure_lengths == () and layer.batch_multiple == 1
    subject = LayerSubject(layer, 4)
    assert subject.boundaries == set() and subject.batch_multiple == 1 and subject.per_example
    with pytest.raises(NotImplementedError, match="PerTokenTanh must define parameter_macs_per_token"):
        layer.parameter_macs_per_token()


def test_the_default_decode_is_forward_on_the_new_tokens_and_keeps_no_state():
    torch.manual_seed(0)
    layer = PerTokenTanh(4).double()
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    outputs, state = [], None
    for start, stop in [(0, 3), (3, 4), (4, 7)]:
        y, state = layer.decode(x[:, start:stop], state)
        assert state is None
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, dim=1), layer(x)[0], rtol=0, atol=0)


def test_a_gpt_of_a_forward_only_layer_decodes_with_the_default():
    torch.manual_seed(0)
    model = GPT(11, 8, n_layer=2, n_head=2, dim=4, ffn=PerTokenTanh).double().eval()
    ids = torch.randint(0, 11, (2, 8))
    cache = model.new_cache(2)
    decoded = torch.cat([model(ids[:, :5], cache=cache).logits, model(ids[:, 5:], cache=cache).logits], dim=1)
    torch.testing.assert_close(decoded, model(ids).logits, rtol=0, atol=1e-12)
    assert all(block.ffn_state is None for block in cache.blocks)


@pytest.mark.parametrize("build", [
    lambda factory: GPT(11, 8, n_layer=1, n_head=2, dim=4, ffn=factory),
    lambda factory: ViT(3, 8, 1, dim=4, depth=1, n_head=2, mlp=factory, moe_blocks="all"),
], ids=["gpt", "vit"])
def test_the_models_refuse_a_layer_outside_the_contract(build):
    with pytest.raises(ValueError, match=r"\(dim\) must build a FeedForwardLayer, got Linear"):
        build(lambda dim: torch.nn.Linear(dim, dim))


# Each built-in layer, the structure lengths and batch multiple it declares, its stats that are
# counts (summed over data-parallel ranks), and its parameter multiply-adds per token (D=8, H=16,
# E=4: one expert has 2*8*16 = 256 parameters, the slot embeddings or router 32).
BUILT_IN = {
    "dense": (lambda: layers.DenseFFN(8, 16), (), 1, set(), 256),
    "top2": (lambda: layers.TopKMoE(8, 16, 4), (), 1, {"tokens_per_expert"}, 32 + 2 * 256),
    "soft_moe": (lambda: layers.SoftMoE(8, 16, 4), (), 1, set(), None),
    "cumulative": (lambda: layers.CumulativeSoftMoE(8, 16, 4), (), 1, set(), 32 + 4 * 256),
    "lagged_chunk": (lambda: layers.LaggedChunkSoftMoE(8, 16, 4, chunk_size=5), (5,), 1, set(),
                     32 + 256 + 4 / 5 * 256),
    "mixture_of_tokens": (lambda: layers.MixtureOfTokens(8, 16, 4, group_size=3), (), 3, set(), 32 + 4 / 3 * 256),
    "segment_merged": (lambda: layers.SegmentMergedMoE(8, 16, 4, segment_size=6), (6,), 1, set(),
                       32 / 6 + 256 + 4 * 256 / 6),
}


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_layers_declare_their_structure_and_batch_multiple(name):
    make, lengths, multiple, _, _ = BUILT_IN[name]
    layer = make()
    assert layer.structure_lengths == lengths and layer.batch_multiple == multiple
    subject = LayerSubject(layer, 8)  # what the leakage suite probes
    assert subject.boundaries == set(lengths) and subject.batch_multiple == multiple


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_layers_declare_their_counts_by_an_integer_dtype(name):
    make, _, multiple, counts, _ = BUILT_IN[name]
    _, aux = make()(torch.randn(multiple, 6, 8))
    assert {key for key, value in aux.stats.items() if not value.is_floating_point()} == counts


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_layers_declare_their_cost(name):
    make, _, _, _, macs = BUILT_IN[name]
    layer = make()
    if macs is None:  # S expert calls per sequence: a per-token cost that depends on T
        with pytest.raises(NotImplementedError):
            layer.parameter_macs_per_token()
    else:
        assert layer.parameter_macs_per_token() == pytest.approx(macs)


def test_a_model_needs_the_union_of_its_layers_lengths_and_the_lcm_of_their_multiples():
    model = GPT(11, 16, n_layer=4, n_head=2, dim=4)
    for block, ffn in zip(model.blocks, [
        layers.MixtureOfTokens(4, 8, 2, group_size=2),
        layers.MixtureOfTokens(4, 8, 2, group_size=3),
        layers.SegmentMergedMoE(4, 8, 2, segment_size=5),
        layers.LaggedChunkSoftMoE(4, 8, 2, chunk_size=3),
    ]):
        block.ffn = ffn
    assert required_batch_multiple(model) == 6
    subject = ModelSubject(model)
    assert subject.boundaries == {3, 5} and subject.batch_multiple == 6 and not subject.per_example

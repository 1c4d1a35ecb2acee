"""The layer contract's base class (`FeedForwardLayer`): the defaults a layer gets by implementing
forward alone, the models' refusal of anything else, and what a model of several layers needs.
What each built-in layer declares: test_layer_contract.py."""

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


def test_a_layer_without_forward_says_what_it_lacks():
    class Incomplete(layers.FeedForwardLayer):
        pass

    with pytest.raises(NotImplementedError, match=r"Incomplete must define forward\(x, mask=None\) -> \(y, LayerAux\)"):
        Incomplete()(torch.randn(1, 2, 8))


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
    lambda factory: ViT(3, 8, 1, dim=4, depth=1, n_head=2, ffn=factory, moe_blocks="all"),
], ids=["gpt", "vit"])
def test_the_models_refuse_a_layer_outside_the_contract(build):
    with pytest.raises(ValueError, match=r"\(dim\) must build a FeedForwardLayer, got Linear"):
        build(lambda dim: torch.nn.Linear(dim, dim))


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

"""Every FFN layer refuses, by shape and dtype, an input or mask it cannot take, and outputs 0 at padding."""

import pytest
import torch

from lm_moe import layers

LAYERS = {
    "dense": lambda: layers.DenseFFN(8, 16),
    "top2": lambda: layers.TopKMoE(8, 16, 4),
    "soft_moe": lambda: layers.SoftMoE(8, 16, 4),
    "cumulative": lambda: layers.CumulativeSoftMoE(8, 16, 4),
    "lagged_chunk": lambda: layers.LaggedChunkSoftMoE(8, 16, 4, chunk_size=2),
    "mixture_of_tokens": lambda: layers.MixtureOfTokens(8, 16, 4, group_size=2),
    "segment_merged": lambda: layers.SegmentMergedMoE(8, 16, 4, segment_size=2),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize(
    "shape, mask, message",
    [
        ((2, 5), None, r"x must be \[batch, tokens, dim\] with dim=8, got shape \(2, 5\)"),
        ((2, 5, 6), None, r"with dim=8, got shape \(2, 5, 6\)"),
        ((2, 0, 8), None, r"x must hold at least one sequence of at least one token, got shape \(2, 0, 8\)"),
        ((0, 5, 8), None, r"at least one sequence .*got shape \(0, 5, 8\)"),
        ((2, 5, 8), torch.ones(2, 5), r"mask must be a bool tensor of shape .* = \(2, 5\).*got torch.float32 of shape \(2, 5\)"),
        ((2, 5, 8), torch.ones(2, 4, dtype=torch.bool), r"got torch.bool of shape \(2, 4\)"),
    ],
)
def test_bad_input_or_mask_is_refused_by_shape_and_dtype(name, shape, mask, message):
    with pytest.raises(ValueError, match=message):
        LAYERS[name]()(torch.randn(*shape), mask)


@pytest.mark.parametrize("name", LAYERS)
def test_a_bool_mask_of_the_batch_shape_is_taken_and_padding_outputs_zero(name):
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    y, _ = LAYERS[name]()(torch.randn(2, 5, 8), mask)
    assert y.shape == (2, 5, 8)
    assert y[0, 3:].abs().max() == 0 and y[mask].abs().min() > 0


def test_every_layer_is_a_feed_forward_layer_and_one_without_forward_says_what_it_lacks():
    assert all(isinstance(make(), layers.FeedForwardLayer) for make in LAYERS.values())

    class Incomplete(layers.FeedForwardLayer):
        pass

    with pytest.raises(NotImplementedError, match=r"Incomplete must define forward\(x, mask=None\) -> \(y, LayerAux\)"):
        Incomplete()(torch.randn(1, 2, 8))

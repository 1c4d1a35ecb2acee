"""Expert choice: every expert takes the C tokens of a sequence it has most affinity to (against a
float64 loop), no padding, and what its stats report."""

import pytest
import torch

from . import reference
from .layer_checks import assert_matches_reference
from .layer_registry import LAYERS


def make_layer(**kwargs):
    return LAYERS["expert_choice"].build(**kwargs)  # D = 8, E = 4


@pytest.mark.parametrize("capacity_factor, T, route_scale", [(1.0, 8, None), (2.0, 9, None), (0.5, 7, 1.0), (8.0, 5, 2.5)])
def test_output_and_gradients_match_the_loop_reference(capacity_factor, T, route_scale):
    layer = make_layer(capacity_factor=capacity_factor, route_scale=route_scale)
    assert layer.route_scale == (4.0 if route_scale is None else route_scale)
    with torch.no_grad():
        layer.router.normal_(0, 1.0)
    x = torch.randn(3, T, 8, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    params = [x, layer.experts.w_in, layer.experts.w_out, layer.router]
    assert_matches_reference(y, reference.expert_choice(layer, x), params, atol=1e-12)


def test_no_expert_takes_padding():
    layer = make_layer(capacity_factor=2.0)
    with torch.no_grad():
        layer.router.normal_(0, 1.0)
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    y, aux = layer(x, mask)
    torch.testing.assert_close(y, reference.expert_choice(layer, x, mask), rtol=0, atol=1e-12)
    assert y[1, 3:].eq(0).all()
    assert aux.stats["tokens_per_expert"].tolist() == [4 + 2] * 4  # C = 4, and 2 for the row of 3 real tokens


def test_stats_count_the_tokens_no_expert_took():
    layer = make_layer(capacity_factor=1.0)  # 4 experts x C = 2 choices for 8 tokens
    with torch.no_grad():
        layer.router.zero_()
        layer.router[:, 0] = 5.0  # every expert prefers the tokens with the largest first feature
    x = torch.randn(1, 8, 8, dtype=torch.float64)
    stats = layer(x)[1].stats
    assert stats["unrouted_fraction"].item() == pytest.approx(6 / 8)  # all four experts take the same two tokens
    assert stats["experts_per_token"].item() == pytest.approx(1.0)
    assert stats["tokens_per_expert"].tolist() == [2, 2, 2, 2]

import math

import pytest
import torch

from lm_moe.layers.segment_merged_moe import SegmentMergedMoE

from . import reference_tokens_segments as reference
from .layer_checks import assert_matches_reference, decode_in_pieces
from .layer_registry import LAYERS
from .mixed_precision import record_dtypes
from .reference import expert_mlp


def make_smm(**kwargs) -> SegmentMergedMoE:
    return LAYERS["segment_merged"].build(**kwargs)


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def perturb_after(x: torch.Tensor, t: int) -> torch.Tensor:
    changed = x.clone()
    changed[:, t + 1 :] = 10 * randn(x.shape[0], x.shape[1] - t - 1, x.shape[2])
    return changed


def test_declares_causality_by_mode():
    assert make_smm().is_causal and SegmentMergedMoE.per_example_deterministic
    assert not make_smm(first_segment="self").is_causal


@pytest.mark.parametrize("first_segment", ["prior", "self"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("segment_size, length", [(4, 12), (4, 10), (3, 2), (1, 5), (5, 13)])
def test_output_and_gradients_match_the_loop_reference(first_segment, activation, segment_size, length):
    layer = make_smm(first_segment=first_segment, activation=activation, segment_size=segment_size)
    x = randn(2, length, 8).requires_grad_()
    y, aux = layer(x)
    assert aux.loss.item() == 0
    params = [x, *layer.parameters()]  # the router is unused (gradient 0) when there is one segment
    assert_matches_reference(y, reference.segment_merged_moe(layer, x), params, atol=1e-10)


def test_a_one_hot_routing_runs_that_expert():
    layer = make_smm(segment_size=3)
    with torch.no_grad():
        layer.prior_logits.copy_(torch.tensor([0.0, 1e4, 0.0]))  # segment 0: expert 1 alone
    x = randn(2, 3, 8)
    y, _ = layer(x)
    torch.testing.assert_close(y, expert_mlp(layer.experts, 1, x), rtol=0, atol=1e-12)


def test_the_decoding_state_counts_the_positions_seen():
    _, states = decode_in_pieces(make_smm(segment_size=4), randn(3, 13, 8), [6, 2])
    assert [state.position for state in states] == [6, 8, 9, 10, 11, 12, 13]


def test_prefix_consistent():
    layer = make_smm(segment_size=4)
    x = randn(2, 13, 8)
    full, _ = layer(x)
    for length in (1, 3, 5, 9, 12):
        torch.testing.assert_close(layer(x[:, :length])[0], full[:, :length], rtol=0, atol=1e-12)


@pytest.mark.parametrize("t", [0, 1, 3, 4, 5, 7, 8, 9, 13])
def test_future_perturbation_changes_only_the_future(t):
    layer = make_smm(segment_size=4)  # probes 0, 1, kC-1, kC, kC+1 and the last position
    x = randn(2, 14, 8)
    before, after = layer(x)[0], layer(perturb_after(x, t))[0]
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=0)
    if t < 13:
        assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().amax(dim=-1).min() > 1e-6


@pytest.mark.parametrize("t", [0, 1])
def test_self_routed_first_segment_is_caught_leaking(t):
    # The negative control: the same check must report it, although its gradient is stopped.
    layer = make_smm(segment_size=4, first_segment="self")
    x = randn(2, 14, 8)
    before, after = layer(x)[0], layer(perturb_after(x, t))[0]
    assert (after[:, : t + 1] - before[:, : t + 1]).abs().max() > 1e-6
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(layer(leaf)[0][:, 0].sum(), leaf)
    assert grad[:, 1:].abs().max() == 0, "stop-gradient hides this leak from the Jacobian test"
    with pytest.raises(ValueError, match="self"):
        layer.decode(x[:, :1], None)


@pytest.mark.parametrize("first_segment", ["prior", "self"])
def test_padding_is_left_out_of_segment_means(first_segment):
    layer = make_smm(segment_size=4, first_segment=first_segment)
    x = randn(3, 10, 8)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 3:] = False  # padding inside segment 0, which "self" routes on
    mask[1, 6:] = False
    mask[2, :] = False  # a fully padded row must not produce NaN
    y, _ = layer(x, mask)
    torch.testing.assert_close(y, reference.segment_merged_moe(layer, x, mask), rtol=0, atol=1e-10)


def test_stats_describe_the_routing():
    layer = make_smm(num_experts=4, segment_size=2)
    with torch.no_grad():
        layer.prior_logits.zero_()
        layer.router_weight.zero_()  # uniform merge everywhere
    _, aux = layer(randn(2, 7, 8))
    assert aux.stats["routing_entropy"].item() == pytest.approx(math.log(4))
    torch.testing.assert_close(aux.stats["expert_weights"], torch.full((4,), 0.25))
    assert aux.stats["expert_weight_spread"].item() == pytest.approx(0.0, abs=1e-6)
    assert all(not value.requires_grad for value in aux.stats.values())


def test_bf16_autocast_keeps_routing_in_fp32(monkeypatch):
    layer = SegmentMergedMoE(16, 32, 4, segment_size=4)
    seen = record_dtypes(monkeypatch, layer, "_routing")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(2, 10, 16))
    assert seen == [torch.float32] * 2  # segment 0, later segments

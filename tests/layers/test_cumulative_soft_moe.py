import math

import pytest
import torch

from lm_moe.layers import slot_routing
from lm_moe.layers.cumulative_soft_moe import CumulativeSoftMoE

from . import reference_causal_soft_moe as reference
from .layer_checks import assert_matches_reference, decode_in_pieces
from .layer_registry import DIM, LAYERS
from .mixed_precision import record_dtypes


def make_layer(**kwargs) -> CumulativeSoftMoE:
    return LAYERS["cumulative"].build(**kwargs)


def test_is_declared_causal():
    assert CumulativeSoftMoE.is_causal is True


@pytest.mark.parametrize("decay", [None, 0.7])
@pytest.mark.parametrize(
    "activation, num_experts, slots_per_expert, T",
    [("gelu", 3, 2, 37), ("swiglu", 3, 2, 37), ("gelu", 1, 1, 5), ("gelu", 4, 1, 70)],
)
def test_output_and_gradients_match_the_loop_reference(decay, activation, num_experts, slots_per_expert, T):
    # T = 37 and 70 cut time into several blocks of the prefix sums, the last one padded.
    layer = make_layer(num_experts=num_experts, slots_per_expert=slots_per_expert, activation=activation, decay=decay)
    x = torch.randn(2, T, DIM, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    assert aux.loss.item() == 0
    params = [x, layer.experts.w_in, layer.experts.w_out, layer.slot_embeddings, layer.scale]
    assert_matches_reference(y, reference.cumulative_soft_moe(layer, x), params, atol=1e-10)


@pytest.mark.parametrize("decay", [None, 0.7])
def test_the_decoding_state_is_the_last_position_s_sums_and_does_not_grow(decay):
    layer = make_layer(decay=decay)
    _, states = decode_in_pieces(layer, torch.randn(2, 45, DIM, dtype=torch.float64), [33])
    for state in states:
        assert state.num.shape == (2, layer.num_slots, DIM) and state.den.shape == (2, layer.num_slots)


@pytest.mark.parametrize("decay", [None, 0.7])
@pytest.mark.parametrize("t", [0, 1, 21, 22, 23, 44])
def test_future_tokens_do_not_change_earlier_outputs(decay, t):
    # T = 45 is cut into blocks of 23 positions (the last one padded): probe around the edge at 23.
    layer = make_layer(decay=decay)
    x = torch.randn(2, 45, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, t + 1 :] = 100 * torch.randn_like(changed[:, t + 1 :])
    y, _ = layer(x)
    y_changed, _ = layer(changed)
    assert torch.equal(y[:, : t + 1], y_changed[:, : t + 1])
    assert ((y - y_changed)[:, t + 1 :].abs().amax(dim=-1) > 1e-6).all(), "every later output must change"


def test_jacobian_has_no_entries_above_the_diagonal():
    layer = make_layer(decay=0.8)
    x = torch.randn(1, 36, DIM, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    for t in [0, 17, 18, 19, 35]:  # blocks of 18 positions
        (grad,) = torch.autograd.grad(y[0, t].sum(), x, retain_graph=True)
        assert grad[0, t + 1 :].abs().sum() == 0
        assert grad[0, : t + 1].abs().amax(dim=-1).min() > 0  # every earlier token feeds the slots


def test_decay_is_stable_on_sequences_where_its_closed_form_overflows():
    # 0.5^-1500 overflows even float64: the blocked sums never form it.
    layer = make_layer(decay=0.5)
    x = torch.randn(1, 1500, DIM, dtype=torch.float64)
    y, aux = layer(x)
    assert torch.isfinite(y).all() and all(torch.isfinite(value).all() for value in aux.stats.values())
    positions = [0, 700, 1499]
    torch.testing.assert_close(y[:, positions], reference.cumulative_soft_moe(layer, x, positions), rtol=0, atol=1e-10)


def test_decay_makes_slots_forget_old_tokens():
    x = torch.randn(1, 60, DIM, dtype=torch.float64)
    old_changed = x.clone()
    old_changed[:, :50] = torch.randn(1, 50, DIM, dtype=torch.float64)

    def change_of_last_output(decay):
        layer = make_layer(decay=decay)
        y, y_changed = layer(x)[0][0, -1], layer(old_changed)[0][0, -1]
        return ((y - y_changed).norm() / y.norm()).item()

    assert change_of_last_output(None) > 1e-2  # the plain mean keeps all 60 tokens
    assert change_of_last_output(0.1) < 1e-6  # weight 0.1^10 for a token 10 steps back


def test_stats_describe_the_routing():
    layer = make_layer(num_experts=4, slots_per_expert=1)
    with torch.no_grad():
        layer.scale.fill_(0.0)  # all logits 0: uniform dispatch over each prefix and uniform combine
    T = 9
    _, aux = layer(torch.randn(2, T, DIM, dtype=torch.float64))
    mean_prefix_entropy = sum(math.log(t + 1) for t in range(T)) / T
    assert aux.stats["dispatch_entropy"].item() == pytest.approx(mean_prefix_entropy)
    assert aux.stats["combine_entropy"].item() == pytest.approx(math.log(4))
    torch.testing.assert_close(aux.stats["slot_usage"], torch.full((4,), 0.25))
    assert aux.stats["slot_usage_spread"].item() == pytest.approx(0.0, abs=1e-6)


def test_dispatch_entropy_with_decay_matches_the_explicit_dispatch():
    layer = make_layer(decay=0.6)
    x = torch.randn(2, 40, DIM, dtype=torch.float64)
    _, aux = layer(x)
    logits = reference.routing_logits(layer, x)
    entropies = []
    for t in range(40):
        age = torch.arange(t, -1, -1, dtype=torch.float64).view(1, -1, 1)
        dispatch = torch.softmax(logits[:, : t + 1] + age * math.log(0.6), dim=1)  # [B, t+1, S]
        entropies.append(-(dispatch * dispatch.log()).sum(dim=1).mean())
    expected = torch.stack(entropies).mean().item()
    assert aux.stats["dispatch_entropy"].item() == pytest.approx(expected, rel=1e-6)  # stats are fp32


@pytest.mark.parametrize("decay", [None, 0.9])
def test_bf16_autocast_keeps_routing_and_sums_in_fp32(monkeypatch, decay):
    layer = CumulativeSoftMoE(16, 32, 4, slots_per_expert=2, decay=decay)
    seen = record_dtypes(monkeypatch, slot_routing, "slot_logits")
    x = torch.randn(2, 40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        layer(x)
        _, state = layer.decode(x[:, :5], None)
    assert seen == [torch.float32] * 2  # forward, decode
    assert state.num.dtype == torch.float32 and state.den.dtype == torch.float32

import pytest
import torch
import torch.nn.functional as F

from lm_moe.layers import SoftMoE, slot_routing
from lm_moe.layers.numerics import entropy

from . import reference
from .layer_checks import assert_matches_reference
from .layer_registry import LAYERS
from .mixed_precision import record_dtypes


def make_soft_moe(**kwargs) -> SoftMoE:
    return LAYERS["soft_moe"].build(**kwargs)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("num_experts, slots_per_expert", [(1, 1), (3, 2), (4, 1), (2, 5)])
def test_output_and_gradients_match_algorithm_1(activation, num_experts, slots_per_expert):
    layer = make_soft_moe(num_experts=num_experts, slots_per_expert=slots_per_expert, activation=activation)
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    assert aux.loss.item() == 0
    params = [x, layer.experts.w_in, layer.experts.w_out, layer.slot_embeddings, layer.scale]
    assert_matches_reference(y, reference.soft_moe(layer, x), params, atol=1e-12)


def test_dispatches_unnormalised_inputs():
    # Logits only see directions; the slots receive the raw inputs, so scaling x scales them.
    layer = make_soft_moe()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    slots = []
    original = layer.experts.forward_batched

    def recording(inputs):
        slots.append(inputs)
        return original(inputs)

    layer.experts.forward_batched = recording
    layer(x)
    layer(3 * x)
    torch.testing.assert_close(slots[1], 3 * slots[0])


def test_equivariant_to_permuting_the_tokens_of_a_sequence():
    layer = make_soft_moe()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    perm = torch.randperm(9)
    y, _ = layer(x)
    y_perm, _ = layer(x[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm], rtol=0, atol=1e-12)


def test_sees_the_future_which_is_why_decoders_need_the_causal_variants():
    layer = make_soft_moe()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    changed = x.clone()
    changed[:, -1] += 5
    assert not torch.allclose(layer(x)[0][:, 0], layer(changed)[0][:, 0])


def test_stats_describe_the_routing():
    layer = make_soft_moe(num_experts=4, slots_per_expert=1)
    with torch.no_grad():
        layer.scale.fill_(0.0)  # all logits 0: uniform dispatch and combine
    _, aux = layer(torch.randn(2, 5, 8, dtype=torch.float64))
    assert aux.stats["dispatch_entropy"].item() == pytest.approx(torch.log(torch.tensor(5.0)).item())
    assert aux.stats["combine_entropy"].item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    torch.testing.assert_close(aux.stats["slot_usage"], torch.full((4,), 0.25))
    assert aux.stats["slot_usage_spread"].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_stats_equal_those_of_the_paper_softmaxes_with_padding():
    layer = make_soft_moe(num_experts=4, slots_per_expert=2)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2] = False  # a row of padding alone dispatches nothing: it is left out of the mean
    _, aux = layer(x, mask)
    logits = F.normalize(x, dim=-1) @ (layer.scale * F.normalize(layer.slot_embeddings, dim=0))  # [B, T, S]
    dispatch_entropy = torch.stack(
        [entropy(logits[b, mask[b]].softmax(dim=0), dim=0) for b in range(2)]
    )  # [2, S], each real row's slots over its real tokens
    combine_entropy = entropy(logits[mask].softmax(dim=-1), dim=-1)  # [real tokens]
    assert aux.stats["dispatch_entropy"].item() == pytest.approx(dispatch_entropy.mean().item(), rel=1e-6)
    assert aux.stats["combine_entropy"].item() == pytest.approx(combine_entropy.mean().item(), rel=1e-6)


def test_bf16_autocast_keeps_router_in_fp32(monkeypatch):
    layer = SoftMoE(16, 32, 4, slots_per_expert=2)
    seen = record_dtypes(monkeypatch, slot_routing, "slot_logits")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(2, 8, 16))
    assert seen == [torch.float32]

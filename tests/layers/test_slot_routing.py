"""The slot routing the Soft MoE family shares: its parameters keep their checkpoint names, its
dispatch leaves padding out, its shifted weights stay bounded, and slot s runs on expert s // P."""

import pytest
import torch

from lm_moe.layers import CumulativeSoftMoE, LaggedChunkSoftMoE, MixtureOfTokens, SoftMoE
from lm_moe.layers.slot_routing import softmax_dispatch

from .reference import expert_mlp

SLOT_PARAMETERS = {"experts.w_in", "experts.w_out", "slot_embeddings", "scale"}
FAMILY = {  # each layer, and the parameters it adds to the slot router's
    "soft_moe": (lambda **options: SoftMoE(8, 16, 3, slots_per_expert=2, **options), set()),
    "cumulative": (lambda **options: CumulativeSoftMoE(8, 16, 3, slots_per_expert=2, **options), set()),
    "lagged_chunk": (lambda **options: LaggedChunkSoftMoE(8, 16, 3, slots_per_expert=2, chunk_size=4, **options),
                     {"shared.w_in", "shared.w_out", "null_outputs"}),
    "mixture_of_tokens": (lambda **options: MixtureOfTokens(8, 16, 3, slots_per_expert=2, group_size=2, **options),
                          set()),
}


@pytest.mark.parametrize("name", FAMILY)
def test_parameters_keep_their_checkpoint_names(name):
    make, own = FAMILY[name]
    layer = make()
    assert set(layer.state_dict()) == SLOT_PARAMETERS | own
    assert layer.num_slots == 6 and layer.slot_embeddings.shape == (8, 6)
    assert layer.scale.item() == pytest.approx(8**0.5)  # sqrt(D) by default
    assert "slot_embeddings" in layer.no_weight_decay


@pytest.mark.parametrize("name", FAMILY)
def test_logit_scale_init_multiplies_the_initial_logits(name):
    make, _ = FAMILY[name]
    x = torch.randn(2, 4, 8)
    torch.manual_seed(0)
    plain = make(logit_scale_init=1.0)
    torch.manual_seed(0)
    sharp = make(logit_scale_init=16.0)
    assert sharp.scale.item() == 16.0
    torch.testing.assert_close(sharp.router_logits(x), 16 * plain.router_logits(x))


def test_the_default_logit_scale_starts_the_logits_at_a_spread_of_about_one():
    torch.manual_seed(0)
    layer = CumulativeSoftMoE(256, 16, 8)
    x = torch.nn.functional.layer_norm(torch.randn(4, 64, 256), (256,))
    assert layer.router_logits(x).std().item() == pytest.approx(1.0, abs=0.1)
    assert CumulativeSoftMoE(1024, 16, 8).scale.item() == 16  # capped: exp(-2 |scale|) stays inside fp32


def test_softmax_dispatch_leaves_padding_out_and_an_all_padding_set_empty():
    logits = torch.randn(2, 3, 4)  # [sets, tokens, slots]
    mask = torch.tensor([[True, True, False], [False, False, False]])
    dispatch_logits, dispatch = softmax_dispatch(logits, mask, dim=1)
    torch.testing.assert_close(dispatch[0, :2], logits[0, :2].softmax(dim=0))
    assert dispatch[0, 2].eq(0).all() and dispatch[1].eq(0).all()
    assert torch.isfinite(dispatch_logits).all() and dispatch_logits[1].eq(torch.finfo(logits.dtype).min).all()


def test_shifted_weights_are_bounded_and_normalise_to_the_softmax():
    layer = SoftMoE(8, 16, 3, slots_per_expert=2).double()
    with torch.no_grad():
        layer.scale.fill_(-30.0)  # the bound is |scale|, whatever its sign
    logits = layer.router_logits(torch.randn(2, 5, 8, dtype=torch.float64))  # [B, T, S]
    weights = layer.shifted_weights(logits)  # [B, T, S]
    assert (weights > 0).all() and (weights <= 1).all()
    torch.testing.assert_close(weights / weights.sum(dim=1, keepdim=True), logits.softmax(dim=1), rtol=0, atol=1e-12)


def test_slot_s_runs_on_expert_s_over_slots_per_expert():
    layer = MixtureOfTokens(8, 16, 3, slots_per_expert=2, group_size=1).double()
    slot_in = torch.randn(6, 2, 4, 8, dtype=torch.float64)  # [S, ..., D]
    slot_out = layer.run_experts(slot_in)
    for s in range(6):
        torch.testing.assert_close(slot_out[s], expert_mlp(layer.experts, s // 2, slot_in[s]), rtol=0, atol=1e-12)

import math

import pytest
import torch

from lm_moe.layers import slot_routing
from lm_moe.layers.batch_groups import fill_groups, required_batch_multiple
from lm_moe.layers.mixture_of_tokens import MixtureOfTokens

from . import reference_tokens_segments as reference
from .layer_checks import assert_matches_reference
from .layer_registry import LAYERS
from .mixed_precision import record_dtypes


def make_mot(**kwargs) -> MixtureOfTokens:
    return LAYERS["mixture_of_tokens"].build(**kwargs)


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def test_declares_causal_but_not_per_example_deterministic():
    assert MixtureOfTokens.is_causal and not MixtureOfTokens.per_example_deterministic


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("num_experts, slots_per_expert, group_size", [(1, 1, 1), (3, 2, 2), (4, 1, 4), (2, 3, 3)])
def test_output_and_gradients_match_the_loop_reference(activation, num_experts, slots_per_expert, group_size):
    layer = make_mot(
        num_experts=num_experts, slots_per_expert=slots_per_expert, group_size=group_size, activation=activation
    )
    x = randn(2 * group_size, 5, 8).requires_grad_()
    y, aux = layer(x)
    assert aux.loss.item() == 0
    params = [x, layer.experts.w_in, layer.experts.w_out, layer.slot_embeddings, layer.scale]
    assert_matches_reference(y, reference.mixture_of_tokens(layer, x), params, atol=1e-10)


def test_equivariant_to_permuting_the_rows_of_a_group():
    layer = make_mot(group_size=4)
    x = randn(8, 5, 8)
    perm = torch.cat([torch.randperm(4), 4 + torch.randperm(4)])  # within each group
    y, _ = layer(x)
    y_perm, _ = layer(x[perm])
    torch.testing.assert_close(y_perm, y[perm], rtol=0, atol=1e-12)


def test_batch_must_be_a_multiple_of_the_group_size():
    layer = make_mot(group_size=4)
    x = randn(6, 3, 8)
    for run in (lambda: layer(x), lambda: layer.decode(x, None)):
        with pytest.raises(ValueError, match=r"B=6.*group_size=4"):
            run()


@pytest.mark.parametrize("t", [0, 1, 4, 10])
def test_future_perturbation_changes_only_the_future(t):
    layer = make_mot(group_size=2)
    x = randn(4, 11, 8)
    changed = x.clone()
    changed[:, t + 1 :] = 10 * randn(4, 10 - t, 8)
    before, after = layer(x)[0], layer(changed)[0]
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=0)
    if t < 10:
        assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().amax(dim=-1).min() > 1e-6


def test_a_batch_mate_changes_this_row_but_never_its_past_from_the_mates_future():
    layer = make_mot(group_size=2)
    x = randn(4, 8, 8)
    y, _ = layer(x)
    # Another mate: row 0 changes, not per-example deterministic.
    other_mate = x.clone()
    other_mate[1] = randn(8, 8)
    assert (layer(other_mate)[0][0] - y[0]).abs().amax(dim=-1).min() > 1e-6
    # The mate's future: row 0 keeps its past exactly, its future changes.
    t = 3
    mate_future = x.clone()
    mate_future[1, t + 1 :] = 10 * randn(8 - t - 1, 8)
    after, _ = layer(mate_future)
    torch.testing.assert_close(after[0, : t + 1], y[0, : t + 1], rtol=0, atol=0)
    assert (after[0, t + 1 :] - y[0, t + 1 :]).abs().amax(dim=-1).min() > 1e-6
    # Rows of other groups never matter.
    torch.testing.assert_close(after[2:], y[2:], rtol=0, atol=0)


def test_overlapping_windows_in_a_group_leak_the_next_token():
    # Why the data loader packs non-overlapping blocks: if row 1 is row 0 shifted by one token,
    # row 0's output at t reads row 1's token t, which is row 0's own token t+1.
    layer = make_mot(group_size=2)
    T, t = 8, 3
    text = randn(T + 1, 8)

    def row0_output_at_t(stream: torch.Tensor, mate: torch.Tensor) -> torch.Tensor:
        return layer(torch.stack([stream[:T], mate]))[0][0, t]

    changed = text.clone()
    changed[t + 1] = 10 * randn(8)  # this row's next token
    leaked = row0_output_at_t(changed, changed[1:]) - row0_output_at_t(text, text[1:])
    assert leaked.abs().max() > 1e-6, "the next token reached position t through the batch"

    independent_mate = randn(T, 8)
    unchanged = row0_output_at_t(changed, independent_mate) - row0_output_at_t(text, independent_mate)
    assert unchanged.abs().max() == 0


def test_padding_leaves_the_mix_of_each_position_and_a_fully_padded_group_outputs_zero():
    layer = make_mot(group_size=2)
    x = randn(4, 7, 8)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 2:] = False
    mask[3, 5:] = False  # group 1 is fully padded at positions 5 and 6
    y, aux = layer(x, mask)
    torch.testing.assert_close(y, reference.mixture_of_tokens(layer, x, mask), rtol=0, atol=1e-10)
    # A row padded where its mate is too gives the outputs of the shorter sequences.
    short, _ = layer(x[2:, :2])
    torch.testing.assert_close(y[2:, :2], short, rtol=0, atol=1e-12)
    assert y[2:, 5:].abs().max() == 0 and all(torch.isfinite(value).all() for value in aux.stats.values())


def test_stats_describe_the_routing():
    layer = make_mot(num_experts=4, slots_per_expert=1, group_size=4)
    with torch.no_grad():
        layer.scale.fill_(0.0)  # all logits 0: uniform dispatch and combine
    _, aux = layer(randn(4, 5, 8))
    assert aux.stats["dispatch_entropy"].item() == pytest.approx(math.log(4))
    assert aux.stats["combine_entropy"].item() == pytest.approx(math.log(4))
    torch.testing.assert_close(aux.stats["slot_usage"], torch.full((4,), 0.25))
    assert aux.stats["slot_usage_spread"].item() == pytest.approx(0.0, abs=1e-6)
    assert all(not value.requires_grad for value in aux.stats.values())


def test_bf16_autocast_keeps_router_in_fp32(monkeypatch):
    layer = MixtureOfTokens(16, 32, 4, slots_per_expert=2, group_size=2)
    seen = record_dtypes(monkeypatch, slot_routing, "slot_logits")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(4, 8, 16))
    assert seen == [torch.float32]


def test_required_batch_multiple_is_the_lcm_of_the_group_sizes():
    layers = torch.nn.ModuleList([make_mot(group_size=4), make_mot(group_size=6), torch.nn.Linear(2, 2)])
    assert required_batch_multiple(layers) == 12
    assert required_batch_multiple(torch.nn.Linear(2, 2)) == 1


def test_fill_groups_repeats_rows_from_the_start_up_to_a_whole_multiple():
    rows = torch.arange(5).view(5, 1)
    assert fill_groups(rows, 4).flatten().tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert fill_groups(rows[:2], 4).flatten().tolist() == [0, 1, 0, 1]
    assert fill_groups(rows, 5) is rows

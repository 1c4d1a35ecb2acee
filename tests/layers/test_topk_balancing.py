"""TopKMoE's balancing: the loss-free expert bias (picks experts, never weighs them; one update per
optimizer step from the whole step's choices) and the scopes the balancing loss counts over."""

import pytest
import torch

from lm_moe.layers.routing import choice_share, load_balancing_loss, sequence_balancing_loss

from . import reference
from .layer_checks import assert_matches_reference
from .layer_registry import LAYERS


def make_moe(**kwargs):
    return LAYERS["top2"].build(**kwargs)  # D = 8, E = 4, top-2


def test_the_bias_picks_the_experts_and_the_scores_weigh_them():
    moe = make_moe(balance="loss_free").double()
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.5]))
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    y, _ = moe(x)
    params = [x, moe.experts.w_in, moe.experts.w_out, moe.router.weight]
    assert_matches_reference(y, reference.topk_moe(moe, x), params, atol=1e-12)
    _, biased, _ = reference.topk_choices(moe, x)
    moe.expert_bias.zero_()
    _, plain, _ = reference.topk_choices(moe, x)
    assert not torch.equal(biased, plain), "the case must change a choice to test the bias"


def test_the_bias_moves_once_per_step_by_the_whole_steps_loads():
    moe = make_moe(balance="loss_free", bias_update_rate=0.01).double().train()
    first, second = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    _, index_first, _ = reference.topk_choices(moe, first)
    _, index_second, _ = reference.topk_choices(moe, second)
    moe(first)
    moe(second)  # two micro-batches of one optimizer step
    assert moe.expert_bias.eq(0).all(), "the bias moves at the step, not at each forward"
    moe.before_optimizer_step()
    loads = torch.bincount(torch.cat([index_first.flatten(), index_second.flatten()]), minlength=4).double()
    torch.testing.assert_close(moe.expert_bias, 0.01 * torch.sign(loads.mean() - loads), rtol=0, atol=0)
    moe.before_optimizer_step()  # a step without forwards changes nothing
    torch.testing.assert_close(moe.expert_bias, 0.01 * torch.sign(loads.mean() - loads), rtol=0, atol=0)


def test_evaluation_forwards_count_nothing():
    moe = make_moe(balance="loss_free").eval()
    moe(torch.randn(2, 5, 8))
    moe.before_optimizer_step()
    assert moe.expert_bias.eq(0).all()


def test_the_bias_brings_a_skewed_router_to_balance():
    torch.manual_seed(0)
    moe = make_moe(balance="loss_free", bias_update_rate=0.01).double().train()
    x = torch.randn(8, 16, 8, dtype=torch.float64)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
        moe.router.weight[0] = 4 * x.reshape(-1, 8).mean(0)  # expert 0 leans toward the mean input

    def busiest_over_mean() -> float:
        loads = torch.bincount(reference.topk_choices(moe, x)[1].flatten(), minlength=4).double()
        return (loads.max() / loads.mean()).item()

    assert busiest_over_mean() > 1.3
    for _ in range(100):
        moe(x)
        moe.before_optimizer_step()
    assert busiest_over_mean() < 1.05
    assert moe.expert_bias[0] == moe.expert_bias.min() < 0


def test_the_bias_is_saved_and_loaded_with_the_weights():
    moe = make_moe(balance="loss_free")
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0]))
    loaded = make_moe(balance="loss_free")
    loaded.load_state_dict(moe.state_dict())
    assert torch.equal(loaded.expert_bias, moe.expert_bias)
    assert "expert_bias" not in make_moe().state_dict()  # the other balances keep their checkpoints' keys


def test_the_loss_free_stats_show_the_bias():
    moe = make_moe(balance="loss_free")
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0]))
    stats = moe(torch.randn(2, 5, 8))[1].stats
    torch.testing.assert_close(stats["expert_bias"], moe.expert_bias.float())
    assert stats["expert_bias_range"].item() == pytest.approx(0.5)


def test_global_batch_shares_count_the_steps_micro_batches_so_far():
    moe = make_moe(balance_scope="global_batch").double().train()
    first, second = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    # One micro-batch: the loss of the batch itself, as micro_batch scope computes it.
    alone = moe(first)[1].stats["load_balance_loss"]
    moe.before_optimizer_step()
    moe.balance_scope = "micro_batch"
    torch.testing.assert_close(alone, moe(first)[1].stats["load_balance_loss"], rtol=0, atol=1e-12)
    # Two micro-batches: the second sees the shares of both, with its own probabilities.
    moe.balance_scope = "global_batch"
    moe(first)
    loss = moe(second)[1].stats["load_balance_loss"]
    _, index_first, _ = reference.topk_choices(moe, first)
    probs_second, index_second, _ = reference.topk_choices(moe, second)
    share = choice_share(torch.cat([index_first, index_second]).reshape(-1, 2), None, 4, torch.float64)
    torch.testing.assert_close(loss, 4 * (share * probs_second.reshape(-1, 4).mean(0)).sum(), rtol=0, atol=1e-12)


def test_sequence_scope_is_the_mean_of_each_sequences_own_loss():
    moe = make_moe(balance_scope="sequence").double()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [False] * 6])
    routing = moe.router(x.reshape(-1, 8))
    per_sequence = [load_balancing_loss(moe.router(x[b, :n]), None) for b, n in ((0, 6), (1, 4))]
    expected = torch.stack(per_sequence).mean()
    torch.testing.assert_close(sequence_balancing_loss(routing, mask.reshape(-1), 3), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(moe(x, mask)[1].stats["load_balance_loss"], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("options, message", [
    (dict(balance="none", load_balance_weight=0.01), r"balance='none' uses no balancing loss, but load_balance_weight=0.01"),
    (dict(balance="bias"), r"balance must be one of \['aux_loss', 'loss_free', 'none'\], got 'bias'"),
    (dict(balance_scope="batch"), r"balance_scope must be one of \['global_batch', 'micro_batch', 'sequence'\]"),
    (dict(balance="loss_free", bias_update_rate=0), r"bias_update_rate must be a positive number, got 0"),
])
def test_bad_balance_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        make_moe(**options)


def test_the_default_weights_follow_the_balance():
    assert make_moe().load_balance_weight == 0.01
    assert make_moe(balance="loss_free").load_balance_weight == 0
    assert make_moe(balance="loss_free", load_balance_weight=1e-4).load_balance_weight == 1e-4
    assert make_moe(balance="none").load_balance_weight == 0

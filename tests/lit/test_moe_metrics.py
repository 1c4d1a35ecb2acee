import pytest
import torch

from lm_moe.lit.moe_metrics import moe_histograms, moe_scalars, reduce_over_ranks


def test_scalars_histograms_and_load_ratio():
    stats = {"block_1": {"tokens_per_expert": torch.tensor([2.0, 4.0, 8.0]), "router_entropy": torch.tensor(0.5)}}
    scalars = moe_scalars(stats)
    assert scalars == {
        "moe/block_1/tokens_per_expert_max_min_ratio": pytest.approx(4.0),
        "moe/block_1/tokens_per_expert_idle_fraction": 0.0,
        "moe/block_1/router_entropy": pytest.approx(0.5),
    }
    assert set(moe_histograms(stats)) == {"moe/block_1/tokens_per_expert"}


def test_a_non_negative_vector_stat_is_a_load_vector():
    stats = {"block_0": {"expert_weights": torch.tensor([0.25, 0.75]), "expert_weight_spread": torch.tensor(0.5)}}
    assert set(moe_histograms(stats)) == {"moe/block_0/expert_weights"}
    assert moe_scalars(stats)["moe/block_0/expert_weights_max_min_ratio"] == pytest.approx(3.0)


@pytest.mark.parametrize("bias", [[0.02, -0.01, 0.0, -0.01], [0.0, 0.0, 0.0, 0.0]])
def test_a_signed_or_all_zero_vector_gets_its_histogram_only(bias):
    stats = {"block_0": {"expert_bias": torch.tensor(bias), "expert_bias_range": torch.tensor(0.03)}}
    assert set(moe_histograms(stats)) == {"moe/block_0/expert_bias"}
    assert set(moe_scalars(stats)) == {"moe/block_0/expert_bias_range"}


def test_idle_experts_are_counted_as_a_fraction():
    stats = {"block_0": {"tokens_per_expert": torch.tensor([0.0, 6.0, 0.0, 2.0])}}
    assert moe_scalars(stats)["moe/block_0/tokens_per_expert_idle_fraction"] == 0.5


def test_reduction_over_ranks_sums_counts_and_averages_the_rest():
    stats = {  # a count is an integer stat
        "block_0": {"tokens_per_expert": torch.tensor([1, 3]), "dropped_fraction": torch.tensor(0.2)},
        "block_2": {"slot_usage": torch.tensor([0.25, 0.75]), "combine_entropy": torch.tensor(1.0)},
    }
    other_rank = {
        "block_0": {"tokens_per_expert": torch.tensor([5, 7]), "dropped_fraction": torch.tensor(0.4)},
        "block_2": {"slot_usage": torch.tensor([0.75, 0.25]), "combine_entropy": torch.tensor(3.0)},
    }
    calls = []

    def all_reduce_sum(flat):  # what two ranks would sum to, checking it is one collective
        calls.append(flat)
        keys = [(b, n) for b, s in other_rank.items() for n in s]
        return flat + torch.cat([other_rank[b][n].reshape(-1) for b, n in keys])

    reduced = reduce_over_ranks(stats, all_reduce_sum, world_size=2)
    assert len(calls) == 1
    torch.testing.assert_close(reduced["block_0"]["tokens_per_expert"], torch.tensor([6.0, 10.0]))
    torch.testing.assert_close(reduced["block_0"]["dropped_fraction"], torch.tensor(0.3))
    torch.testing.assert_close(reduced["block_2"]["slot_usage"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(reduced["block_2"]["combine_entropy"], torch.tensor(2.0))
    assert reduce_over_ranks(stats, all_reduce_sum, world_size=1) is stats


def test_counts_are_logged_as_floats():
    stats = {"block_0": {"tokens_per_expert": torch.tensor([0, 6, 3])}}
    assert moe_scalars(stats)["moe/block_0/tokens_per_expert_max_min_ratio"] == pytest.approx(6e6)
    assert moe_histograms(stats)["moe/block_0/tokens_per_expert"].dtype == torch.float32

"""The leakage suite on every FFN layer, including the known-leaky ones as negative controls."""

from functools import partial

import pytest

from lm_moe.causality import Checker, LayerSubject
from lm_moe.layers import (
    CumulativeSoftMoE,
    DenseFFN,
    ExpertChoiceMoE,
    LaggedChunkSoftMoE,
    MixtureOfTokens,
    ReMoE,
    SegmentMergedMoE,
    SoftMoE,
    TopKMoE,
)

DIM = 8

CAUSAL_LAYERS = {
    "dense": partial(DenseFFN, DIM, 16),
    "dense_swiglu": partial(DenseFFN, DIM, 16, activation="swiglu"),
    "top2_dropless": partial(TopKMoE, DIM, 16, 4),
    "top2_capacity": partial(TopKMoE, DIM, 16, 4, capacity_factor=0.5),
    "top1_capacity_jitter": partial(TopKMoE, DIM, 16, 4, top_k=1, capacity_factor=1.0, jitter_noise=0.1),
    "cumulative": partial(CumulativeSoftMoE, DIM, 16, 4),
    "cumulative_2_slots_decay": partial(CumulativeSoftMoE, DIM, 16, 3, slots_per_expert=2, decay=0.9),
    "lagged_chunk_prefix": partial(LaggedChunkSoftMoE, DIM, 16, 4, chunk_size=4),
    "lagged_chunk_previous": partial(LaggedChunkSoftMoE, DIM, 16, 3, slots_per_expert=2, chunk_size=5, summary="previous"),
    "mixture_of_tokens": partial(MixtureOfTokens, DIM, 16, 4, group_size=2),
    "mixture_of_tokens_2_slots": partial(MixtureOfTokens, DIM, 16, 3, slots_per_expert=2, group_size=3),
    "segment_merged": partial(SegmentMergedMoE, DIM, 16, 4, segment_size=4),
    "segment_merged_swiglu": partial(SegmentMergedMoE, DIM, 16, 3, segment_size=5, activation="swiglu"),
    "top2_sigmoid_loss_free_shared": partial(TopKMoE, DIM, 16, 4, score_function="sigmoid", balance="loss_free",
                                             shared_hidden_dim=8, shared_gate=True),
    "remoe": partial(ReMoE, DIM, 16, 4),
}

# Known to see the future: the suite must report each of them as leaking, which proves it can fail.
LEAKY_LAYERS = {
    "naive_soft_moe": partial(SoftMoE, DIM, 16, 4),
    "gshard_capacity": partial(TopKMoE, DIM, 16, 4, capacity_factor=0.5, capacity_priority="gshard"),
    "self_routed_first_segment": partial(SegmentMergedMoE, DIM, 16, 4, segment_size=4, first_segment="self"),
    "expert_choice": partial(ExpertChoiceMoE, DIM, 16, 4, capacity_factor=1.0),
}


def run_checks(factory):
    layer = factory().double()
    return {(result.check, result.mode): result for result in Checker(LayerSubject(layer, DIM)).results()}


@pytest.mark.parametrize("name", CAUSAL_LAYERS)
def test_causal_layer_passes_every_check(name):
    results = run_checks(CAUSAL_LAYERS[name])
    leaks = [f"{check} ({mode}): {result.max_diff:.2e} {result.note}" for (check, mode), result in results.items() if result.leaks]
    assert not leaks, leaks
    assert results[("future perturbation", "eval")].verdict == "PASS"
    assert results[("decode equivalence", "eval")].verdict == "PASS"
    expected_batch_verdict = "n/a" if name.startswith("mixture_of_tokens") else "PASS"
    assert results[("batch independence", "eval")].verdict == expected_batch_verdict


@pytest.mark.parametrize("name", LEAKY_LAYERS)
def test_known_leaky_layer_is_caught_by_the_forward_test(name):
    results = run_checks(LEAKY_LAYERS[name])
    assert results[("future perturbation", "eval")].verdict == "LEAK"
    assert results[("future perturbation", "train")].verdict == "LEAK"
    assert results[("prefix consistency", "eval")].verdict == "LEAK"
    assert results[("decode equivalence", "eval")].verdict in ("LEAK", "ERROR")  # ERROR: refuses to decode


def test_a_layer_whose_rows_share_a_capacity_is_not_judged_on_batch_independence():
    # Its row 0 goes first and keeps its drops whatever its batch-mates; the later rows do not.
    results = run_checks(partial(TopKMoE, DIM, 16, 4, capacity_factor=0.5, capacity_group="batch"))
    assert results[("batch independence", "eval")].verdict == "n/a"


def test_gradient_check_alone_is_blind_to_discrete_capacity_decisions():
    # Why the forward test comes first: GShard's drops leak, yet no gradient flows through them.
    results = run_checks(LEAKY_LAYERS["gshard_capacity"])
    assert results[("jacobian", "eval")].verdict == "PASS"
    assert results[("future perturbation", "eval")].verdict == "LEAK"


def test_a_layer_that_ignores_the_future_entirely_is_not_vacuous_but_one_that_ignores_everything_is():
    class Constant(DenseFFN):
        def forward(self, x, mask=None):
            y, aux = super().forward(x)
            return 0 * y, aux

    results = run_checks(partial(Constant, DIM, 16))
    assert results[("future perturbation", "eval")].verdict == "VACUOUS"

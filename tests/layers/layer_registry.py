"""Every built-in FFN layer as small float64 instances, with what the contract checks
(test_layer_contract.py) give them and expect of them. A new layer adds one entry to LAYERS."""

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from lm_moe import layers
from lm_moe.layers import FeedForwardLayer

DIM = 8
HIDDEN = 16  # rows of a multiple of 16 bytes in bf16 too: the grouped matmul takes them, as a real model's


@dataclass(frozen=True)
class RegisteredLayer:
    """One layer class: its small instances, the inputs the checks give them, what it declares."""

    layer_class: type[FeedForwardLayer]
    arguments: dict  # the base instance: width DIM, experts of width HIDDEN
    length: int  # tokens per sequence in the checks, past several of its chunks or segments
    valid_length: int  # where the padding check's padding starts in row 0
    # The base instance's parameter multiply-adds per token (None: a per-token cost it cannot state).
    parameter_macs: float | None
    bad_arguments: tuple[tuple[dict, str], ...]  # overrides the constructor refuses, and a regex of the message
    # Overrides of `arguments` with code paths of their own (capacity, decay, summary, ...): every
    # behavioural check runs on each. The first is the base instance.
    variants: dict[str, dict] = field(default_factory=lambda: {"": {}})
    decode_pieces: tuple[tuple[int, ...], ...] = ()  # prefill splits to decode in, the rest one token at a time
    # What the base instance declares: structure lengths, batch multiple, and the stats that are
    # counts (summed over data-parallel ranks).
    structure_lengths: tuple[int, ...] = ()
    batch_multiple: int = 1
    count_stats: frozenset[str] = frozenset()
    # Moves the parameters that start at a special value (a unit scale, zeros) away from it, so that a
    # check that forgets one of them fails.
    off_init: Callable[[FeedForwardLayer], None] | None = None

    def build(self, dtype: torch.dtype = torch.float64, **overrides) -> FeedForwardLayer:
        layer = self.layer_class(**{**self.arguments, **overrides}).to(dtype)
        if self.off_init is not None:
            with torch.no_grad():
                self.off_init(layer)
        return layer


def scale_off_one(layer) -> None:
    layer.scale.fill_(2.5)


def scale_and_null_outputs_off_init(layer) -> None:
    scale_off_one(layer)
    layer.null_outputs.normal_()


def prior_off_uniform(layer) -> None:
    if layer.first_segment == "prior":
        layer.prior_logits.copy_(torch.randn(layer.num_experts))


# What every layer of the Soft MoE family refuses.
SLOT_LAYER_BAD_ARGUMENTS = (
    (dict(num_experts=0), "num_experts"),
    (dict(slots_per_expert=0), "slots_per_expert"),
    (dict(hidden_dim=-2), "hidden_dim"),
    (dict(activation="silu"), "activation"),
    (dict(logit_scale_init=0), r"logit_scale_init must be a positive number, got 0"),
)
EXPERT = 2 * DIM * HIDDEN  # parameters of one GELU expert
SLOTS = 6  # the Soft MoE family's instances: 3 experts x 2 slots

LAYERS = {
    "dense": RegisteredLayer(
        layers.DenseFFN,
        dict(dim=DIM, hidden_dim=HIDDEN),
        length=9,
        valid_length=4,
        variants={"gelu": {}, "swiglu": dict(activation="swiglu")},
        decode_pieces=((9,), (2, 7), ()),
        parameter_macs=EXPERT,
        bad_arguments=(
            (dict(dim=0), "dim"),
            (dict(hidden_dim=-1), "hidden_dim"),
            (dict(activation="relu"), "activation"),
            (dict(dim=4.5), "dim"),
        ),
    ),
    "top2": RegisteredLayer(
        layers.TopKMoE,
        dict(dim=DIM, hidden_dim=HIDDEN, num_experts=4, top_k=2),
        length=11,
        valid_length=4,
        variants={
            "dropless": {},
            "capacity_0.5": dict(capacity_factor=0.5),
            "capacity_1": dict(capacity_factor=1.0),
            "batch_capacity": dict(capacity_factor=0.5, capacity_group="batch"),
            "sigmoid_shared": dict(score_function="sigmoid", shared_hidden_dim=6, shared_gate=True),
        },
        decode_pieces=((11,), (4, 1, 1, 5), (1,) * 11, (3, 8)),
        count_stats=frozenset({"tokens_per_expert"}),
        parameter_macs=DIM * 4 + 2 * EXPERT,
        bad_arguments=(
            (dict(top_k=5), "top_k"),
            (dict(top_k=0), "top_k"),
            (dict(num_experts=0), "num_experts"),
            (dict(hidden_dim=0), "hidden_dim"),
            (dict(dim=-3), "dim"),
            (dict(activation="tanh"), "activation"),
            (dict(capacity_factor=0), "capacity_factor"),
            (dict(capacity_factor=-1.0), "capacity_factor"),
            (dict(load_balance_weight=-0.1), "load_balance_weight"),
            (dict(z_loss_weight=-1), "z_loss_weight"),
            (dict(jitter_noise=1.5), "jitter_noise"),
            (dict(jitter_noise=1.0), r"jitter_noise must be a number in \[0, 1\), got 1.0"),
            (dict(jitter_noise=-0.1), "jitter_noise"),
            (dict(jitter_noise=True), "jitter_noise"),
            (dict(capacity_priority="first"), "capacity_priority"),
            (dict(capacity_group="image"), "capacity_group"),
            (dict(route_scale=0), r"route_scale must be a positive number, got 0"),
            (dict(router_init_std=-0.02), r"router_init_std must be a positive number, got -0.02"),
            (dict(score_function="relu"), r"score_function must be one of \['sigmoid', 'softmax'\], got 'relu'"),
            (dict(shared_hidden_dim=-1), "shared_hidden_dim"),
            (dict(shared_gate=True), r"shared_gate=True gates a shared expert: give shared_hidden_dim > 0"),
        ),
    ),
    "remoe": RegisteredLayer(
        layers.ReMoE,
        dict(dim=DIM, hidden_dim=HIDDEN, num_experts=4, target_active=2),
        length=11,
        valid_length=4,
        decode_pieces=((11,), (4, 1, 1, 5), (1,) * 11, (3, 8)),
        count_stats=frozenset({"tokens_per_expert"}),
        parameter_macs=DIM * 4 + 2 * EXPERT,
        bad_arguments=(
            (dict(num_experts=0), "num_experts"),
            (dict(target_active=0), "target_active"),
            (dict(target_active=4), r"target_active must be below num_experts=4 \(a target sparsity 1 - k/E in \(0, 1\)\), got 4"),
            (dict(l1_adapt=1.0), r"l1_adapt must be a number above 1, got 1.0"),
            (dict(l1_init=0), "l1_init"),
            (dict(router_init_std=0), "router_init_std"),
            (dict(activation="tanh"), "activation"),
            (dict(hidden_dim=0), "hidden_dim"),
        ),
    ),
    "expert_choice": RegisteredLayer(
        layers.ExpertChoiceMoE,
        dict(dim=DIM, hidden_dim=HIDDEN, num_experts=4, capacity_factor=2.0),
        length=9,
        valid_length=4,
        count_stats=frozenset({"tokens_per_expert"}),
        parameter_macs=DIM * 4 + 2 * EXPERT,
        bad_arguments=(
            (dict(num_experts=0), "num_experts"),
            (dict(capacity_factor=0), r"capacity_factor must be a positive number, got 0"),
            (dict(router_init_std=-1), "router_init_std"),
            (dict(route_scale=0), "route_scale"),
            (dict(activation="tanh"), "activation"),
            (dict(hidden_dim=0), "hidden_dim"),
        ),
    ),
    "soft_moe": RegisteredLayer(
        layers.SoftMoE,
        dict(dim=DIM, hidden_dim=HIDDEN, num_experts=3, slots_per_expert=2),
        length=7,
        valid_length=4,
        parameter_macs=None,  # S expert calls per sequence: a per-token cost that depends on T
        off_init=scale_off_one,
        bad_arguments=SLOT_LAYER_BAD_ARGUMENTS,
    ),
    "cumulative": RegisteredLayer(
        layers.CumulativeSoftMoE,
        dict(dim=DIM, hidden_dim=HIDDEN, num_experts=3, slots_per_expert=2),
        length=45,  # two blocks of the prefix sums (up to 32 positions each)
        valid_length=25,
        variants={"": {}, "decay": dict(decay=0.7)},
        # Prefills that are not multiples of E = 3; 32 positions fill one block of the prefix sums, 33 need two.
        decode_pieces=((), (1,), (3,), (5,), (7,), (32,), (33,), (2, 3, 7), (31, 1, 9)),
        parameter_macs=DIM * SLOTS + SLOTS * EXPERT,
        off_init=scale_off_one,
        bad_arguments=SLOT_LAYER_BAD_ARGUMENTS + (
            (dict(decay=0.0), "decay"),
            (dict(decay=1.0), "decay"),
            (dict(decay=-0.5), "decay"),
            (dict(decay="0.9"), "decay"),
        ),
    ),
    "lagged_chunk": RegisteredLayer(
        layers.LaggedChunkSoftMoE,
        dict(dim=DIM, hidden_dim=HIDDEN, num_experts=3, slots_per_expert=2, chunk_size=4, shared_hidden_dim=6),
        length=19,
        valid_length=9,  # inside chunk 2
        variants={"prefix": {}, "previous": dict(summary="previous")},
        # Prefills inside, on and just past chunk edges (C = 4), not multiples of E = 3 either.
        decode_pieces=((), (1,), (3,), (4,), (5,), (11,), (19,), (2, 5, 1), (3, 1, 9), (4, 4)),
        structure_lengths=(4,),
        parameter_macs=DIM * SLOTS + 2 * DIM * 6 + SLOTS / 4 * EXPERT,
        off_init=scale_and_null_outputs_off_init,
        bad_arguments=SLOT_LAYER_BAD_ARGUMENTS + (
            (dict(shared_hidden_dim=0), "shared_hidden_dim"),
            (dict(chunk_size=0), "chunk_size"),
            (dict(chunk_size=2.5), "chunk_size"),
            (dict(summary="all"), "summary"),
        ),
    ),
    "mixture_of_tokens": RegisteredLayer(
        layers.MixtureOfTokens,
        dict(dim=DIM, hidden_dim=HIDDEN, num_experts=3, slots_per_expert=2, group_size=2),
        length=9,
        valid_length=4,
        decode_pieces=((9,), (4, 1, 1, 3), (1,) * 9, (2, 7)),
        batch_multiple=2,
        parameter_macs=DIM * SLOTS + SLOTS / 2 * EXPERT,
        off_init=scale_off_one,
        bad_arguments=SLOT_LAYER_BAD_ARGUMENTS + (
            (dict(group_size=0), "group_size"),
            (dict(group_size=1.5), "group_size"),
            (dict(dim=0), "dim"),
        ),
    ),
    "segment_merged": RegisteredLayer(
        layers.SegmentMergedMoE,
        dict(dim=DIM, hidden_dim=HIDDEN, num_experts=3, segment_size=4),
        length=13,
        valid_length=3,  # inside segment 0, which the self-routed control routes on
        variants={"prior": {}, "self_routed": dict(first_segment="self")},
        decode_pieces=((13,), (3, 10), (5, 1, 1, 6), (1,) * 13, (2, 7, 4), (6, 2, 5)),
        structure_lengths=(4,),
        parameter_macs=3 * DIM / 4 + EXPERT + 3 * EXPERT / 4,
        off_init=prior_off_uniform,
        bad_arguments=(
            (dict(num_experts=0), "num_experts"),
            (dict(segment_size=0), "segment_size"),
            (dict(segment_size=2.0), "segment_size"),
            (dict(first_segment="next"), "first_segment"),
            (dict(hidden_dim=-2), "hidden_dim"),
            (dict(dim=0), "dim"),
            (dict(activation="silu"), "activation"),
        ),
    ),
}


def variant_params(accepts: Callable[[FeedForwardLayer], bool] = lambda layer: True) -> list:
    """pytest params (name, overrides) of every variant of every layer whose instance `accepts` takes."""
    return [
        pytest.param(name, overrides, id=f"{name}-{variant}" if variant else name)
        for name, entry in LAYERS.items()
        for variant, overrides in entry.variants.items()
        if accepts(entry.build(**overrides))
    ]

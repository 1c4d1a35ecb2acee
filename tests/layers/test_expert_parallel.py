"""Expert parallelism on 2 gloo processes: each rank holds half of the experts, and the layer's
outputs and gradients equal the single-process layer's on the concatenated input (float64), for
the sparse layers (uneven all-to-all) and the slot layers (Soft MoE and the causal V1-V3)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lm_moe import layers
from lm_moe.layers.expert_parallel import ExpertShard, keep_shard

DIM, HIDDEN, EXPERTS, WORLD = 8, 16, 4, 2
CASES = {
    "top2": (layers.TopKMoE, {"top_k": 2}),
    "top2_capacity": (layers.TopKMoE, {"top_k": 2, "capacity_factor": 0.5}),
    "sigmoid_loss_free_shared": (layers.TopKMoE, {"top_k": 2, "score_function": "sigmoid", "balance": "loss_free",
                                                  "shared_hidden_dim": 8, "shared_gate": True}),
    "top1": (layers.TopKMoE, {"top_k": 1}),
    "remoe": (layers.ReMoE, {"target_active": 2}),
    "soft_moe": (layers.SoftMoE, {"slots_per_expert": 2}),
    "cumulative": (layers.CumulativeSoftMoE, {"slots_per_expert": 2}),
    "lagged_chunk": (layers.LaggedChunkSoftMoE, {"slots_per_expert": 2, "chunk_size": 4, "shared_hidden_dim": 6}),
    "mixture_of_tokens": (layers.MixtureOfTokens, {"slots_per_expert": 2, "group_size": 2}),
}


def _layer(case: str):
    layer_class, arguments = CASES[case]
    torch.manual_seed(0)
    return layer_class(dim=DIM, hidden_dim=HIDDEN, num_experts=EXPERTS, **arguments).double()


def _inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2 * WORLD, 12, DIM, generator=generator, dtype=torch.float64)  # [B, T, D], B/2 per rank
    weights = torch.randn(2 * WORLD, 12, DIM, generator=generator, dtype=torch.float64)  # the loss's
    return x, weights


def _on_rank(rank: int, case: str, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        layer = _layer(case)
        layer.shard_experts(ExpertShard.of_group(dist.group.WORLD))
        x, weights = _inputs()
        x = x.chunk(WORLD)[rank].clone().requires_grad_()
        y, _ = layer(x)
        (y * weights.chunk(WORLD)[rank]).sum().backward()
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, {
            "y": y.detach(), "x_grad": x.grad, "experts": layer.experts.num_experts,
            "grads": {name: p.grad for name, p in layer.named_parameters()}})
        if rank == 0:
            torch.save(gathered, out_file)
        dist.barrier()  # no rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES)
def test_the_expert_parallel_layer_equals_the_single_process_layer(case, tmp_path):
    mp.spawn(_on_rank, args=(case, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=WORLD, join=True)
    ranks = torch.load(tmp_path / "out.pt")

    layer = _layer(case)
    x, weights = _inputs()
    x.requires_grad_()
    y, _ = layer(x)
    (y * weights).sum().backward()

    assert [rank["experts"] for rank in ranks] == [EXPERTS // WORLD] * WORLD  # each holds its half
    torch.testing.assert_close(torch.cat([rank["y"] for rank in ranks]), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([rank["x_grad"] for rank in ranks]), x.grad, rtol=1e-12, atol=1e-12)
    for name, parameter in layer.named_parameters():
        if name.startswith("experts."):  # each rank's shard: the gradient of every rank's rows routed to it
            expected = parameter.grad.chunk(WORLD)
            for rank, part in zip(ranks, expected):
                torch.testing.assert_close(rank["grads"][name], part, rtol=1e-12, atol=1e-12, msg=name)
        else:  # replicated: each rank's gradient is its own rows'; data parallelism sums them
            total = sum(rank["grads"][name] for rank in ranks)
            torch.testing.assert_close(total, parameter.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_a_shard_size_that_does_not_divide_the_experts_is_refused():
    layer = layers.TopKMoE(dim=DIM, hidden_dim=HIDDEN, num_experts=6)
    with pytest.raises(ValueError, match="expert parallelism over 4 ranks needs a number of experts it divides, "
                                         "got num_experts=6"):
        keep_shard(layer.experts, ExpertShard(None, 0, 4))


@pytest.mark.parametrize("layer", [
    layers.SegmentMergedMoE(dim=DIM, hidden_dim=HIDDEN, num_experts=EXPERTS, segment_size=4),
    layers.ExpertChoiceMoE(dim=DIM, hidden_dim=HIDDEN, num_experts=EXPERTS),
    layers.DenseFFN(dim=DIM, hidden_dim=HIDDEN),
], ids=lambda layer: type(layer).__name__)
def test_a_layer_without_expert_parallelism_refuses_to_be_sharded(layer):
    with pytest.raises(ValueError, match=f"{type(layer).__name__} does not support expert parallelism"):
        layer.shard_experts(ExpertShard(None, 0, 2))

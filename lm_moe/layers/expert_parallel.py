"""Expert parallelism for the sparse MoE layers: the E experts split in equal shards over the ranks
of a process group, the routing choices' rows sent to the rank that holds their expert with an
all-to-all of uneven splits, computed there in one grouped matmul, and sent back. Autograd flows
through both exchanges (torch's functional all-to-all), so an expert's gradient collects the
rows of every rank that routed to it.

A rank's rows, sorted by global expert, fall into one block per destination rank (its shard's
experts in order); a rank receives one block per source rank, each sorted by its local experts.
The rows are regrouped by local expert for the grouped matmul and put back in source order for the
return trip.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from lm_moe.layers.ffn import ExpertWeights


@dataclass(frozen=True)
class ExpertShard:
    """This rank's share of a layer's experts: the `size` ranks of `group` hold E / size experts
    each, rank r those numbered r * E / size and up. Combined with data parallelism, the ranks of
    `replicas` hold the same shard; `gradient_divisor` is what the data-parallel average divides by
    (the number of ranks whose losses are averaged)."""

    group: dist.ProcessGroup
    rank: int
    size: int
    replicas: dist.ProcessGroup | None = None
    gradient_divisor: int = 1

    @classmethod
    def of_group(cls, group: dist.ProcessGroup, replicas: dist.ProcessGroup | None = None,
                 gradient_divisor: int = 1) -> "ExpertShard":
        return cls(group, dist.get_rank(group), dist.get_world_size(group), replicas, gradient_divisor)

    def average_gradients(self, experts: ExpertWeights) -> None:
        """Once per optimizer step: the shard's gradients (each the sum over the rows every rank of
        `group` sent it) summed over its replicas and divided as the data-parallel average divides
        the replicated parameters' gradients."""
        for parameter in experts.parameters():
            if parameter.grad is None:
                continue
            if self.replicas is not None:
                dist.all_reduce(parameter.grad, group=self.replicas)
            parameter.grad.div_(self.gradient_divisor)

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The full tensor of the shards of every rank of `group`, concatenated along dim 0."""
        pieces = [torch.empty_like(shard) for _ in range(self.size)]
        dist.all_gather(pieces, shard.contiguous(), group=self.group)
        return torch.cat(pieces)

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full tensor (dim 0 split in `size` equal parts)."""
        return full.chunk(self.size)[self.rank].clone()


def keep_shard(experts: ExpertWeights, shard: ExpertShard) -> None:
    """Keep, in place, only the experts of this rank's shard (a ValueError unless the shard size
    divides the number of experts)."""
    total = experts.num_experts
    if total % shard.size:
        raise ValueError(f"expert parallelism over {shard.size} ranks needs a number of experts it divides, "
                         f"got num_experts={total}")
    local = total // shard.size
    first = shard.rank * local
    with torch.no_grad():
        experts.w_in = torch.nn.Parameter(experts.w_in[first:first + local].clone())
        experts.w_out = torch.nn.Parameter(experts.w_out[first:first + local].clone())
    experts.num_experts = local


def _regroup_by_local_expert(counts: torch.Tensor) -> torch.Tensor:
    """For rows in blocks (source p, local expert l) of sizes counts [P, L], source-major: the
    position [R] each row takes when the blocks are ordered expert-major (l, p) instead."""
    P, L = counts.shape
    source_major = counts.reshape(-1)  # [P*L]
    expert_major = counts.t().reshape(-1)  # [L*P]
    start_source_major = source_major.cumsum(0) - source_major  # [P*L]
    start_expert_major = (expert_major.cumsum(0) - expert_major).view(L, P).t().reshape(-1)  # [P*L], by (p, l)
    total = int(source_major.sum())
    block = torch.repeat_interleave(torch.arange(P * L, device=counts.device), source_major, output_size=total)  # [R]
    offset = torch.arange(total, device=counts.device) - start_source_major[block]  # [R]
    return start_expert_major[block] + offset  # [R]


def run_sharded(experts: ExpertWeights, shard: ExpertShard, rows: torch.Tensor,
                rows_per_expert: torch.Tensor) -> torch.Tensor:
    """The outputs of `rows` [M, D], sorted by global expert with rows_per_expert [E] of them for
    each, computed on the ranks that hold their experts: [M, D], in the same order."""
    P, L = shard.size, experts.num_experts
    send_counts = rows_per_expert.view(P, L)  # [P, L]: this rank's rows for each rank's experts
    recv_counts = torch.empty_like(send_counts)  # [P, L]: each source's rows for this rank's experts
    dist.all_to_all_single(recv_counts.view(-1), send_counts.reshape(-1).contiguous(), group=shard.group)
    send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
    received = all_to_all_single_autograd(rows.contiguous(), recv_splits, send_splits, shard.group)  # [R, D]
    position = _regroup_by_local_expert(recv_counts)  # [R]
    order = torch.empty_like(position).scatter_(0, position, torch.arange(position.numel(), device=position.device))
    outputs = experts.forward_grouped(received.index_select(0, order), recv_counts.sum(0))  # [R, D], by local expert
    back = outputs.index_select(0, position)  # [R, D], by source again
    return all_to_all_single_autograd(back, send_splits, recv_splits, shard.group)  # [M, D]


def run_sharded_batched(experts: ExpertWeights, shard: ExpertShard, x: torch.Tensor) -> torch.Tensor:
    """Expert e on its own rows x[e], for all E experts held in shards: x [E, M, D] -> [E, M, D].
    The slot layers' exchange: every expert has M rows on each rank, so the splits follow from
    the ranks' M (equal in training, where every rank's batch has the same size)."""
    E, M, D = x.shape
    L = experts.num_experts
    sizes = torch.tensor([M], device=x.device)
    every_m = [torch.empty_like(sizes) for _ in range(shard.size)]
    dist.all_gather(every_m, sizes, group=shard.group)
    rows_from = [int(m) for m in every_m]  # M of each source rank
    send_splits, recv_splits = [L * M] * shard.size, [L * m for m in rows_from]
    # x is expert-major, so the rows for rank q (its experts q*L ...) are one contiguous block.
    received = all_to_all_single_autograd(x.reshape(E * M, D), recv_splits, send_splits, shard.group)  # [sum, D]
    blocks = [block.view(L, m, D) for block, m in zip(received.split(recv_splits), rows_from)]
    outputs = experts.forward_batched(torch.cat(blocks, dim=1))  # [L, sum of M, D]
    back = torch.cat([block.reshape(L * m, D) for block, m in zip(outputs.split(rows_from, dim=1), rows_from)])
    return all_to_all_single_autograd(back, send_splits, recv_splits, shard.group).view(E, M, D)

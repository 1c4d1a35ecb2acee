"""The sorted grouped dispatch of the sparse MoE layers (TopKMoE, ReMoE): routing choices sorted by
expert, every expert run once on its rows in one grouped matmul (on the rank that holds it, under
expert parallelism: lm_moe.layers.expert_parallel), the outputs put back in choice order. A layer
decides the choices and how their outputs combine; this module moves the rows."""

import torch

from lm_moe.layers.expert_parallel import ExpertShard, run_sharded
from lm_moe.layers.ffn import ExpertWeights


class _PermuteRows(torch.autograd.Function):
    """x.index_select(0, perm) for a permutation `perm` with inverse `inverse`. Its backward is
    the gather by `inverse`, where autograd would scatter-add (slower: it zero-fills, then adds)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def run_choices(
    experts: ExpertWeights, tokens: torch.Tensor, choice_expert: torch.Tensor, choice_token: torch.Tensor,
    some_unserved: bool = False, shard: ExpertShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each routing choice's expert output, in choice order.

    Args:
        experts: the E experts; under expert parallelism (`shard`), this rank's E / shard.size of them.
        tokens: [N, D].
        choice_expert: [C] long, the expert of each choice; with `some_unserved`, E marks a choice
            no expert serves (its output is 0). Without it, counting the served rows, a host sync
            on a GPU, is skipped.
        choice_token: [C] long, the token of each choice.
        shard: this rank's share of the experts, or None (every expert here).
    Returns:
        the outputs [C, D] and the rows each expert ran on [E] (long).
    """
    num_experts, D = experts.num_experts * (shard.size if shard else 1), tokens.shape[-1]
    order = torch.argsort(choice_expert, stable=True)  # [C], the unserved sentinel E sorts last
    # A scatter-add, not bincount: its output shape is static, so torch.compile keeps one graph.
    rows_per_expert = choice_expert.new_zeros(num_experts + 1).scatter_add_(
        0, choice_expert, torch.ones_like(choice_expert))[:num_experts]  # [E]
    served = int(rows_per_expert.sum()) if some_unserved else order.numel()
    served_rows = order[:served]  # [M]
    rows = tokens.index_select(0, choice_token.index_select(0, served_rows))  # [M, D], sorted by expert
    if shard is None:
        expert_out = experts.forward_grouped(rows, rows_per_expert)  # [M, D]
    else:
        expert_out = run_sharded(experts, shard, rows, rows_per_expert)  # [M, D]
    if served < order.numel():  # choices not served output 0
        expert_out = torch.cat([expert_out, expert_out.new_zeros(order.numel() - served, D)])  # [C, D]
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))  # [C]
    return _PermuteRows.apply(expert_out, inverse, order), rows_per_expert  # [C, D], [E]

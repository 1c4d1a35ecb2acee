"""Top-k routing: the router, its auxiliary losses, and the position-priority capacity rule.

Notation: N tokens, E experts, k choices per token. Router math always runs in at least fp32
(softmax and log-sum-exp in bf16 mis-rank experts and blow up the z-loss), also under autocast.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.distributed as dist
from torch import nn

from lm_moe.layers.numerics import entropy, masked_mean, routing_dtype

ROUTER_INIT_STD = 0.02
SCORE_FUNCTIONS = ("softmax", "sigmoid")


@dataclass
class TopKRouting:
    logits: torch.Tensor  # [N, E] router logits (fp32 or wider)
    probs: torch.Tensor  # [N, E] affinities as a distribution over experts: the softmax, or the sigmoid scores / their sum
    expert_index: torch.Tensor  # [N, k] chosen experts, best first
    weight: torch.Tensor  # [N, k] combine weights of the chosen experts


class TopKRouter(nn.Module):
    """Linear router, a score per expert, then the top k (Switch / ST-MoE / Mixtral / DeepSeek-V3 style).

    score_function: "softmax" over the experts (Switch, Mixtral), or "sigmoid" of each logit on its
                  own (DeepSeek-V3: an expert's affinity does not depend on the others'). The
                  balancing loss and the entropy read the sigmoid scores normalised to sum 1 over
                  the experts, as DeepSeek-V3's sequence-wise balance loss does.
    renormalize:  rescale the k chosen scores to sum to 1 (Mixtral, DeepSeek-V3); otherwise keep
                  the raw scores (Switch, ST-MoE).
    route_scale:  multiply the combine weights (never the probabilities the losses see) by this.
    jitter_noise: in training, multiply the router input by U(1 - eps, 1 + eps) (Switch).
    init_std:     the weight's initial N(0, init_std). The default 0.02 gives logits of std
                  0.02 * sqrt(dim) (0.32 at dim 256) on normalised inputs: near-even first choices,
                  and a router that Adam's first steps move fast relative to its size. A larger
                  start (dim ** -0.5, logits of std 1) trails by 0.1 nats at 300 steps
                  (docs/moe_baseline.md).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool = True, jitter_noise: float = 0.0,
                 route_scale: float = 1.0, init_std: float = ROUTER_INIT_STD, score_function: str = "softmax"):
        super().__init__()
        self.score_function = score_function
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.top_k = top_k
        self.renormalize = renormalize
        self.jitter_noise = jitter_noise
        self.route_scale = route_scale
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor, selection_bias: torch.Tensor | None = None) -> TopKRouting:
        """x [N, D] -> routing of each of the N tokens. `selection_bias` [E] (loss-free balancing)
        is added to the scores to pick the top k only: the combine weights are the unbiased scores."""
        dtype = routing_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            if self.training and self.jitter_noise > 0:
                x = x * torch.empty_like(x).uniform_(1 - self.jitter_noise, 1 + self.jitter_noise)
            # Experts-first layout: on CPU, softmax and top-k along the first dim of [E, N] run
            # about 10x faster than along a last dim of E (a handful of experts).
            logits = F.linear(x, self.weight.to(dtype)).t().contiguous()  # [E, N]
            if self.score_function == "softmax":
                scores = probs = logits.softmax(dim=0)  # [E, N]
            else:
                scores = logits.sigmoid()  # [E, N]
                probs = scores / scores.sum(dim=0, keepdim=True)  # [E, N]
            if selection_bias is None:
                weight, expert_index = scores.topk(self.top_k, dim=0)  # [k, N], [k, N]
            else:
                expert_index = (scores + selection_bias.to(dtype).unsqueeze(1)).topk(self.top_k, dim=0).indices  # [k, N]
                weight = scores.gather(0, expert_index)  # [k, N]
            if self.renormalize:
                weight = weight / weight.sum(dim=0, keepdim=True)
            if self.route_scale != 1:
                weight = weight * self.route_scale
        return TopKRouting(logits=logits.t(), probs=probs.t(), expert_index=expert_index.t(), weight=weight.t())


def load_balancing_loss(
    routing: TopKRouting, valid: torch.Tensor | None = None, share_of_choices: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer loss `E * sum_e f_e * P_e`, with f_e the share of the routing choices
    that picked expert e and P_e the mean router probability of e over these tokens.

    f_e counts choices over N*k (not tokens over N), so a perfectly balanced router scores exactly
    1 for every k, before any capacity drop, as in Switch. By default f counts these tokens'
    choices; `share_of_choices` [E] gives it counted over a wider scope (the global batch), and
    carries no gradient either way.
    """
    num_experts = routing.probs.shape[-1]
    if share_of_choices is None:
        share_of_choices = choice_share(routing.expert_index, valid, num_experts, routing.probs.dtype)  # [E]
    mean_prob = masked_mean(routing.probs, valid)  # [E]
    return num_experts * (share_of_choices * mean_prob).sum()


def sequence_balancing_loss(routing: TopKRouting, valid: torch.Tensor | None, batch: int) -> torch.Tensor:
    """The Switch loss of each of the `batch` sequences (the N tokens in rows of N / batch), then
    their mean over the sequences with a real token: DeepSeek-V3's sequence-wise balance loss."""
    num_experts = routing.probs.shape[-1]
    index = routing.expert_index.reshape(batch, -1)  # [B, T*k]
    rows_valid = torch.ones(routing.probs.shape[0], dtype=torch.bool, device=index.device) if valid is None else valid
    rows_valid = rows_valid.view(batch, -1)  # [B, T]
    weight = rows_valid.to(routing.probs.dtype).repeat_interleave(routing.expert_index.shape[-1], dim=1)  # [B, T*k]
    counts = weight.new_zeros(batch, num_experts).scatter_add_(1, index, weight)  # [B, E]
    share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)  # [B, E]
    probs = routing.probs.view(batch, -1, num_experts) * rows_valid.unsqueeze(-1)  # [B, T, E]
    mean_prob = probs.sum(dim=1) / rows_valid.sum(dim=1, keepdim=True).clamp_min(1)  # [B, E]
    per_sequence = num_experts * (share * mean_prob).sum(dim=1)  # [B]
    has_tokens = rows_valid.any(dim=1)  # [B]
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp_min(1)


def choice_counts(
    expert_index: torch.Tensor, valid: torch.Tensor | None, num_experts: int, dtype: torch.dtype
) -> torch.Tensor:
    """How many of the routing choices expert_index [N, k] of the valid [N] tokens went to each
    expert: [E] in `dtype`."""
    weight = torch.ones_like(expert_index, dtype=dtype)  # [N, k]
    if valid is not None:
        weight = weight * valid.unsqueeze(-1)
    return weight.new_zeros(num_experts).scatter_add_(0, expert_index.reshape(-1), weight.reshape(-1))  # [E]


def sum_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    """`counts` summed in place over the data-parallel ranks (unchanged in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return counts


def choice_share(
    expert_index: torch.Tensor, valid: torch.Tensor | None, num_experts: int, dtype: torch.dtype
) -> torch.Tensor:
    """The share of the routing choices expert_index [N, k] of the valid [N] tokens that went to
    each expert: [E] in `dtype`, sums to 1 (0 everywhere when no token is valid)."""
    counts = choice_counts(expert_index, valid, num_experts, dtype)  # [E]
    return counts / counts.sum().clamp_min(1)


def router_z_loss(routing: TopKRouting, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return masked_mean(torch.logsumexp(routing.logits, dim=-1) ** 2, valid)


def router_entropy(routing: TopKRouting, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of the router distribution over experts; ln(E) = uniform."""
    return masked_mean(entropy(routing.probs, dim=-1), valid)  # mean over tokens of [N]


def prefix_capacity(capacity_factor: float, top_k: int, num_experts: int, seq_len: int, start: int = 0) -> torch.Tensor:
    """How many choices each expert may have served by position t, for t = start .. start+seq_len-1:
    [seq_len] long, ceil(capacity_factor * k * (t + 1) / E), the expert's fair share of the prefix.

    A capacity that depends only on the prefix (never on the sequence length T) keeps the layer
    prefix-consistent, so it gives the same outputs in training and in token-by-token decoding.
    """
    positions = torch.arange(start + 1, start + seq_len + 1, dtype=torch.float64)  # [T]
    return torch.ceil(capacity_factor * top_k * positions / num_experts).long()  # [T]


def gshard_capacity(capacity_factor: float, top_k: int, num_experts: int, seq_len: int) -> torch.Tensor:
    """GShard / ST-MoE: one capacity for the whole sequence, ceil(capacity_factor * k * T / E),
    for each of the k*T choices taken first choices first: [k*T] long. A function of T."""
    return torch.full((top_k * seq_len,), math.ceil(capacity_factor * top_k * seq_len / num_experts))


def position_priority_keep(
    expert_index: torch.Tensor,
    routed: torch.Tensor,
    capacity: torch.Tensor,
    num_experts: int,
    served_before: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which routing choices an expert serves when earlier positions go first.

    expert_index [B, T, k], routed [B, T, k] (False = not routed at all, e.g. padding), capacity
    [T] non-decreasing (see `prefix_capacity`) and served_before [B, E] (choices each expert had
    served before this stretch; decoding passes it on, None = 0) -> (keep [B, T, k], served_after
    [B, E]). Walking each sequence in position order, an expert serves a choice at position t iff
    it has served fewer than capacity[t] choices so far (one token never picks an expert twice).
    The decision at t depends only on positions <= t of the same sequence: causal and
    independent of the batch.
    """
    choices = F.one_hot(expert_index, num_experts) * routed.unsqueeze(-1)  # [B, T, k, E]
    arrivals = choices.sum(dim=2)  # [B, T, E] 0/1: does position t ask for expert e
    arrived = arrivals.cumsum(dim=1)  # [B, T, E]
    start = arrived.new_zeros(arrived.shape[0], 1, num_experts) if served_before is None else served_before[:, None]
    # served(t) = min(served(t-1) + arrivals(t), capacity(t)), served(-1) = start, with capacity
    # non-decreasing, unrolls to served(t) = arrived(t) + min(start, min_{s<=t} capacity(s) - arrived(s)).
    slack = capacity.to(arrived.device).view(1, -1, 1) - arrived  # [B, T, E]
    served = arrived + torch.minimum(start, slack.cummin(dim=1).values)  # [B, T, E]
    served_earlier = torch.cat([start, served[:, :-1]], dim=1)  # [B, T, E]
    newly_served = (served - served_earlier).gather(-1, expert_index)  # [B, T, k] 0/1
    return routed & newly_served.bool(), served[:, -1]


def gshard_keep(expert_index: torch.Tensor, routed: torch.Tensor, capacity_factor: float, num_experts: int) -> torch.Tensor:
    """GShard's rule, kept as a KNOWN-LEAKY negative control: all first choices of the sequence
    (in position order) before any second choice, one capacity for the whole sequence. A later
    token's first choice can evict an earlier token's second choice: the future decides what the
    past drops. expert_index, routed [B, T, k] -> keep [B, T, k]."""
    B, T, k = expert_index.shape
    choice_major = expert_index.transpose(1, 2).reshape(B, k * T, 1)  # [B, k*T, 1] first choices first
    routed_major = routed.transpose(1, 2).reshape(B, k * T, 1)  # [B, k*T, 1]
    capacity = gshard_capacity(capacity_factor, k, num_experts, T)  # [k*T]
    keep, _ = position_priority_keep(choice_major, routed_major, capacity, num_experts)
    return keep.reshape(B, k, T).transpose(1, 2)  # [B, T, k]

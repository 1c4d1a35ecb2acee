"""Expert-choice routing (Zhou et al., "Mixture-of-Experts with Expert Choice Routing", 2022).

Notation: B sequences of T tokens, D width, E experts, C = ceil(capacity_factor * T / E) tokens per
expert and sequence.

    S[b, t, e] = softmax over e of (w_e . x[b, t])         token-to-expert affinities
    expert e takes the C tokens of sequence b with the highest S[b, :, e]
    y[b, t]    = route_scale * sum over the experts e that took t of S[b, t, e] * expert_e(x[b, t])

Every expert is busy with exactly C tokens (balanced by construction, no balancing loss), a token
may be taken by several experts or by none. Which tokens an expert takes depends on the whole
sequence, the later tokens included: the layer sees the future. It is for encoders (the ViT); a
decoder refuses it, and the leakage suite catches it as a negative control.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm_moe.argument_checks import require_positive_float, require_positive_int
from lm_moe.layers.expert_dispatch import run_choices
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.ffn import ExpertWeights
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.layer_output import LayerAux, deferred_stats
from lm_moe.layers.numerics import masked_mean, routing_dtype
from lm_moe.layers.routing import ROUTER_INIT_STD


class ExpertChoiceMoE(FeedForwardLayer):
    """Expert-choice MoE: x [B, T, D] -> (y [B, T, D], LayerAux with zero loss).

    capacity_factor: C = ceil(capacity_factor * T / E) tokens per expert and sequence; at 1 the
        experts take T choices in all, as many as top-1 routing (the paper's EC-CF1), at 2 as
        many as top-2.
    route_scale: multiplies the combine weights; None = E. The affinities start near 1/E, so
        without it a chosen expert would weigh 1/E of what it does in a dense MLP's place (the
        output-scale handicap docs/moe_baseline.md measures for top-k), and TopKMoE's default
        route_scale makes its chosen experts weigh about 1 each in the same way.
    `mask` [B, T] (True = real token): no expert takes padding, which outputs 0, and C counts the
    real tokens of each sequence, so that padding changes nothing for them.
    aux.stats: unrouted_fraction (the share of real tokens no expert took), experts_per_token
    (their mean number of experts), tokens_per_expert [E] (a count).
    """

    is_causal = False  # an expert's choice among a sequence's tokens depends on its later tokens

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        capacity_factor: float = 2.0,
        activation: str = "gelu",
        router_init_std: float = ROUTER_INIT_STD,
        route_scale: float | None = None,
        expert_dropout: float = 0.0,
    ):
        super().__init__()
        self.num_experts = require_positive_int("num_experts", num_experts)
        self.capacity_factor = require_positive_float("capacity_factor", capacity_factor)
        self.route_scale = float(num_experts) if route_scale is None else require_positive_float("route_scale", route_scale)
        self.experts = ExpertWeights(num_experts, dim, hidden_dim, activation, dropout=expert_dropout)
        self.router = nn.Parameter(torch.randn(num_experts, dim) * require_positive_float("router_init_std",
                                                                                          router_init_std))  # [E, D]

    def capacity(self, length: int) -> int:
        """C: the tokens each expert takes from a sequence of `length`, at most all of them."""
        return min(length, math.ceil(self.capacity_factor * length / self.num_experts))

    def parameter_macs_per_token(self) -> float:
        """The router (D*E) and, per token on average, E * C / T = capacity_factor experts."""
        return self.router.numel() + self.capacity_factor * self.experts.parameters_per_expert

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        check_layer_input(x, mask, self.experts.dim)
        B, T, D = x.shape
        E, C = self.num_experts, self.capacity(T)
        dtype = routing_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            affinity = F.linear(x.to(dtype), self.router.to(dtype)).softmax(dim=-1)  # [B, T, E]
        ranking = affinity if mask is None else affinity.masked_fill(~mask.unsqueeze(-1), -1.0)  # padding ranks last
        weight, position = ranking.topk(C, dim=1)  # [B, C, E] each expert's C best tokens of each sequence
        taken = torch.ones_like(weight, dtype=torch.bool)  # [B, C, E]
        if mask is not None:  # a row of L real tokens: C = ceil(capacity_factor * L / E) of them
            lengths = mask.sum(dim=1)  # [B]
            row_capacity = torch.minimum(torch.ceil(self.capacity_factor * lengths / E), lengths)  # [B]
            taken = torch.arange(C, device=x.device).view(1, C, 1) < row_capacity.view(B, 1, 1)  # [B, C, 1]
            taken = taken.expand(B, C, E)
        choice_token = (position + torch.arange(B, device=x.device).view(B, 1, 1) * T).permute(0, 2, 1)  # [B, E, C]
        choice_expert = torch.arange(E, device=x.device).view(1, E, 1).expand(B, E, C)  # [B, E, C]
        taken = taken.permute(0, 2, 1)  # [B, E, C]
        choice_expert = choice_expert.masked_fill(~taken, E)  # E: not served
        weight = weight.permute(0, 2, 1) * taken * self.route_scale  # [B, E, C]

        tokens = x.reshape(B * T, D)  # [N, D]
        choice_out, rows_per_expert = run_choices(self.experts, tokens, choice_expert.reshape(-1),
                                                  choice_token.reshape(-1), some_unserved=mask is not None)  # [B*E*C, D]
        weighted = weight.reshape(-1, 1).to(choice_out.dtype) * choice_out  # [B*E*C, D]
        y = torch.zeros_like(tokens, dtype=choice_out.dtype).index_add_(0, choice_token.reshape(-1), weighted)  # [N, D]
        valid = None if mask is None else mask.reshape(B * T)
        aux = LayerAux.empty(x)
        aux.stats = deferred_stats(self._stats, choice_token.reshape(-1), taken.reshape(-1), B * T, valid,
                                   rows_per_expert)
        return y.view(B, T, D), aux

    @staticmethod
    def _stats(choice_token, taken, num_tokens, valid, rows_per_expert) -> dict[str, torch.Tensor]:
        """From each choice's token [C] and whether an expert took it [C]."""
        experts_per_token = torch.zeros(num_tokens, device=taken.device).index_add_(0, choice_token, taken.float())  # [N]
        return {
            "unrouted_fraction": masked_mean((experts_per_token == 0).float(), valid),
            "experts_per_token": masked_mean(experts_per_token, valid),
            "tokens_per_expert": rows_per_expert,  # a count: summed over data-parallel ranks
        }

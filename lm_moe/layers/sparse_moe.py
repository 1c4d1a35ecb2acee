"""Sparse top-k Mixture of Experts (Switch / ST-MoE / Mixtral style), dropless by default."""

import torch
from torch import nn

from lm_moe.layers.checks import (
    require_non_negative_float,
    require_positive_float,
    require_positive_int,
)
from lm_moe.layers.ffn import ExpertWeights
from lm_moe.layers.layer_output import LayerAux
from lm_moe.layers.routing import (
    TopKRouter,
    load_balancing_loss,
    position_priority_keep,
    prefix_capacity,
    router_entropy,
    router_z_loss,
)


class TopKMoE(nn.Module):
    """Each token goes to its `top_k` best experts; the output is the gate-weighted sum.

    x [B, T, D] -> (y [B, T, D], LayerAux). Tokens are sorted by expert and all experts run in
    one grouped matmul, so the cost is that of the k chosen experts per token.

    capacity_factor: None = dropless (every choice is served). Otherwise, within each sequence and
        in position order, an expert serves a choice at position t only while it has served fewer
        than ceil(capacity_factor * top_k * (t + 1) / E) choices: its fair share of the prefix.
        A choice over capacity contributes 0 (the token keeps its residual). Priority by position
        and a capacity that depends on the prefix alone keep the layer causal, per-example
        deterministic and prefix-consistent (decoding reproduces training).
    aux.loss = load_balance_weight * Switch load-balancing loss + z_loss_weight * ST-MoE z-loss.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = None,
        activation: str = "gelu",
        renormalize: bool = True,
        load_balance_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        jitter_noise: float = 0.0,
    ):
        super().__init__()
        require_positive_int("num_experts", num_experts)
        require_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k must be at most num_experts={num_experts}, got {top_k}")
        if capacity_factor is not None:
            require_positive_float("capacity_factor", capacity_factor)
        self.load_balance_weight = require_non_negative_float("load_balance_weight", load_balance_weight)
        self.z_loss_weight = require_non_negative_float("z_loss_weight", z_loss_weight)
        jitter_noise = require_non_negative_float("jitter_noise", jitter_noise)
        if jitter_noise >= 1:
            raise ValueError(f"jitter_noise must be in [0, 1), got {jitter_noise}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.experts = ExpertWeights(num_experts, dim, hidden_dim, activation)
        self.router = TopKRouter(dim, num_experts, top_k, renormalize, jitter_noise)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        """`mask` [B, T] (True = real token): padding is routed nowhere and outputs 0."""
        B, T, D = x.shape
        k, E = self.top_k, self.num_experts
        tokens = x.reshape(B * T, D)  # [N, D]
        valid = None if mask is None else mask.reshape(B * T)  # [N]
        routing = self.router(tokens)

        served = self._served_choices(routing.expert_index.view(B, T, k), mask)  # [B, T, k] or None
        # Sort the N*k choices by expert; choices not served get the sentinel E and sort last.
        choice_expert = routing.expert_index.reshape(-1)  # [N*k]
        if served is not None:
            choice_expert = choice_expert.masked_fill(~served.reshape(-1), E)
        order = torch.argsort(choice_expert, stable=True)  # [N*k]
        rows_per_expert = torch.bincount(choice_expert, minlength=E + 1)[:E]  # [E]
        if served is not None:
            order = order[: int(rows_per_expert.sum())]  # [M] drop the sentinel group
        token_of_row = order // k  # [M]
        expert_in = tokens.index_select(0, token_of_row)  # [M, D]
        expert_out = self.experts.forward_grouped(expert_in, rows_per_expert)  # [M, D]

        # Gate-weighted sum over each token's k choices, added straight from the sorted rows.
        gate = routing.weight.reshape(-1)[order].to(expert_out.dtype)  # [M]
        y = expert_out.new_zeros(B * T, D).index_add(0, token_of_row, expert_out * gate.unsqueeze(-1))  # [N, D]

        balance = load_balancing_loss(routing, valid)
        z_loss = router_z_loss(routing, valid)
        aux = LayerAux(
            loss=self.load_balance_weight * balance + self.z_loss_weight * z_loss,
            stats=self._stats(routing, rows_per_expert, valid, balance, z_loss),
        )
        return y.view(B, T, D), aux

    def _served_choices(self, expert_index: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """[B, T, k] bool of the choices an expert serves, or None when all are (dropless, no padding)."""
        if self.capacity_factor is None and mask is None:
            return None
        routed = torch.ones_like(expert_index, dtype=torch.bool)  # [B, T, k]
        if mask is not None:
            routed = routed & mask.unsqueeze(-1)
        if self.capacity_factor is None:
            return routed
        capacity = prefix_capacity(self.capacity_factor, self.top_k, self.num_experts, expert_index.shape[1])
        return position_priority_keep(expert_index, routed, capacity, self.num_experts)

    def _stats(self, routing, rows_per_expert, valid, balance, z_loss) -> dict[str, torch.Tensor]:
        num_choices = routing.expert_index.numel() if valid is None else valid.sum() * self.top_k
        served_share = rows_per_expert.sum() / torch.as_tensor(num_choices).clamp_min(1)
        return {
            "tokens_per_expert": rows_per_expert.detach().float(),
            "dropped_fraction": (1 - served_share).detach().float(),
            "router_entropy": router_entropy(routing, valid).detach(),
            "load_balance_loss": balance.detach(),
            "router_z_loss": z_loss.detach(),
        }

"""ReMoE: fully differentiable MoE with ReLU routing (Wang et al., "ReMoE: Fully Differentiable
Mixture-of-Experts with ReLU Routing", ICLR 2025).

Notation: N tokens, D width, E experts, k the target number of active experts per token.

    g[t, e]  = relu(w_e . x[t])                      gates: 0 = expert e is off for token t
    y[t]     = sum over e with g[t, e] > 0 of g[t, e] * expert_e(x[t])
    f_e      = E / (k N) * #{t : g[t, e] > 0}        load of expert e (1 = its fair share at k)
    L_reg    = sum_e f_e * mean_t g[t, e]            the L1 penalty, weighted toward busy experts
    aux.loss = lambda * L_reg

The number of experts a token uses varies (dropless); their choices run through the sorted
grouped dispatch that TopKMoE uses. `lambda` (a buffer, saved in checkpoints) starts at
`l1_init` and, once per optimizer step, is multiplied by `l1_adapt` while the step's sparsity
(the share of zero gates over its micro-batches and ranks) is below the target 1 - k/E, and
divided by it while above: the gates settle at about k active experts per token. With
`l1_scope="model"` (the paper's rule), the sparsity is that of all the model's ReMoE layers
together and they share one lambda: the mean over layers holds the target, while a layer may settle
denser or sparser than it. With "layer", each layer steers its own. Routing is per token, so the
layer is causal.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lm_moe.argument_checks import require_choice, require_positive_float, require_positive_int
from lm_moe.layers.expert_dispatch import run_choices
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.ffn import ExpertWeights
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.layer_output import LayerAux, deferred_stats
from lm_moe.layers.numerics import masked_mean, routing_dtype
from lm_moe.layers.routing import ROUTER_INIT_STD, sum_over_ranks


class ReMoE(FeedForwardLayer):
    """ReLU-routed MoE: x [B, T, D] -> (y [B, T, D], LayerAux with the adaptive L1 penalty).

    target_active: k, the experts a token should use on average; the target sparsity is 1 - k/E.
    l1_init, l1_adapt: the penalty coefficient's start and its factor per optimizer step (the
        paper's 1e-8 and 1.2).
    l1_scope: "model" (the paper's): one coefficient for all the model's ReMoE layers, steered by
        their joint sparsity, so k is the mean over layers; "layer": each layer its own, k in each.
    router_init_std: the router's initial N(0, std), as TopKMoE's.
    expert_dropout: in training, dropout on the experts' hidden activations (see `ExpertWeights`).
    `mask` [B, T] (True = real token): padding uses no expert and outputs 0.
    aux.stats: sparsity (share of zero gates), active_experts (per token), l1_coefficient,
    tokens_per_expert [E] (a count).

    A training loop calls `lm_moe.layers.feed_forward_layer.end_of_step(model)` once per optimizer
    step (the Lightning modules do): it adapts the coefficients to the step's sparsity. A layer's
    own `before_optimizer_step()` adapts it as if it were the model's only ReMoE layer.
    """

    supports_expert_parallelism = True

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        target_active: int = 2,
        activation: str = "gelu",
        l1_init: float = 1e-8,
        l1_adapt: float = 1.2,
        l1_scope: str = "model",
        router_init_std: float = ROUTER_INIT_STD,
        expert_dropout: float = 0.0,
    ):
        super().__init__()
        require_positive_int("num_experts", num_experts)
        require_positive_int("target_active", target_active)
        if target_active >= num_experts:
            raise ValueError(f"target_active must be below num_experts={num_experts} (a target sparsity "
                             f"1 - k/E in (0, 1)), got {target_active}")
        if require_positive_float("l1_adapt", l1_adapt) <= 1:
            raise ValueError(f"l1_adapt must be a number above 1, got {l1_adapt!r}")
        self.l1_adapt = float(l1_adapt)
        require_choice("l1_scope", l1_scope, ("model", "layer"))
        self.l1_scope = l1_scope
        self.num_experts = num_experts
        self.target_active = target_active
        self.target_sparsity = 1 - target_active / num_experts
        self.experts = ExpertWeights(num_experts, dim, hidden_dim, activation, dropout=expert_dropout)
        self.router = nn.Parameter(torch.randn(num_experts, dim) * require_positive_float("router_init_std",
                                                                                          router_init_std))  # [E, D]
        self.register_buffer("l1_coefficient", torch.tensor(require_positive_float("l1_init", l1_init)))
        # The gates on per expert and the tokens [E + 1] of this optimizer step so far, summed over
        # ranks; a plain attribute, not a buffer: DDP would overwrite every rank's counts with rank 0's.
        self._step_counts: torch.Tensor | None = None

    def parameter_macs_per_token(self) -> float:
        """The router (D*E) and, on average, target_active experts (the sparsity the penalty holds:
        in this layer, or with l1_scope="model" on average over the model's ReMoE layers)."""
        return self.router.numel() + self.target_active * self.experts.parameters_per_expert

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        check_layer_input(x, mask, self.experts.dim)
        B, T, D = x.shape
        E = self.num_experts
        tokens = x.reshape(B * T, D)  # [N, D]
        valid = None if mask is None else mask.reshape(B * T)  # [N]
        dtype = routing_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            gates = F.relu(tokens.to(dtype) @ self.router.to(dtype).t())  # [N, E]
        if valid is not None:
            gates = gates * valid.unsqueeze(-1)
        on = gates > 0  # [N, E]
        choice_token, choice_expert = on.nonzero(as_tuple=True)  # [C], [C], token-major
        choice_out, rows_per_expert = run_choices(self.experts, tokens, choice_expert, choice_token,
                                                  shard=self.expert_shard)  # [C, D], [E]
        weight = gates[choice_token, choice_expert].to(choice_out.dtype).unsqueeze(-1)  # [C, 1]
        y = torch.zeros_like(tokens, dtype=choice_out.dtype).index_add_(0, choice_token, weight * choice_out)  # [N, D]

        num_tokens = B * T if valid is None else valid.sum()
        # The gates on per expert and the tokens: in training, summed over the data-parallel ranks,
        # so that the load f (and so the penalty's gradient) is that of the global batch.
        counts = torch.cat([on.sum(0), torch.as_tensor(num_tokens, device=on.device).reshape(1)]).to(dtype)  # [E + 1]
        if self.training:
            sum_over_ranks(counts)
            self._step_counts = counts if self._step_counts is None else self._step_counts + counts
        load = counts[:E] * E / (self.target_active * counts[E].clamp_min(1))  # [E], no gradient: it counts
        penalty = (load * masked_mean(gates, valid)).sum()
        aux = LayerAux(loss=self.l1_coefficient * penalty,
                       stats=deferred_stats(self._stats, on, num_tokens, rows_per_expert))
        return y.view(B, T, D), aux

    def before_optimizer_step(self) -> None:
        """Adapt the penalty's coefficient to this layer's sparsity over the step."""
        adapt_together([self])

    @classmethod
    def before_optimizer_step_of_model(cls, layers: list["ReMoE"]) -> None:
        """The layers with l1_scope="model" adapt together, the others each on its own."""
        for layer in layers:
            if layer.l1_scope == "layer":
                layer.before_optimizer_step()
        shared = [layer for layer in layers if layer.l1_scope == "model"]
        if shared:
            adapt_together(shared)

    def _stats(self, on, num_tokens, rows_per_expert) -> dict[str, torch.Tensor]:
        num_tokens = torch.as_tensor(num_tokens).clamp_min(1)
        active = on.sum() / num_tokens  # padding has no gate on
        return {
            "sparsity": (1 - active / self.num_experts).float(),
            "active_experts": active.float(),
            "l1_coefficient": self.l1_coefficient.detach().float(),
            "tokens_per_expert": rows_per_expert,  # a count: summed over data-parallel ranks
        }


def adapt_together(layers: list[ReMoE]) -> None:
    """Move every layer's coefficient by the same factor, `l1_adapt` up while the layers' joint
    sparsity over the step (all their gates over all their tokens) is below the target, down while
    above. The counts are summed over ranks, so every rank moves the same way."""
    settings = {(layer.target_sparsity, layer.l1_adapt) for layer in layers}
    if len(settings) > 1:
        raise ValueError("ReMoE layers with l1_scope='model' steer one sparsity, so they need the same "
                         f"target 1 - target_active/num_experts and l1_adapt; got (target, l1_adapt) {sorted(settings)}")
    counts = [layer._step_counts for layer in layers if layer._step_counts is not None]  # each [E + 1]
    for layer in layers:
        layer._step_counts = None
    gate_slots = sum(layer_counts[-1] * (len(layer_counts) - 1) for layer_counts in counts)  # tokens x E
    if not counts or gate_slots == 0:
        return
    sparsity = 1 - sum(layer_counts[:-1].sum() for layer_counts in counts) / gate_slots
    target_sparsity, l1_adapt = settings.pop()
    direction = torch.sign(target_sparsity - sparsity).item()  # +1: too dense, penalise more
    for layer in layers:
        layer.l1_coefficient.mul_(l1_adapt ** direction)

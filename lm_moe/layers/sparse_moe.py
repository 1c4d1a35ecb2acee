"""Sparse top-k Mixture of Experts (Switch / ST-MoE / Mixtral style), dropless by default."""

import torch
from torch import nn

from lm_moe.argument_checks import (
    require_choice,
    require_fraction,
    require_non_negative_float,
    require_non_negative_int,
    require_positive_float,
    require_positive_int,
)
from lm_moe.layers.expert_dispatch import run_choices
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.ffn import ExpertWeights
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.layer_output import LayerAux, deferred_stats
from lm_moe.layers.routing import (
    ROUTER_INIT_STD,
    SCORE_FUNCTIONS,
    TopKRouter,
    choice_counts,
    gshard_keep,
    load_balancing_loss,
    position_priority_keep,
    prefix_capacity,
    router_entropy,
    router_z_loss,
    sequence_balancing_loss,
    sum_over_ranks,
)


CAPACITY_PRIORITIES = ("position", "gshard")
CAPACITY_GROUPS = ("sequence", "batch")
BALANCES = ("aux_loss", "loss_free", "none")
BALANCE_SCOPES = ("global_batch", "micro_batch", "sequence")


class TopKMoE(FeedForwardLayer):
    """Each token goes to its `top_k` best experts; the output is the gate-weighted sum.

    x [B, T, D] -> (y [B, T, D], LayerAux). Tokens are sorted by expert and all experts run in
    one grouped matmul, so the cost is that of the k chosen experts per token.

    capacity_factor: None = dropless (every choice is served). Otherwise, within each sequence and
        in position order, an expert serves a choice at position t only while it has served fewer
        than ceil(capacity_factor * top_k * (t + 1) / E) choices: its fair share of the prefix.
        A choice over capacity contributes 0 (the token keeps its residual). Priority by position
        and a capacity that depends on the prefix alone keep the layer causal, per-example
        deterministic and prefix-consistent (decoding reproduces training).
    capacity_priority: "position" (the rule above) or "gshard": GShard / ST-MoE's rule (all first
        choices before any second choice, one capacity ceil(capacity_factor * k * T / E) for the
        sequence). KNOWN TO LEAK the future into which past choices are dropped: it exists as a
        negative control for the leakage suite and for encoders; `is_causal` is False with it.
    capacity_group: "sequence" (each sequence has its own capacity, as above) or "batch": the
        whole batch is one group, its rows in order (row 0 first), as V-MoE routes groups of images.
        Then a row's drops depend on the other rows: `per_example_deterministic` and `is_causal`
        are False (a decoder refuses it). Decoding treats each call's new tokens as one group.
    route_scale: multiplies the combine weights (DeepSeek-V3's routed scaling factor). None (the
        default) = top_k with renormalised weights, 1 without. Renormalised weights sum to 1, so
        without it a top-2 output is the mean of two experts: half the output, and half the
        effect of each Adam step on it, of the dense MLP that the two half-width experts
        replace. Scaled by k, the chosen experts weigh about 1 each, as the k slices of a dense
        MLP do in that MLP: at even weights, k experts holding its k slices compute it exactly.
    router_init_std: the router's initial N(0, std) (see `TopKRouter`).
    score_function: "softmax" (the default) or "sigmoid" (DeepSeek-V3), see `TopKRouter`.
    z_loss_weight: None = 0.001 with softmax scores, 0 with sigmoid ones (the z-loss keeps the
        softmax's normaliser small; DeepSeek-V3's sigmoid router has none).
    shared_hidden_dim: the width of a shared expert every token passes through, added to the
        routed output (DeepSeekMoE, Qwen2-MoE); 0 = none. Several shared experts of one width are
        one shared expert of their summed width.
    shared_gate: scale the shared expert's output by sigmoid(w . x), one gate per token (Qwen2-MoE).
    expert_dropout: in training, dropout on the hidden activations of every expert, the shared one
        included (see `ExpertWeights`), apart from the model's `dropout`.
    balance: how the experts are kept in use.
        "aux_loss": the Switch balancing loss, weighted by load_balance_weight (None = 0.01).
        "loss_free": auxiliary-loss-free balancing (Wang et al. 2024, DeepSeek-V3): a per-expert
            bias, a buffer saved in checkpoints, is added to the scores to pick the top k (never
            to the combine weights), and after each optimizer step moves by
            bias_update_rate * sign(mean load - load of the expert), the loads counted over the
            whole step: every micro-batch and every data-parallel rank, so that the bias stays
            the same on every rank. load_balance_weight (None = 0) may add the balancing loss
            beside it: DeepSeek-V3's small complementary loss, with balance_scope="sequence".
        "none": neither (load_balance_weight must be 0 or None).
    balance_scope: the tokens the balancing loss's expert shares f_e are counted over.
        "global_batch" (the default): every data-parallel rank's tokens, and, under gradient
            accumulation, the micro-batches of the optimizer step so far (the running count: the
            step's last micro-batch sees the whole step's shares; with one micro-batch per step,
            the loss and its gradient are exactly those of the global batch; Qiu et al. 2025).
        "micro_batch": this rank's micro-batch only (Switch).
        "sequence": each sequence on its own, then the mean over sequences (DeepSeek-V3).
        In evaluation the shares are always those of the batch at hand.
    aux.loss = load_balance_weight * balancing loss + z_loss_weight * ST-MoE z-loss.

    A training loop calls `before_optimizer_step()` once per optimizer step (the Lightning
    modules do): it updates the loss-free bias and starts the next step's counts.
    """

    supports_expert_parallelism = True

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = None,
        activation: str = "gelu",
        renormalize: bool = True,
        load_balance_weight: float | None = None,
        z_loss_weight: float | None = None,
        jitter_noise: float = 0.0,
        capacity_priority: str = "position",
        capacity_group: str = "sequence",
        route_scale: float | None = None,
        router_init_std: float = ROUTER_INIT_STD,
        score_function: str = "softmax",
        shared_hidden_dim: int = 0,
        shared_gate: bool = False,
        expert_dropout: float = 0.0,
        balance: str = "aux_loss",
        balance_scope: str = "global_batch",
        bias_update_rate: float = 0.001,
    ):
        super().__init__()
        require_choice("score_function", score_function, SCORE_FUNCTIONS)
        require_choice("balance", balance, BALANCES)
        require_choice("balance_scope", balance_scope, BALANCE_SCOPES)
        if z_loss_weight is None:
            z_loss_weight = 0.001 if score_function == "softmax" else 0.0
        if load_balance_weight is None:
            load_balance_weight = 0.01 if balance == "aux_loss" else 0.0
        if balance == "none" and load_balance_weight:
            raise ValueError(f"balance='none' uses no balancing loss, but load_balance_weight={load_balance_weight!r}: "
                             "set it to 0, or balance='aux_loss' (the loss) or 'loss_free' (the bias, and the loss beside it)")
        require_non_negative_int("shared_hidden_dim", shared_hidden_dim)
        if shared_gate and not shared_hidden_dim:
            raise ValueError("shared_gate=True gates a shared expert: give shared_hidden_dim > 0")
        require_positive_int("num_experts", num_experts)
        require_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k must be at most num_experts={num_experts}, got {top_k}")
        if capacity_factor is not None:
            require_positive_float("capacity_factor", capacity_factor)
        self.load_balance_weight = require_non_negative_float("load_balance_weight", load_balance_weight)
        self.z_loss_weight = require_non_negative_float("z_loss_weight", z_loss_weight)
        jitter_noise = require_fraction("jitter_noise", jitter_noise)
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        require_choice("capacity_priority", capacity_priority, CAPACITY_PRIORITIES)
        self.capacity_priority = capacity_priority
        require_choice("capacity_group", capacity_group, CAPACITY_GROUPS)
        self.capacity_group = capacity_group
        self.experts = ExpertWeights(num_experts, dim, hidden_dim, activation, dropout=expert_dropout)
        if route_scale is None:
            route_scale = top_k if renormalize else 1.0
        self.router = TopKRouter(dim, num_experts, top_k, renormalize, jitter_noise,
                                 require_positive_float("route_scale", route_scale),
                                 require_positive_float("router_init_std", router_init_std), score_function)
        # Built after the router: a seed draws the same experts and router with or without them.
        self.shared = (ExpertWeights(1, dim, shared_hidden_dim, activation, dropout=expert_dropout)
                       if shared_hidden_dim else None)
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None
        self.balance = balance
        self.balance_scope = balance_scope
        self.bias_update_rate = require_positive_float("bias_update_rate", bias_update_rate)
        if balance == "loss_free":
            self.register_buffer("expert_bias", torch.zeros(num_experts))  # [E], saved in checkpoints
        else:
            self.expert_bias = None
        # The routing choices of this optimizer step so far, summed over ranks: [E] or None. A plain
        # attribute, not a buffer: DDP would overwrite every rank's counts with rank 0's.
        self._step_counts: torch.Tensor | None = None

    @property
    def is_causal(self) -> bool:
        if self.capacity_factor is None:
            return True
        return self.capacity_priority == "position" and self.capacity_group == "sequence"

    @property
    def per_example_deterministic(self) -> bool:
        """False where the batch shares one capacity: a row's drops depend on the rows before it."""
        return self.capacity_factor is None or self.capacity_group == "sequence"

    @torch.no_grad()
    def upcycle_from_dense(self, dense, noise: float = 0.0) -> None:
        """The experts copy the dense MLP; with renormalised weights, whose k weights sum to
        `route_scale`, the routed experts' output matrices are divided by it: the layer then starts
        out computing exactly the dense MLP (plus any shared expert, also a copy)."""
        super().upcycle_from_dense(dense, noise)
        if self.router.renormalize:
            self.experts.w_out.div_(self.router.route_scale)

    def parameter_macs_per_token(self) -> float:
        """The router (D*E), the top_k chosen experts, and the shared expert and its gate."""
        shared = 0 if self.shared is None else self.shared.parameters_per_expert
        gate = 0 if self.shared_gate is None else self.shared_gate.weight.numel()
        return self.router.weight.numel() + self.top_k * self.experts.parameters_per_expert + shared + gate

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        """`mask` [B, T] (True = real token): padding is routed nowhere and outputs 0."""
        check_layer_input(x, mask, self.experts.dim)
        y, aux, _ = self._route_and_run(x, mask)
        return y, aux

    def decode(self, x: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        """Incremental decoding: x [B, t, D] are the next t tokens. Dropless routing is per token
        (state None); with a capacity, state = (position, served [B, E]), the choices each expert
        has served so far in each sequence. Decoding reports no loss: the balancing loss and the
        z-loss are not computed."""
        check_layer_input(x, None, self.experts.dim)
        if self.capacity_factor is None or self.capacity_group == "batch":
            return self._route_and_run(x, None, with_aux=False)[0], None
        position, served = state if state is not None else (0, None)
        y, _, served = self._route_and_run(x, None, position, served, with_aux=False)
        return y, (position + x.shape[1], served)

    def _route_and_run(
        self, x: torch.Tensor, mask: torch.Tensor | None, start: int = 0, served_before: torch.Tensor | None = None,
        with_aux: bool = True,
    ) -> tuple[torch.Tensor, LayerAux | None, torch.Tensor | None]:
        """The layer on positions start .. start+T-1 of each sequence; returns (y, aux, served_after),
        aux None without `with_aux`."""
        B, T, D = x.shape
        k, E = self.top_k, self.num_experts
        tokens = x.reshape(B * T, D)  # [N, D]
        valid = None if mask is None else mask.reshape(B * T)  # [N]
        routing = self.router(tokens, self.expert_bias)

        served, served_after = self._served_choices(routing.expert_index.reshape(B, T, k), mask, start, served_before)
        # Choices not served get the sentinel E: they output 0.
        choice_expert = routing.expert_index.reshape(-1)  # [N*k]
        if served is not None:
            choice_expert = choice_expert.masked_fill(~served.reshape(-1), E)
        choice_token = torch.arange(B * T * k, device=x.device) // k  # [N*k]
        choice_out, rows_per_expert = run_choices(self.experts, tokens, choice_expert, choice_token,
                                                  some_unserved=served is not None,
                                                  shard=self.expert_shard)  # [N*k, D], [E]
        choice_out = choice_out.view(B * T, k, D)  # [N, k, D]
        # Each token's gate-weighted sum over its k choices.
        # Contiguous: CPU bmm over thousands of tiny matrices falls back to a loop on strided ones.
        gate = routing.weight.to(choice_out.dtype).contiguous().view(B * T, 1, k)  # [N, 1, k]
        y = torch.bmm(gate, choice_out).view(B * T, D)  # [N, D]
        if self.shared is not None:
            y = y + self._shared_output(tokens, valid)
        if not with_aux:
            return y.view(B, T, D), None, served_after

        balance = self._balancing_loss(routing, valid, B)
        z_loss = router_z_loss(routing, valid)
        aux = LayerAux(
            loss=self.load_balance_weight * balance + self.z_loss_weight * z_loss,
            stats=deferred_stats(self._stats, routing, rows_per_expert, valid, balance, z_loss),
        )
        return y.view(B, T, D), aux, served_after

    def _balancing_loss(self, routing, valid: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The balancing loss over `balance_scope`; in training, also counts the step's choices
        where the scope or the loss-free bias needs them."""
        share = None
        if self.training and (self.balance == "loss_free" or self.balance_scope == "global_batch"):
            counts = sum_over_ranks(choice_counts(routing.expert_index, valid, self.num_experts,
                                                  routing.probs.dtype).detach())  # [E], every rank's choices
            self._step_counts = counts if self._step_counts is None else self._step_counts + counts
            if self.balance_scope == "global_batch":
                share = self._step_counts / self._step_counts.sum().clamp_min(1)  # [E]
        if self.balance_scope == "sequence":
            return sequence_balancing_loss(routing, valid, batch)
        return load_balancing_loss(routing, valid, share)

    def before_optimizer_step(self) -> None:
        """The loss-free bias update from the step's counts (the same on every rank: the counts
        are summed over ranks); then the next step counts from zero."""
        counts, self._step_counts = self._step_counts, None
        if self.expert_bias is not None and counts is not None:
            with torch.no_grad():
                self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts).to(self.expert_bias.dtype)

    def _shared_output(self, tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """The shared expert on every token [N, D] -> [N, D], gated per token if asked, 0 on padding."""
        out = self.shared.forward_batched(tokens.unsqueeze(0)).squeeze(0)  # [N, D]
        if self.shared_gate is not None:
            out = out * torch.sigmoid(self.shared_gate(tokens.to(out.dtype)))  # [N, D] * [N, 1]
        return out if valid is None else out * valid.unsqueeze(-1)

    def _served_choices(self, expert_index, mask, start, served_before) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """([B, T, k] bool of the choices an expert serves, or None when all are: dropless without
        padding; and the choices each expert has served after these positions [B, E], or None)."""
        if self.capacity_factor is None and mask is None:
            return None, None
        routed = torch.ones_like(expert_index, dtype=torch.bool)  # [B, T, k]
        if mask is not None:
            routed = routed & mask.unsqueeze(-1)
        if self.capacity_factor is None:
            return routed, None
        if self.capacity_group == "batch":  # one long sequence of the rows in order
            B, T, k = expert_index.shape
            keep, _ = self._capacity_keep(expert_index.reshape(1, B * T, k), routed.reshape(1, B * T, k), 0, None)
            return keep.view(B, T, k), None
        return self._capacity_keep(expert_index, routed, start, served_before)

    def _capacity_keep(self, expert_index, routed, start, served_before) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The capacity rule within each row of expert_index [B, T, k] -> (keep [B, T, k], served_after)."""
        if self.capacity_priority == "gshard":
            return gshard_keep(expert_index, routed, self.capacity_factor, self.num_experts), None
        T = expert_index.shape[1]
        capacity = prefix_capacity(self.capacity_factor, self.top_k, self.num_experts, T, start)  # [T]
        return position_priority_keep(expert_index, routed, capacity, self.num_experts, served_before)

    def _stats(self, routing, rows_per_expert, valid, balance, z_loss) -> dict[str, torch.Tensor]:
        num_choices = routing.expert_index.numel() if valid is None else valid.sum() * self.top_k
        served_share = rows_per_expert.sum() / torch.as_tensor(num_choices).clamp_min(1)
        # Run under no_grad (DeferredStats): only the two losses, computed with gradients, need detaching.
        return {
            "tokens_per_expert": rows_per_expert,  # a count: summed over data-parallel ranks
            "dropped_fraction": (1 - served_share).float(),
            "router_entropy": router_entropy(routing, valid),
            "load_balance_loss": balance.detach(),
            "router_z_loss": z_loss.detach(),
            **({} if self.expert_bias is None else {
                "expert_bias": self.expert_bias.detach().float(),
                "expert_bias_range": (self.expert_bias.max() - self.expert_bias.min()).detach().float(),
            }),
        }

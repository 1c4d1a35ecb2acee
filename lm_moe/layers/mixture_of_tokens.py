"""Mixture of Tokens (Antoniak et al., "Mixture of Tokens", 2023): Soft MoE across the batch.

Notation: B batch, T tokens, D width, E experts, P slots per expert, S = E*P slots, H expert
hidden width, G group size, n = B/G groups.

Rows are grouped in consecutive groups of G sequences (rows 0..G-1, G..2G-1, ...). At every
position t the G tokens at t of a group are the "sequence" that Soft MoE mixes:

    L[g, t, s]   = <normalize(x[g, t]), scale * normalize(phi[:, s])>    router logits, g in the group
    dispatch     = softmax of L over the G tokens of the group (per slot)
    combine      = softmax of L over slots s (per token)
    slot_in[t]   = sum_g dispatch[g, t, s] x[g, t]                        [n, S, T, D]
    slot_out[t]  = expert_{s // P}(slot_in[t][s])
    y[g, t]      = sum_s combine[g, t, s] slot_out[t][s]

The logits are those of SoftMoE (L2-normalised, one learned scale, fp32 or wider). Position t only
mixes tokens at position t, so every sequence is causal; but a row's output depends on its
batch-mates at the same position: the layer is NOT per-example deterministic. Hence the data
loader must never put overlapping windows of one text in a group: a batch-mate whose position t
holds this row's token t+1 would leak the future through the batch (lm_moe.data.text packs
non-overlapping blocks).

Cost: S expert calls per group and position, S/G expert calls per token: the FLOPs of a dense
FFN of width S*H/G (4*D*S*H/G with GELU), plus O(D*S) per token for the logits, dispatch and
combine. Parameters: E*(2*D*H) experts + D*S slot embeddings + 1 scale.

Padding (`mask` [B, T], True = real token, padding at the end of rows): padded tokens take no part
in dispatch and output 0; a position where the whole group is padded gives empty slots.

Decoding: no temporal state, so the default `decode` (every step is this same layer on the new
positions); the G sequences of a group decode in lock-step (the batch a multiple of G:
`batch_multiple`).
"""

import torch
from torch import nn

from lm_moe.argument_checks import require_positive_int
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.ffn import ExpertWeights, compute_dtype
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.layer_output import LayerAux, deferred_stats
from lm_moe.layers.routing import entropy, masked_mean
from lm_moe.layers.soft_moe import combine_stats, soft_routing_logits


class MixtureOfTokens(FeedForwardLayer):
    """Mixture of Tokens layer: x [B, T, D] -> (y [B, T, D], LayerAux with zero loss), B a
    multiple of `group_size`.

    aux.stats: dispatch_entropy (per slot, over the group; ln G = uniform), combine_entropy (per
    token, over slots; ln S = uniform), slot_usage [S] (mean combine weight of each slot) and
    slot_usage_spread (its coefficient of variation: 0 = every slot used equally).
    """

    is_causal = True  # position t mixes only tokens at position t
    no_weight_decay = ("slot_embeddings",)  # normalised before use (see adamw_param_groups)
    per_example_deterministic = False  # ... of the other rows of its group

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        slots_per_expert: int = 1,
        group_size: int = 4,
        activation: str = "gelu",
    ):
        super().__init__()
        self.num_experts = require_positive_int("num_experts", num_experts)
        self.slots_per_expert = require_positive_int("slots_per_expert", slots_per_expert)
        self.group_size = require_positive_int("group_size", group_size)
        self.num_slots = num_experts * slots_per_expert
        self.experts = ExpertWeights(num_experts, dim, hidden_dim, activation)
        self.slot_embeddings = nn.Parameter(torch.randn(dim, self.num_slots) * dim**-0.5)  # phi [D, S]
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        check_layer_input(x, mask, self.experts.dim)
        B, T, D = x.shape
        G, E, P, S = self.group_size, self.num_experts, self.slots_per_expert, self.num_slots
        n = self._num_groups(B)
        grouped = x.reshape(n, G, T, D)  # [n, G, T, D]
        logits = soft_routing_logits(grouped, self.slot_embeddings, self.scale)  # [n, G, T, S]
        combine = logits.softmax(dim=3)  # [n, G, T, S]
        if mask is None:
            valid = None
            dispatch = logits.softmax(dim=1)  # [n, G, T, S]
        else:
            valid = mask.reshape(n, G, T, 1)  # [n, G, T, 1]
            # A large finite negative (not -inf) keeps fully padded group positions free of NaN.
            dispatch_logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
            dispatch = dispatch_logits.softmax(dim=1) * valid  # [n, G, T, S]
            combine = combine * valid

        dtype = compute_dtype(x)
        slot_in = torch.einsum("ngts,ngtd->sntd", dispatch.to(dtype), grouped.to(dtype))  # [S, n, T, D]
        # Slot s = e*P + p, so the slots of expert e are P consecutive [n, T, D] blocks.
        expert_out = self.experts.forward_batched(slot_in.reshape(E, P * n * T, D))  # [E, P*n*T, D]
        slot_out = expert_out.view(S, n, T, D)  # [S, n, T, D]
        y = torch.einsum("ngts,sntd->ngtd", combine.to(slot_out.dtype), slot_out)  # [n, G, T, D]
        aux = LayerAux.empty(x)
        aux.stats = deferred_stats(self._stats, logits, dispatch, combine, valid)
        return y.reshape(B, T, D), aux

    @property
    def batch_multiple(self) -> int:
        """Whole groups: the rows of a group are mixed together, and decode in lock-step."""
        return self.group_size

    def parameter_macs_per_token(self) -> float:
        """The slot logits (D*S) and S expert calls per group of G tokens: S / G experts' parameters."""
        return self.slot_embeddings.numel() + self.num_slots / self.group_size * self.experts.parameters_per_expert

    def _num_groups(self, batch_size: int) -> int:
        if batch_size % self.group_size != 0:
            raise ValueError(
                f"the batch size B={batch_size} must be a multiple of group_size={self.group_size}: "
                "Mixture of Tokens mixes groups of group_size sequences"
            )
        return batch_size // self.group_size

    def _stats(
        self, logits: torch.Tensor, dispatch: torch.Tensor, combine: torch.Tensor, valid: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        # Per (group, position): the dispatch entropy counts where the group has a real token.
        group_positions = None if valid is None else valid.any(dim=1).reshape(-1)  # [n*T]
        dispatch_entropy = entropy(dispatch, dim=1).mean(dim=-1).reshape(-1)  # [n*T], mean over slots
        tokens = None if valid is None else valid.reshape(-1)  # [B*T]
        return {
            "dispatch_entropy": masked_mean(dispatch_entropy, group_positions).float(),
            **combine_stats(logits, combine, tokens),
        }

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

The logits, dispatch and combine are the Soft MoE family's (`slot_routing`). Position t only
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

from lm_moe.argument_checks import require_positive_int
from lm_moe.layers.ffn import ExpertWeights
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.layer_output import LayerAux, deferred_stats
from lm_moe.layers.numerics import compute_dtype, entropy, masked_mean
from lm_moe.layers.slot_routing import SlotRoutedLayer, combine_stats, combine_weights, softmax_dispatch


class MixtureOfTokens(SlotRoutedLayer):
    """Mixture of Tokens layer: x [B, T, D] -> (y [B, T, D], LayerAux with zero loss), B a
    multiple of `group_size`.

    aux.stats: dispatch_entropy (per slot, over the group; ln G = uniform) and the
    `combine_stats` (combine_entropy: ln S = uniform).
    """

    is_causal = True  # position t mixes only tokens at position t
    per_example_deterministic = False  # ... of the other rows of its group

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        slots_per_expert: int = 1,
        group_size: int = 4,
        activation: str = "gelu",
        logit_scale_init: float | None = None,
        expert_dropout: float = 0.0,
    ):
        group_size = require_positive_int("group_size", group_size)
        super().__init__(ExpertWeights(num_experts, dim, hidden_dim, activation, dropout=expert_dropout), slots_per_expert, logit_scale_init)
        self.group_size = group_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        check_layer_input(x, mask, self.experts.dim)
        B, T, D = x.shape
        G = self.group_size
        n = self._num_groups(B)
        grouped = x.reshape(n, G, T, D)  # [n, G, T, D]
        valid = None if mask is None else mask.reshape(n, G, T)  # [n, G, T]
        logits = self.router_logits(grouped)  # [n, G, T, S]
        _, dispatch = softmax_dispatch(logits, valid, dim=1)  # [n, G, T, S], over the group
        combine = combine_weights(logits, valid)  # [n, G, T, S]

        dtype = compute_dtype(x)
        slot_in = torch.einsum("ngts,ngtd->sntd", dispatch.to(dtype), grouped.to(dtype))  # [S, n, T, D]
        slot_out = self.run_experts(slot_in)  # [S, n, T, D]
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

"""Soft Mixture of Experts (Puigcerver et al., "From Sparse to Soft Mixtures of Experts", 2023).

Notation: B batch, T tokens, D width, E experts, P slots per expert, S = E*P slots.

    L[b, t, s]   = <normalize(x[b, t]), scale * normalize(phi[:, s])>    router logits
    dispatch     = softmax of L over tokens t  (each slot is a convex mix of the tokens)
    combine      = softmax of L over slots s   (each token is a convex mix of the slot outputs)
    slot_in      = dispatch^T x                                          [B, S, D]
    slot_out     = expert_{s // P}(slot_in[:, s])                        [B, S, D]
    y            = combine slot_out                                      [B, T, D]

The logits and both softmaxes are the family's slot routing (`slot_routing`). No token is
dropped, no balancing loss is needed, and the cost is that of S expert calls per sequence.

Every slot pools the whole sequence, so this layer sees the future: it is for encoders (ViT).
"""

import torch

from lm_moe.layers.ffn import ExpertWeights
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.layer_output import LayerAux, deferred_stats
from lm_moe.layers.numerics import compute_dtype, masked_mean, softmax_entropy
from lm_moe.layers.slot_routing import SlotRoutedLayer, combine_stats, combine_weights, softmax_dispatch


class SoftMoE(SlotRoutedLayer):
    """Soft MoE layer: x [B, T, D] -> (y [B, T, D], LayerAux with zero loss).

    `mask` [B, T] (True = real token) keeps padding out of every slot; padded positions output 0.
    aux.stats: dispatch_entropy (per slot, over tokens) and the `combine_stats`.
    """

    is_causal = False  # every slot pools the whole sequence

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        slots_per_expert: int = 1,
        activation: str = "gelu",
        logit_scale_init: float | None = None,
        expert_dropout: float = 0.0,
    ):
        super().__init__(ExpertWeights(num_experts, dim, hidden_dim, activation, dropout=expert_dropout), slots_per_expert, logit_scale_init)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        check_layer_input(x, mask, self.experts.dim)
        logits = self.router_logits(x)  # [B, T, S]
        dispatch_logits, dispatch = softmax_dispatch(logits, mask, dim=1)  # [B, T, S], over the sequence
        combine = combine_weights(logits, mask)  # [B, T, S]

        dtype = compute_dtype(x)
        slot_in = torch.bmm(dispatch.to(dtype).transpose(1, 2), x.to(dtype))  # [B, S, D]
        slot_out = self.run_experts(slot_in.transpose(0, 1)).transpose(0, 1)  # [B, S, D]
        y = torch.bmm(combine.to(slot_out.dtype), slot_out)  # [B, T, D]
        aux = LayerAux.empty(x)
        aux.stats = deferred_stats(self._stats, logits, dispatch_logits, dispatch, combine, mask)
        return y, aux

    @staticmethod
    def _stats(
        logits: torch.Tensor,
        dispatch_logits: torch.Tensor,
        dispatch: torch.Tensor,
        combine: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Routing health from the logits [B, T, S] (and those with padding masked out) and
        their two softmaxes."""
        valid = None if mask is None else mask.reshape(-1)  # [B*T]
        rows = None if mask is None else mask.any(dim=1)  # [B]: a fully padded row has no dispatch to measure
        dispatch_entropy = softmax_entropy(dispatch, dispatch_logits, dim=1).mean(dim=-1)  # [B], mean over slots
        return {
            "dispatch_entropy": masked_mean(dispatch_entropy, rows).float(),
            **combine_stats(logits, combine, valid),
        }

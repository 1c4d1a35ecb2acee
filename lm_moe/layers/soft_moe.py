"""Soft Mixture of Experts (Puigcerver et al., "From Sparse to Soft Mixtures of Experts", 2023).

Notation: B batch, T tokens, D width, E experts, P slots per expert, S = E*P slots.

    L[b, t, s]   = <normalize(x[b, t]), scale * normalize(phi[:, s])>    router logits
    dispatch     = softmax of L over tokens t  (each slot is a convex mix of the tokens)
    combine      = softmax of L over slots s   (each token is a convex mix of the slot outputs)
    slot_in      = dispatch^T x                                          [B, S, D]
    slot_out     = expert_{s // P}(slot_in[:, s])                        [B, S, D]
    y            = combine slot_out                                      [B, T, D]

Inputs and slot parameters are L2-normalised for the logits, with one learned scale (init 1),
as in the official implementation; the un-normalised inputs are dispatched. No token is dropped,
no balancing loss is needed, and the cost is that of S expert calls per sequence.

Every slot pools the whole sequence, so this layer sees the future: it is for encoders (ViT).
"""

import torch
import torch.nn.functional as F
from torch import nn

from lm_moe.argument_checks import require_positive_int
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.ffn import ExpertWeights, compute_dtype
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.layer_output import LayerAux, deferred_stats
from lm_moe.layers.routing import masked_mean, routing_dtype, softmax_entropy

_NORM_EPS = 1e-6


def soft_routing_logits(x: torch.Tensor, slot_embeddings: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, T, D], slot_embeddings [D, S], scale [] -> logits [B, T, S], in fp32 or wider.

    Both sides are unit vectors, so |logit| <= |scale|: the causal variants rely on this bound.
    """
    dtype = routing_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(dtype)
        slots_unit = F.normalize(slot_embeddings.to(dtype), dim=0, eps=_NORM_EPS)  # [D, S]
        # Dividing the [B, T, S] product by |x| is F.normalize(x) without its [B, T, D] pass.
        inverse_norm = x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS).reciprocal()  # [B, T, 1]
        return (x @ (scale.to(dtype) * slots_unit)) * inverse_norm  # [B, T, S]


def combine_stats(logits: torch.Tensor, combine: torch.Tensor, valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The per-token routing stats every Soft MoE layer logs, from the logits and the combine
    weights [..., S] (zero on padding); `valid` [N] marks the real tokens of the flattened [..., S].

    combine_entropy (per token, over slots), slot_usage [S] (mean combine weight of each slot) and
    slot_usage_spread (its coefficient of variation: 0 = every slot used equally).
    """
    slot_usage = masked_mean(combine.reshape(-1, combine.shape[-1]), valid)  # [S], sums to 1
    combine_entropy = softmax_entropy(combine, logits, dim=-1).reshape(-1)  # [N]
    return {
        "combine_entropy": masked_mean(combine_entropy, valid).float(),
        "slot_usage": slot_usage.float(),
        "slot_usage_spread": (slot_usage.std(correction=0) / slot_usage.mean()).float(),
    }


class SoftMoE(FeedForwardLayer):
    """Soft MoE layer: x [B, T, D] -> (y [B, T, D], LayerAux with zero loss).

    `mask` [B, T] (True = real token) keeps padding out of every slot; padded positions output 0.
    aux.stats: dispatch_entropy (per slot, over tokens) and the `combine_stats`.
    """

    is_causal = False  # every slot pools the whole sequence
    no_weight_decay = ("slot_embeddings",)  # normalised before use (see adamw_param_groups)

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        slots_per_expert: int = 1,
        activation: str = "gelu",
    ):
        super().__init__()
        self.num_experts = require_positive_int("num_experts", num_experts)
        self.slots_per_expert = require_positive_int("slots_per_expert", slots_per_expert)
        self.num_slots = num_experts * slots_per_expert
        self.experts = ExpertWeights(num_experts, dim, hidden_dim, activation)
        self.slot_embeddings = nn.Parameter(torch.randn(dim, self.num_slots) * dim**-0.5)  # phi [D, S]
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        check_layer_input(x, mask, self.experts.dim)
        B, T, D = x.shape
        E, P = self.num_experts, self.slots_per_expert
        logits = soft_routing_logits(x, self.slot_embeddings, self.scale)  # [B, T, S]
        dispatch_logits = logits
        if mask is not None:
            # A large finite negative (not -inf) keeps fully padded rows free of NaN.
            dispatch_logits = logits.masked_fill(~mask.unsqueeze(-1), torch.finfo(logits.dtype).min)
            dispatch = dispatch_logits.softmax(dim=1) * mask.unsqueeze(-1)  # [B, T, S]
        else:
            dispatch = logits.softmax(dim=1)  # [B, T, S]
        combine = logits.softmax(dim=2)  # [B, T, S]

        dtype = compute_dtype(x)
        slot_in = torch.bmm(dispatch.to(dtype).transpose(1, 2), x.to(dtype))  # [B, S, D]
        expert_in = slot_in.view(B, E, P, D).transpose(0, 1).reshape(E, B * P, D)  # [E, B*P, D]
        expert_out = self.experts.forward_batched(expert_in)  # [E, B*P, D]
        slot_out = expert_out.view(E, B, P, D).transpose(0, 1).reshape(B, E * P, D)  # [B, S, D]
        if mask is not None:
            combine = combine * mask.unsqueeze(-1)
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

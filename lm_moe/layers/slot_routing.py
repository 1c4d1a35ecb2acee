"""Slot routing, shared by the Soft MoE family (SoftMoE, CumulativeSoftMoE, LaggedChunkSoftMoE,
MixtureOfTokens): the slot parameters, the router logits, the dispatch and combine weights, and
the slot statistics. A layer of the family adds its pooling rule: which tokens each slot pools.

Notation: D width, E experts, P slots per expert, S = E*P slots; slot s belongs to expert s // P.

    L[..., s]  = <normalize(x[...]), scale * normalize(phi[:, s])>    router logits, |L| <= |scale|
    combine    = softmax of L over the slots s                         each token a mix of the slot outputs
    dispatch   = softmax of L over a set of tokens                     each slot a mix of the set's tokens
                 (Soft MoE: the sequence; Mixture of Tokens: the group at one position)
              or w = exp(L - |scale|), in (0, 1]                       summed over the pools of the causal variants

Inputs and slot parameters are L2-normalised for the logits, with one learned scale, as in the
official Soft MoE implementation (which starts it at 1; here it starts at min(sqrt(D), 16), see
`SlotRoutedLayer`); the un-normalised inputs are dispatched. The logits are
fp32 or wider, also under autocast.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lm_moe.argument_checks import require_positive_float, require_positive_int
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.expert_parallel import run_sharded_batched
from lm_moe.layers.ffn import ExpertWeights
from lm_moe.layers.numerics import coefficient_of_variation, masked_mean, routing_dtype, softmax_entropy

_NORM_EPS = 1e-6
MAX_DEFAULT_LOGIT_SCALE = 16.0  # see SlotRoutedLayer: the fixed-shift exponentials stay well inside fp32


def slot_logits(x: torch.Tensor, slot_embeddings: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., D], slot_embeddings [D, S], scale [] -> logits [..., S], in fp32 or wider.

    Both sides are unit vectors, so |logit| <= |scale|: the causal variants rely on this bound.
    """
    dtype = routing_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(dtype)
        slots_unit = F.normalize(slot_embeddings.to(dtype), dim=0, eps=_NORM_EPS)  # [D, S]
        # Dividing the [..., S] product by |x| is F.normalize(x) without its [..., D] pass.
        inverse_norm = x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS).reciprocal()  # [..., 1]
        return (x @ (scale.to(dtype) * slots_unit)) * inverse_norm  # [..., S]


def softmax_dispatch(logits: torch.Tensor, mask: torch.Tensor | None, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch weights as a softmax over the tokens along `dim`, padding left out.

    Args:
        logits: [..., S], the token dims in front.
        mask: [...] bool, True = real token, or None.
        dim: the token dim the softmax runs over (each slot a convex mix of the tokens along it).
    Returns:
        the logits with padding filled with finfo.min ([..., S]; `softmax_entropy` takes them),
        and the dispatch weights [..., S], 0 on padding.
    """
    if mask is None:
        return logits, logits.softmax(dim=dim)
    valid = mask.unsqueeze(-1)  # [..., 1]
    # A large finite negative (not -inf) keeps token sets that are all padding free of NaN.
    dispatch_logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    return dispatch_logits, dispatch_logits.softmax(dim=dim) * valid


def combine_weights(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """logits [..., S], mask [...] bool | None -> the softmax over the slots [..., S], 0 on padding."""
    combine = logits.softmax(dim=-1)
    return combine if mask is None else combine * mask.unsqueeze(-1)


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
        "slot_usage_spread": coefficient_of_variation(slot_usage).float(),
    }


class SlotRoutedLayer(FeedForwardLayer):
    """A layer of the Soft MoE family: E experts, P slots each, and the slot router's parameters,
    phi [D, S] (`slot_embeddings`, N(0, 1/D) columns, of norm about 1) and `scale`.

    Every layer of the family also takes `expert_dropout`: dropout on its experts' hidden
    activations in training (see `ExpertWeights`).

    logit_scale_init: the scale's initial value; None = min(sqrt(D), 16). The cosine of two
    random D-vectors has a spread of 1/sqrt(D), so a scale of 1 starts the logits at a spread of
    1/sqrt(D) (0.06 at D = 256): every combine and dispatch softmax almost uniform, every slot
    nearly the same mean of its tokens, and the learned scale grows too slowly (a few 1e-3 per
    Adam step) to leave that state within a short run. sqrt(D) starts the logits at a spread of
    about 1, that of the un-normalised product x . phi on a normalised input; on the LM
    variants that pool tokens into slots this takes 0.1-0.2 nats off at 300 steps
    (docs/moe_baseline.md). The cap: the causal variants sum exp(L - |scale|) in fp32, down to
    exp(-2 |scale|), which underflows past |scale| of about 40 (a run at 64 turned NaN).
    """

    supports_expert_parallelism = True

    no_weight_decay = ("slot_embeddings",)  # normalised before use (see adamw_param_groups)

    def __init__(self, experts: ExpertWeights, slots_per_expert: int, logit_scale_init: float | None = None):
        super().__init__()
        self.num_experts = experts.num_experts
        self.slots_per_expert = require_positive_int("slots_per_expert", slots_per_expert)
        self.num_slots = self.num_experts * slots_per_expert
        self.experts = experts
        dim = experts.dim
        self.slot_embeddings = nn.Parameter(torch.randn(dim, self.num_slots) * dim**-0.5)  # phi [D, S]
        if logit_scale_init is None:
            logit_scale_init = min(dim**0.5, MAX_DEFAULT_LOGIT_SCALE)
        self.scale = nn.Parameter(torch.tensor(require_positive_float("logit_scale_init", logit_scale_init)))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> L [..., S] (see `slot_logits`)."""
        return slot_logits(x, self.slot_embeddings, self.scale)

    def logit_shift(self) -> torch.Tensor:
        """|scale| as it is now, detached: the bound of the logits, which `shifted_weights`
        subtracts. Stats computed later take it from here: an optimizer step may move the scale
        before they are read."""
        return self.scale.detach().abs()

    def shifted_weights(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """w = exp(L - |scale|) [..., S] in (0, 1], 0 on padding (mask [...] False): the dispatch
        weights the causal variants sum over their pools. The fixed shift replaces a running max,
        so w never overflows; it cancels in each pool's sum(w x) / sum(w), so it carries no
        gradient."""
        weights = torch.exp(logits - self.logit_shift().to(logits.dtype))  # [..., S]
        return weights if mask is None else weights * mask.unsqueeze(-1)

    def run_experts(self, slot_in: torch.Tensor) -> torch.Tensor:
        """Slot-major inputs [S, ..., D] -> the slots' expert outputs [S, ..., D], slot s through
        expert s // P: the P slots of an expert are consecutive, so all experts run in one batched
        matmul (under expert parallelism, on the ranks that hold them)."""
        D = slot_in.shape[-1]
        expert_in = slot_in.reshape(self.num_experts, -1, D)  # [E, P*N, D]
        if self.expert_shard is None:
            expert_out = self.experts.forward_batched(expert_in)  # [E, P*N, D]
        else:
            expert_out = run_sharded_batched(self.experts, self.expert_shard, expert_in)  # [E, P*N, D]
        return expert_out.view(slot_in.shape)  # [S, ..., D]

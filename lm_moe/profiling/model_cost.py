"""Parameter counts of a GPT: total, and active per token.

"Active parameters" is well defined for a dense FFN (all of them) and for top-k (the router and
the k chosen experts), but not for the Soft MoE variants: there every token's output mixes the
outputs of all experts, while its cost is a fraction of them. So the count used here is the one
that means "cost" for every layer alike:

    active = parameters outside the FFNs + the FFNs' multiply-adds with parameters per token

(a dense weight matrix used once per token costs one multiply-add per parameter, so this is the
plain parameter count for dense layers and the touched parameters for top-k). Per token, with
p_e = the parameters of one expert, S slots, C chunk/segment length, G group size:

    DenseFFN             all its parameters
    TopKMoE              router D*E + top_k * p_e
    CumulativeSoftMoE    slot logits D*S + S * p_e            (every position runs all S slots)
    LaggedChunkSoftMoE   slot logits D*S + shared expert + (S / C) * p_e   (S expert calls per chunk)
    MixtureOfTokens      slot logits D*S + (S / G) * p_e      (S expert calls per group of G tokens)
    SegmentMergedMoE     router D*E / C + p_e + merge E * p_e / C   (one merged FFN, re-merged per segment)

Dispatch and combine (weighted sums of activations, no parameters) are left out: under 2% of an
FFN's cost at the configs' sizes.
"""

from torch import nn

from lm_moe.layers import (
    CumulativeSoftMoE,
    DenseFFN,
    ExpertWeights,
    LaggedChunkSoftMoE,
    MixtureOfTokens,
    SegmentMergedMoE,
    TopKMoE,
)
from lm_moe.models.gpt import GPT


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _per_expert(experts: ExpertWeights) -> int:
    return _count(experts) // experts.num_experts


def ffn_macs_per_token(ffn: nn.Module) -> float:
    """Multiply-adds with parameters per token of one FFN layer (see the module docstring)."""
    if isinstance(ffn, DenseFFN):
        return _count(ffn)
    if isinstance(ffn, TopKMoE):
        return _count(ffn.router) + ffn.top_k * _per_expert(ffn.experts)
    if isinstance(ffn, CumulativeSoftMoE):
        return ffn.slot_embeddings.numel() + ffn.num_slots * _per_expert(ffn.experts)
    if isinstance(ffn, LaggedChunkSoftMoE):
        experts = ffn.num_slots / ffn.chunk_size * _per_expert(ffn.experts)
        return ffn.slot_embeddings.numel() + _count(ffn.shared) + experts
    if isinstance(ffn, MixtureOfTokens):
        return ffn.slot_embeddings.numel() + ffn.num_slots / ffn.group_size * _per_expert(ffn.experts)
    if isinstance(ffn, SegmentMergedMoE):
        merge = _count(ffn.experts) / ffn.segment_size
        return ffn.router_weight.numel() / ffn.segment_size + _per_expert(ffn.experts) + merge
    raise ValueError(f"no cost rule for the FFN layer {type(ffn).__name__}")


def parameter_counts(model: GPT) -> dict[str, float]:
    """total: every parameter (the tied embedding once); ffn_macs_per_token: summed over blocks;
    active: parameters outside the FFNs + ffn_macs_per_token."""
    ffns = [block.ffn for block in model.blocks]
    total = model.num_parameters()
    macs = sum(ffn_macs_per_token(ffn) for ffn in ffns)
    return {"params_total": total, "params_active": total - sum(_count(ffn) for ffn in ffns) + macs,
            "ffn_macs_per_token": macs}

"""Plain loop references for Mixture of Tokens and the segment-merged MoE.

Loops over groups, positions, segments, slots and experts, written for clarity, not speed.
"""

import torch
import torch.nn.functional as F

from .reference import expert_mlp


def mixture_of_tokens(layer, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft MoE over the G tokens at each position of each group of G consecutive rows."""
    B, T, D = x.shape
    G = layer.group_size
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
    phi = layer.scale * F.normalize(layer.slot_embeddings, dim=0)  # [D, S]
    y = torch.zeros_like(x)
    for first_row in range(0, B, G):
        rows = torch.arange(first_row, first_row + G)
        for t in range(T):
            real = rows[mask[rows, t]]  # the rows of the group with a real token at t
            if len(real) == 0:
                continue
            tokens = x[real, t]  # [g, D]
            logits = F.normalize(tokens, dim=-1) @ phi  # [g, S]
            dispatch = torch.softmax(logits, dim=0)  # over the group's real tokens
            combine = torch.softmax(logits, dim=1)  # over slots
            slot_outputs = torch.stack(
                [
                    expert_mlp(layer.experts, s // layer.slots_per_expert, dispatch[:, s] @ tokens)
                    for s in range(layer.num_slots)
                ]
            )  # [S, D]
            for i, row in enumerate(real):
                y[row, t] = combine[i] @ slot_outputs
    return y


def _activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def segment_merged_moe(layer, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each segment's routing from the previous segment's mean (or the prior, or itself in the
    leaky "self" mode), the experts merged explicitly, then the merged FFN on every token."""
    B, T, D = x.shape
    C, E = layer.segment_size, layer.num_experts
    experts = layer.experts
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
    y = torch.zeros_like(x)
    for b in range(B):
        for start in range(0, T, C):
            if start == 0 and layer.first_segment == "prior":
                logits = layer.prior_logits
            else:
                source = start - C if start > 0 else 0  # "self": segment 0 reads itself
                real = torch.arange(source, min(source + C, T))
                real = real[mask[b, real]]
                mean = x[b, real].mean(dim=0) if len(real) else torch.zeros(D, dtype=x.dtype)
                if start == 0:
                    mean = mean.detach()
                logits = layer.router_weight @ mean  # [E]
            weights = torch.softmax(logits, dim=0)
            w_in = sum(weights[e] * experts.w_in[e] for e in range(E))
            w_out = sum(weights[e] * experts.w_out[e] for e in range(E))
            for t in range(start, min(start + C, T)):
                if mask[b, t]:
                    y[b, t] = _activate(x[b, t] @ w_in, experts.activation) @ w_out
    return y

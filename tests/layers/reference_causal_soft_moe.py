"""Plain loop references for the causal Soft MoE variants: for every position (or chunk), build its
slots explicitly from the tokens it may see, with an ordinary softmax over those tokens.

Written for clarity, not speed: no prefix sums, no fixed shift, no chunk reshapes.
"""

import math

import torch
import torch.nn.functional as F

from .reference import expert_mlp


def routing_logits(layer, x: torch.Tensor) -> torch.Tensor:
    """L [B, T, S] = <x_t / |x_t|, scale * phi_s / |phi_s|>."""
    return F.normalize(x, dim=-1) @ (layer.scale * F.normalize(layer.slot_embeddings, dim=0))


def slot_outputs(layer, slot_inputs: torch.Tensor) -> torch.Tensor:
    """Slot s goes to expert s // P: slot_inputs [B, S, D] -> [B, S, D], one slot at a time."""
    return torch.stack(
        [expert_mlp(layer.experts, s // layer.slots_per_expert, slot_inputs[:, s]) for s in range(layer.num_slots)],
        dim=1,
    )


def pool(logits: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Soft MoE dispatch over the given tokens: logits [B, n, S], x [B, n, D] -> slot inputs [B, S, D]."""
    dispatch = torch.softmax(logits + bias, dim=1)  # over the n tokens
    return torch.einsum("bns,bnd->bsd", dispatch, x)


def cumulative_soft_moe(layer, x: torch.Tensor, positions=None) -> torch.Tensor:
    """CumulativeSoftMoE: at each position t, slots pooled over x[:, :t+1], older tokens weighing
    decay^age. Returns the outputs at `positions` (all by default), [B, len(positions), D]."""
    logits = routing_logits(layer, x)
    outputs = []
    for t in range(x.shape[1]) if positions is None else positions:
        age = torch.arange(t, -1, -1, dtype=x.dtype).view(1, -1, 1)  # [1, t+1, 1]: t - tau
        bias = 0.0 if layer.decay is None else age * math.log(layer.decay)
        slots = slot_outputs(layer, pool(logits[:, : t + 1], x[:, : t + 1], bias))  # [B, S, D]
        combine = torch.softmax(logits[:, t], dim=-1)  # [B, S]
        outputs.append(torch.einsum("bs,bsd->bd", combine, slots))
    return torch.stack(outputs, dim=1)


def lagged_chunk_soft_moe(layer, x: torch.Tensor) -> torch.Tensor:
    """LaggedChunkSoftMoE: chunk k combines the expert outputs of the slots pooled over chunks
    < k ("prefix") or over chunk k-1 ("previous"); chunk 0 combines the null outputs."""
    B, T, _ = x.shape
    C = layer.chunk_size
    logits = routing_logits(layer, x)
    outputs = []
    for t in range(T):
        k = t // C
        if k == 0:
            slots = layer.null_outputs.expand(B, -1, -1)
        else:
            first = 0 if layer.summary == "prefix" else (k - 1) * C
            slots = slot_outputs(layer, pool(logits[:, first : k * C], x[:, first : k * C]))
        combine = torch.softmax(logits[:, t], dim=-1)  # [B, S]
        shared = expert_mlp(layer.shared, 0, x[:, t])  # [B, D]
        outputs.append(shared + torch.einsum("bs,bsd->bd", combine, slots))
    return torch.stack(outputs, dim=1)

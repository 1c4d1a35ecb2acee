"""Plain, obviously-correct reference implementations that the layers are tested against.

Loops over tokens, experts and slots, written for clarity, not speed.
"""

import math

import torch
import torch.nn.functional as F


def expert_mlp(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of an `ExpertWeights` applied to x [..., D]."""
    h = x @ experts.w_in[e]
    if experts.activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return h @ experts.w_out[e]


def topk_choices(moe, x: torch.Tensor):
    """Router affinities (a distribution over the experts) and the chosen (expert, weight) pairs of
    every token of x [B, T, D]."""
    logits = x @ moe.router.weight.T  # [B, T, E]
    if moe.router.score_function == "softmax":
        scores = probs = torch.softmax(logits, dim=-1)
    else:  # each expert's sigmoid on its own; the distribution is their normalised values
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    bias = 0 if moe.expert_bias is None else moe.expert_bias  # picks the experts, never weighs them
    index = (scores + bias).topk(moe.top_k, dim=-1).indices
    weight = scores.gather(-1, index)
    if moe.router.renormalize:
        weight = weight / weight.sum(-1, keepdim=True)
    return probs, index, weight * moe.router.route_scale


def capacity_kept(index: torch.Tensor, num_experts: int, capacity_factor: float | None) -> torch.Tensor:
    """Walk each sequence in position order; by position t an expert may have served at most
    ceil(capacity_factor * k * (t + 1) / E) choices."""
    B, T, k = index.shape
    kept = torch.ones(B, T, k, dtype=torch.bool)
    if capacity_factor is None:
        return kept
    for b in range(B):
        served = [0] * num_experts
        for t in range(T):
            capacity = math.ceil(capacity_factor * k * (t + 1) / num_experts)
            for j in range(k):
                e = int(index[b, t, j])
                if served[e] < capacity:
                    served[e] += 1
                else:
                    kept[b, t, j] = False
    return kept


def topk_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """TopKMoE output, one token and one choice at a time, plus the shared expert."""
    _, index, weight = topk_choices(moe, x)
    kept = capacity_kept(index, moe.num_experts, moe.capacity_factor)
    B, T, _ = x.shape
    rows = []
    for b in range(B):
        for t in range(T):
            out = torch.zeros_like(x[b, t])
            for j in range(moe.top_k):
                if kept[b, t, j]:
                    out = out + weight[b, t, j] * expert_mlp(moe.experts, int(index[b, t, j]), x[b, t])
            if moe.shared is not None:
                gate = 1.0 if moe.shared_gate is None else torch.sigmoid(x[b, t] @ moe.shared_gate.weight[0])
                out = out + gate * expert_mlp(moe.shared, 0, x[b, t])
            rows.append(out)
    return torch.stack(rows).view_as(x)


def remoe(layer, x: torch.Tensor) -> torch.Tensor:
    """ReMoE output, one token and one expert at a time: every expert whose ReLU gate is positive."""
    B, T, D = x.shape
    rows = []
    for b in range(B):
        for t in range(T):
            out = torch.zeros_like(x[b, t])
            for e in range(layer.num_experts):
                gate = torch.relu(x[b, t] @ layer.router[e])
                if gate > 0:
                    out = out + gate * expert_mlp(layer.experts, e, x[b, t])
            rows.append(out)
    return torch.stack(rows).view_as(x)


def expert_choice(layer, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Expert-choice output, one sequence and one expert at a time: each expert takes the C of the
    sequence's L real tokens with the highest affinity to it, C = ceil(capacity_factor * L / E)."""
    B, T, D = x.shape
    y = torch.zeros_like(x)
    for b in range(B):
        real = [t for t in range(T) if mask is None or mask[b, t]]
        C = min(len(real), math.ceil(layer.capacity_factor * len(real) / layer.num_experts))
        affinity = torch.softmax(x[b] @ layer.router.T, dim=-1)  # [T, E]
        for e in range(layer.num_experts):
            for t in sorted(real, key=lambda t: -affinity[t, e].item())[:C]:
                y[b, t] = y[b, t] + layer.route_scale * affinity[t, e] * expert_mlp(layer.experts, e, x[b, t])
    return y


def soft_moe(layer, x: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of the Soft MoE paper, with the official L2 normalisation, one slot at a time."""
    phi = layer.scale * F.normalize(layer.slot_embeddings, dim=0)  # [D, S]
    logits = F.normalize(x, dim=-1) @ phi  # [B, T, S]
    dispatch = torch.softmax(logits, dim=1)
    combine = torch.softmax(logits, dim=2)
    slot_inputs = torch.einsum("bts,btd->bsd", dispatch, x)
    slot_outputs = torch.stack(
        [expert_mlp(layer.experts, s // layer.slots_per_expert, slot_inputs[:, s]) for s in range(layer.num_slots)],
        dim=1,
    )  # [B, S, D]
    return torch.einsum("bts,bsd->btd", combine, slot_outputs)

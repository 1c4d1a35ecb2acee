"""Lagged-chunk Soft MoE: a causal Soft MoE whose slots are built once per chunk of time and read
by the next chunk, plus a dense shared expert on every token (V2 of docs/causal_variants.md).

Notation: B batch, T tokens, D width, E experts, P slots per expert, S = E*P slots, H expert
hidden width, H_sh the shared expert's hidden width, C chunk length, K = ceil(T / C) chunks,
k(t) = t // C the chunk of token t.

    L[b, t, s]    = <normalize(x[b, t]), scale * normalize(phi[:, s])>    router logits, |L| <= |scale|
    w[b, t, s]    = exp(L[b, t, s] - |scale|)                              in (0, 1]: a fixed shift
    pool(j)       = tokens of chunks 0..j  (summary="prefix")  or  of chunk j only  (summary="previous")
    slot_in[b, j] = sum_{tau in pool(j)} w[b, tau] x[b, tau] / sum_{tau in pool(j)} w[b, tau]   [B, K, S, D]
    O[b, j, s]    = expert_{s // P}(slot_in[b, j, s])                      [B, K, S, D]
    O[b, -1]      = null_outputs                                           learned, [S, D]
    y[b, t]       = shared(x[b, t]) + sum_s softmax_s(L[b, t, :]) O[b, k(t) - 1, s]               [B, T, D]

Token t reads only the summary of the chunk before its own, which holds tokens < C*k(t) <= t:
causal by construction. (Reading its own chunk's summary would show it the rest of its chunk: a
leak.) The first chunk reads the learned null outputs; the shared expert gives every token its own
nonlinear path. The fixed shift |scale| (the logits' bound) replaces a running max, so w never
overflows and the per-chunk sums stay exactly causal; it cancels in the slot input.

Cost: experts run once per (chunk, slot), T*S/C expert calls per sequence, i.e. S/C per token,
plus the shared expert: per-token FLOPs of a dense FFN of width H_sh + S*H/C, while the parameters
grow with E. Parameters: E experts (2*D*H each, 3*D*H for SwiGLU), the shared expert (2*D*H_sh),
phi [D, S], the scale and the null outputs [S, D].
Decoding: the state holds the sums feeding the next summary ([B, S, D] and [B, S]) and the outputs
the current chunk reads ([B, S, D]). A token costs O(S*D) (add w x to the sums, combine the stored
outputs) plus the shared expert; whenever a chunk completes, a burst of S expert calls builds the
outputs the next chunk reads.

Precision: logits, w, the sums and the slot inputs are fp32 (float64 stays float64), also under
autocast; only the experts and the combine run in the autocast dtype.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lm_moe.argument_checks import require_choice, require_positive_int
from lm_moe.layers.ffn import ExpertWeights
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.layer_output import LayerAux, deferred_stats
from lm_moe.layers.numerics import clamp_to_tiny, compute_dtype, entropy_from_sums, masked_mean
from lm_moe.layers.slot_routing import SlotRoutedLayer, combine_stats, combine_weights

SUMMARIES = ("prefix", "previous")


class LaggedChunkState(NamedTuple):
    """Decoding state of `LaggedChunkSoftMoE` after `length` tokens."""

    length: int
    num: torch.Tensor  # [B, S, D] sum of w x over the tokens that feed the next summary (fp32 or wider)
    den: torch.Tensor  # [B, S] sum of w over the same tokens
    lagged_outputs: torch.Tensor  # [B, S, D] O of the previous chunk: what the current chunk combines


class LaggedChunkSoftMoE(SlotRoutedLayer):
    """Causal Soft MoE with per-chunk slots read one chunk later, plus a dense shared expert:
    x [B, T, D] -> (y [B, T, D], LayerAux with zero loss). See the module docstring for the math.

    chunk_size: C, tokens per chunk (any T works, including T % C != 0).
    summary: "prefix" (slots pool all earlier chunks) or "previous" (the previous chunk only).
    shared_hidden_dim: hidden width of the shared expert (None = hidden_dim).
    `mask` [B, T] (True = real token, padding at the end of rows) keeps padding out of every slot;
    padded positions output 0. aux.stats: dispatch_entropy (of each slot's weights over its pooled
    tokens, mean over the summaries some token reads) and the `combine_stats`.
    """

    is_causal = True  # chunk k reads summaries of chunks < k only
    no_weight_decay = (*SlotRoutedLayer.no_weight_decay, "null_outputs")  # the null outputs are a bias

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        slots_per_expert: int = 1,
        chunk_size: int = 16,
        summary: str = "prefix",
        shared_hidden_dim: int | None = None,
        activation: str = "gelu",
        logit_scale_init: float | None = None,
        expert_dropout: float = 0.0,
    ):
        chunk_size = require_positive_int("chunk_size", chunk_size)
        require_choice("summary", summary, SUMMARIES)
        if shared_hidden_dim is None:
            shared_hidden_dim = hidden_dim
        require_positive_int("shared_hidden_dim", shared_hidden_dim)
        experts = ExpertWeights(num_experts, dim, hidden_dim, activation, dropout=expert_dropout)
        # Built before the slots, as the experts are: the order fixes what a seed draws for each.
        shared = ExpertWeights(1, dim, shared_hidden_dim, activation, dropout=expert_dropout)
        super().__init__(experts, slots_per_expert, logit_scale_init)
        self.chunk_size = chunk_size
        self.summary = summary
        self.shared = shared
        self.null_outputs = nn.Parameter(torch.zeros(self.num_slots, dim))  # what chunk 0 reads

    @property
    def structure_lengths(self) -> tuple[int, ...]:
        return (self.chunk_size,)

    def parameter_macs_per_token(self) -> float:
        """The slot logits (D*S), the shared expert, and S expert calls per chunk of C tokens."""
        experts = self.num_slots / self.chunk_size * self.experts.parameters_per_expert
        return self.slot_embeddings.numel() + self.shared.parameters_per_expert + experts

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        check_layer_input(x, mask, self.experts.dim)
        B, T, D = x.shape
        S, C = self.num_slots, self.chunk_size
        K = math.ceil(T / C)
        pad = K * C - T
        dtype = compute_dtype(x)
        logits = self.router_logits(x)  # [B, T, S]
        weights = self.shifted_weights(logits, mask)  # [B, T, S]

        with torch.autocast(device_type=x.device.type, enabled=False):
            chunk_weights = F.pad(weights, (0, 0, 0, pad)).view(B, K, C, S)  # [B, K, C, S]
            chunk_x = F.pad(x.to(weights.dtype), (0, 0, 0, pad)).reshape(B, K, C, D)  # [B, K, C, D]
            num = chunk_weights.transpose(2, 3) @ chunk_x  # [B, K, S, D]
            den = chunk_weights.sum(dim=2)  # [B, K, S]
        if self.summary == "prefix":
            num, den = num.cumsum(dim=1), den.cumsum(dim=1)
        # Chunk k reads the outputs of chunk k-1; nobody here reads the last chunk's.
        outputs = self._slot_outputs(num[:, :-1], den[:, :-1], dtype)  # [B, K-1, S, D]
        null = self.null_outputs.to(dtype).expand(B, 1, S, D)  # [B, 1, S, D]
        lagged = torch.cat([null, outputs], dim=1)  # [B, K, S, D]

        combine = combine_weights(logits, None)  # [B, T, S]; padding is zeroed in y
        chunk_combine = F.pad(combine.to(dtype), (0, 0, 0, pad)).view(B, K, C, S)  # [B, K, C, S]
        routed = (chunk_combine @ lagged).view(B, K * C, D)[:, :T]  # [B, T, D]
        y = self._shared(x) + routed  # [B, T, D]
        if mask is not None:
            y = y * mask.unsqueeze(-1)
        aux = LayerAux.empty(x)
        aux.stats = deferred_stats(self._stats, logits, weights, combine, mask, self.logit_shift())
        return y, aux

    def decode(self, x: torch.Tensor, state: LaggedChunkState | None) -> tuple[torch.Tensor, LaggedChunkState]:
        """The next t >= 1 tokens x [B, t, D] of each sequence, after the `state.length` tokens
        summed in `state` (None at the start) -> (y [B, t, D], the state after them). Equals
        `forward` on the whole sequence. Loops over the chunks these tokens touch."""
        B, T, D = x.shape
        dtype = compute_dtype(x)
        logits = self.router_logits(x)  # [B, t, S]
        weights = self.shifted_weights(logits)  # [B, t, S]
        combine = combine_weights(logits, None).to(dtype)  # [B, t, S]
        if state is None:
            state = LaggedChunkState(
                0,
                weights.new_zeros(B, self.num_slots, D),
                weights.new_zeros(B, self.num_slots),
                self.null_outputs.to(dtype).expand(B, -1, -1),
            )

        routed = []
        start = 0
        while start < T:
            # The tokens up to the end of the current chunk all read the same lagged outputs.
            stop = min(T, start + self.chunk_size - state.length % self.chunk_size)
            routed.append(combine[:, start:stop] @ state.lagged_outputs)  # [B, n, D]
            with torch.autocast(device_type=x.device.type, enabled=False):
                chunk_weights = weights[:, start:stop]  # [B, n, S]
                num = state.num + chunk_weights.transpose(1, 2) @ x[:, start:stop].to(weights.dtype)  # [B, S, D]
                den = state.den + chunk_weights.sum(dim=1)  # [B, S]
            length, lagged = state.length + stop - start, state.lagged_outputs
            if length % self.chunk_size == 0:  # the chunk is complete: build what the next one reads
                lagged = self._slot_outputs(num.unsqueeze(1), den.unsqueeze(1), dtype).squeeze(1)  # [B, S, D]
                if self.summary == "previous":
                    num, den = torch.zeros_like(num), torch.zeros_like(den)
            state = LaggedChunkState(length, num, den, lagged)
            start = stop
        return self._shared(x) + torch.cat(routed, dim=1), state

    def _slot_outputs(self, num: torch.Tensor, den: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Summaries num [B, n, S, D], den [B, n, S] -> expert outputs O [B, n, S, D], all experts
        in one batched matmul."""
        slot_in = num / clamp_to_tiny(den).unsqueeze(-1)  # [B, n, S, D]
        return self.run_experts(slot_in.to(dtype).permute(2, 0, 1, 3)).permute(1, 2, 0, 3)  # [B, n, S, D]

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The dense shared expert on every token: x [B, T, D] -> [B, T, D]."""
        return self.shared.forward_batched(x.reshape(1, -1, x.shape[-1])).view(x.shape)

    def _stats(
        self, logits: torch.Tensor, weights: torch.Tensor, combine: torch.Tensor, mask: torch.Tensor | None,
        shift: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Routing health of the chunk summaries, from the logits, the dispatch weights
        exp(logits - shift) and the combine weights [B, T, S]."""
        B, T, S = logits.shape
        C = self.chunk_size
        K = math.ceil(T / C)
        # Entropy of each read summary's weights, from sums alone: H = log den - sum w log w / den,
        # with log w = L - |scale|. Summary j is read by chunk j + 1: count it where that chunk's
        # first token is real.
        log_weights = logits - shift.to(logits.dtype)  # [B, T, S]
        pad = K * C - T
        den = F.pad(weights, (0, 0, 0, pad)).view(B, K, C, S).sum(dim=2)  # [B, K, S]
        tilted = F.pad(weights * log_weights, (0, 0, 0, pad)).view(B, K, C, S).sum(dim=2)  # [B, K, S]
        if self.summary == "prefix":
            den, tilted = den.cumsum(dim=1), tilted.cumsum(dim=1)
        dispatch_entropy = entropy_from_sums(den[:, :-1], tilted[:, :-1])  # [B, K-1, S]
        read = torch.ones(B, K - 1, dtype=torch.bool, device=logits.device) if mask is None else mask[:, C::C]

        valid = None if mask is None else mask.reshape(-1)  # [B*T]
        return {
            "dispatch_entropy": masked_mean(dispatch_entropy.mean(-1).reshape(-1), read.reshape(-1)).float(),
            **combine_stats(logits, combine, valid),
        }

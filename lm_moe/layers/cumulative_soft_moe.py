"""Cumulative Soft MoE: a causal Soft MoE in which every position owns all the slots, each pooled
over that position's prefix (V1 of docs/causal_variants.md).

Notation: B batch, T tokens, D width, E experts, P slots per expert, S = E*P slots, H expert
hidden width, g the optional decay (g = 1 without it).

    L[b, t, s]    = <normalize(x[b, t]), scale * normalize(phi[:, s])>    router logits, |L| <= |scale|
    w[b, t, s]    = exp(L[b, t, s] - |scale|)                              in (0, 1]: a fixed shift
    num[b, t, s]  = sum_{tau <= t} g^(t - tau) w[b, tau, s] x[b, tau]      [B, T, S, D]
    den[b, t, s]  = sum_{tau <= t} g^(t - tau) w[b, tau, s]                [B, T, S]
    slot_in       = num / den                                              [B, T, S, D]
    slot_out      = expert_{s // P}(slot_in[:, :, s])                      [B, T, S, D]
    y[b, t]       = sum_s softmax_s(L[b, t, :]) slot_out[b, t, s]          [B, T, D]

So slot s at time t is Soft MoE's dispatch restricted to the prefix: a softmax over tau <= t of
L[tau, s] + (t - tau) log g. The fixed shift |scale| (the logits' bound) replaces the running
max, so w never overflows and the prefix sums need no rescaling: position t's sums hold tokens
<= t only, exactly. The shift cancels in num / den. Without decay, a slot's mean over a long prefix changes little per
token ("dilution"); a decay g < 1 lets it forget with a time constant of about 1 / (1 - g) tokens.
The sums are computed in blocks of up to 32 positions: a small matmul inside each block, block
totals carried to later blocks. Every coefficient is a power g^k with k >= 0, never the g^-t of
the closed form, which would overflow on long sequences.

Cost: S expert calls per token, the FLOPs of a dense FFN of width S*H, plus S*(C+S)*D
multiply-adds per token for the block sums (C <= 32 positions per block).
Parameters: E experts (2*D*H each, or 3*D*H for SwiGLU), phi [D, S] and the scale.
Decoding: the state is (num, den) at the last position, [B, S, D] and [B, S]: S*(D+1) numbers per
sequence, constant in T. A step is num <- g num + w x, den <- g den + w, then S expert calls.

Precision: logits, w, the sums and the slot inputs are fp32 (float64 stays float64), also under
autocast; only the experts and the combine run in the autocast dtype. w >= exp(-2|scale|), so
|scale| must stay below ~40 in fp32 before a slot's weights can underflow; a slot whose weights all
underflow (or that saw only padding) gets input 0 instead of NaN.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lm_moe.argument_checks import require_positive_float
from lm_moe.layers.ffn import ExpertWeights
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.layer_output import LayerAux, deferred_stats
from lm_moe.layers.numerics import clamp_to_tiny, compute_dtype, entropy_from_sums, masked_mean
from lm_moe.layers.slot_routing import SlotRoutedLayer, combine_stats, combine_weights

# Positions per block of the prefix sums: inside a block they are a [block, block] matmul.
_BLOCK = 32


class CumulativeState(NamedTuple):
    """Decoding state of `CumulativeSoftMoE`: the sums at the last position seen."""

    num: torch.Tensor  # [B, S, D] fp32 or wider
    den: torch.Tensor  # [B, S]


class CumulativeSoftMoE(SlotRoutedLayer):
    """Causal Soft MoE, every position pooling all S slots over its prefix: x [B, T, D] ->
    (y [B, T, D], LayerAux with zero loss). See the module docstring for the math.

    decay: None (plain prefix means) or g in (0, 1): a token of age a weighs g^a.
    `mask` [B, T] (True = real token, padding at the end of rows) keeps padding out of every slot;
    padded positions output 0. aux.stats: dispatch_entropy (of each slot's weights over the prefix,
    mean over slots and positions) and the `combine_stats`.
    """

    is_causal = True  # position t pools positions <= t only

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        slots_per_expert: int = 1,
        activation: str = "gelu",
        logit_scale_init: float | None = None,
        expert_dropout: float = 0.0,
        decay: float | None = None,
    ):
        if decay is not None and require_positive_float("decay", decay) >= 1:
            raise ValueError(f"decay must be in (0, 1) or None, got {decay!r}")
        super().__init__(ExpertWeights(num_experts, dim, hidden_dim, activation, dropout=expert_dropout), slots_per_expert, logit_scale_init)
        self.decay = None if decay is None else float(decay)

    def parameter_macs_per_token(self) -> float:
        """The slot logits (D*S) and all S slots' expert calls at every position."""
        return self.slot_embeddings.numel() + self.num_slots * self.experts.parameters_per_expert

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        check_layer_input(x, mask, self.experts.dim)
        logits = self.router_logits(x)  # [B, T, S]
        weights = self.shifted_weights(logits, mask)  # [B, T, S]
        combine = combine_weights(logits, mask)  # [B, T, S]
        y = self._experts_and_combine(self._slot_inputs(x, weights, None), combine)
        aux = LayerAux.empty(x)
        aux.stats = deferred_stats(self._stats, logits, weights, combine, mask, self.logit_shift())
        return y, aux

    def decode(self, x: torch.Tensor, state: CumulativeState | None) -> tuple[torch.Tensor, CumulativeState]:
        """The next t >= 1 tokens x [B, t, D] of each sequence, after those summed in `state`
        (None at the start) -> (y [B, t, D], the state after them). Equals `forward` on the whole
        sequence; the state does not grow with its length."""
        logits = self.router_logits(x)  # [B, t, S]
        weights = self.shifted_weights(logits)  # [B, t, S]
        y = self._experts_and_combine(self._slot_inputs(x, weights, state), combine_weights(logits, None))
        return y, self._advance(state, x, weights)

    @property
    def _g(self) -> float:
        """The decay factor per position: 1 without decay."""
        return 1.0 if self.decay is None else self.decay

    def _slot_inputs(self, x: torch.Tensor, weights: torch.Tensor, state: CumulativeState | None) -> torch.Tensor:
        """num / den at every position: x [B, T, D], weights [B, T, S] -> [S, B, K*C, D] in the
        compute dtype, continuing the sums in `state`. Time is cut into K blocks of C >= T / K
        positions (rows past T are padding); slot-major, so each expert's inputs form one block."""
        B, T, D = x.shape
        S = self.num_slots
        K = math.ceil(T / _BLOCK)
        C = math.ceil(T / K)
        acc = weights.dtype  # the sums' dtype: fp32 or wider
        g = self._g
        steps = torch.arange(C, device=x.device, dtype=torch.float64)  # [C]
        lag = steps[:, None] - steps[None, :]  # [C, C]
        within = torch.where(lag >= 0, g ** lag.clamp_min(0), 0.0).to(acc)  # [C, C] g^(i-j) for j <= i
        reach = (g ** (steps + 1)).to(acc)  # [C] decay from the step before a block to its step i
        blocks = torch.arange(K, device=x.device, dtype=torch.float64)  # [K]
        gap = blocks[:, None] - blocks[None, :] - 1  # [K, K] blocks between block l and block k
        across = torch.where(gap >= 0, g ** (C * gap.clamp_min(0)), 0.0).to(acc)  # [K, K] l < k only

        with torch.autocast(device_type=x.device.type, enabled=False):
            w = F.pad(weights, (0, 0, 0, K * C - T)).view(B, K, C, S).transpose(2, 3).contiguous()  # [B, K, S, C]
            xb = F.pad(x.to(acc), (0, 0, 0, K * C - T)).reshape(B, K, C, D)  # [B, K, C, D]
            local = w.unsqueeze(-2) * within  # [B, K, S, C, C] weight of step j at step i of a block
            # Each block's sums seen from its last step, carried to the steps before later blocks.
            num_carry = torch.einsum("kl,blsd->bksd", across, local[..., -1, :] @ xb)  # [B, K, S, D]
            den_carry = torch.einsum("kl,bls->bks", across, local[..., -1, :].sum(-1))  # [B, K, S]
            if state is not None:  # the sums before this call, decayed to the step before each block
                since = (g ** (C * blocks)).to(acc)  # [K]
                num_carry = num_carry + since.view(K, 1, 1) * state.num.unsqueeze(1)  # [B, K, S, D]
                den_carry = den_carry + since.view(K, 1) * state.den.unsqueeze(1)  # [B, K, S]
            den = clamp_to_tiny(local.sum(-1) + reach * den_carry.unsqueeze(-1))  # [B, K, S, C]
            # means = (local @ xb + reach * num_carry) / den as one matmul: the carried sums enter as S
            # extra rows of x, each read by its own slot only, and den divides the small factors.
            own_slot = torch.eye(S, dtype=acc, device=x.device).unsqueeze(1)  # [S, 1, S]
            carry_read = (reach / den).unsqueeze(-1) * own_slot  # [B, K, S, C, S]
            mix = torch.cat([local / den.unsqueeze(-1), carry_read], dim=-1)  # [B, K, S, C, C+S]
            rows = torch.cat([xb, num_carry], dim=2)  # [B, K, C+S, D]
            means = mix.view(B * K, S * C, C + S) @ rows.view(B * K, C + S, D)  # [B*K, S*C, D]
        means = means.to(compute_dtype(x)).view(B, K, S, C, D)
        return means.permute(2, 0, 1, 3, 4).reshape(S, B, K * C, D)  # [S, B, K*C, D]

    def _experts_and_combine(self, slot_in: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """slot_in [S, B, T', D] (T' >= T), combine [B, T, S] -> y [B, T, D]."""
        T_blocks, T = slot_in.shape[2], combine.shape[1]
        slot_out = self.run_experts(slot_in)  # [S, B, T', D]
        combine = F.pad(combine.to(slot_out.dtype), (0, 0, 0, T_blocks - T))  # [B, T', S]
        return torch.einsum("bts,sbtd->btd", combine, slot_out)[:, :T]  # [B, T, D]

    def _advance(self, state: CumulativeState | None, x: torch.Tensor, weights: torch.Tensor) -> CumulativeState:
        """The sums after the t positions of x [B, t, D]: g^t * state + sum_tau g^(t-1-tau) w x."""
        T = x.shape[1]
        g = self._g
        age = torch.arange(T - 1, -1, -1, device=x.device, dtype=torch.float64)  # [t]
        with torch.autocast(device_type=x.device.type, enabled=False):
            decayed = weights * (g**age).to(weights.dtype).unsqueeze(-1)  # [B, t, S]
            num = decayed.transpose(1, 2) @ x.to(weights.dtype)  # [B, S, D]
            den = decayed.sum(dim=1)  # [B, S]
        if state is not None:
            num, den = num + g**T * state.num, den + g**T * state.den
        return CumulativeState(num, den)

    def _stats(
        self, logits: torch.Tensor, weights: torch.Tensor, combine: torch.Tensor, mask: torch.Tensor | None,
        shift: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Routing health of the prefix-pooled slots, from the logits, the dispatch weights
        exp(logits - shift) and the combine weights [B, T, S]."""
        T = logits.shape[1]
        g = self._g
        # Entropy of slot s's dispatch at t, v[tau] = g^(t - tau) w[tau] normalised over tau <= t:
        # H = log den - sum_tau v log v / den, with log v = (L - |scale|) + (t - tau) log g.
        steps = torch.arange(T, device=logits.device, dtype=torch.float64)  # [T]
        lag = steps[:, None] - steps[None, :]  # [T, T]
        kernel = torch.where(lag >= 0, g ** lag.clamp_min(0), 0.0)  # [T, T] g^(t - tau), tau <= t
        kernel, lag = kernel.to(logits.dtype), lag.to(logits.dtype)
        log_weights = logits - shift.to(logits.dtype)  # [B, T, S]
        v_log_v = kernel @ (weights * log_weights) + math.log(g) * ((kernel * lag) @ weights)  # [B, T, S]
        dispatch_entropy = entropy_from_sums(kernel @ weights, v_log_v)  # [B, T, S]

        valid = None if mask is None else mask.reshape(-1)  # [B*T]
        return {
            "dispatch_entropy": masked_mean(dispatch_entropy.mean(-1).reshape(-1), valid).float(),
            **combine_stats(logits, combine, valid),
        }

"""Segment routing with expert merging (Lory-style, Zhong et al. 2024, after SMEAR, Muqeeth et al. 2023).

Notation: B batch, T tokens, D width, E experts, H expert hidden width, C segment length,
K = ceil(T / C) segments, x^k the tokens of segment k (positions kC .. kC+C-1).

    m^k          = mean of x^k over its real tokens                      [B, K, D]
    r^k          = softmax(prior)             for k = 0                  [B, K, E]
                   softmax(W_r m^{k-1})       for k >= 1     (router W_r [E, D], fp32 or wider)
    W_in^k       = sum_e r^k_e W_in[e],   W_out^k = sum_e r^k_e W_out[e]  merged once per segment
    y_t          = act(x_t W_in^k) W_out^k    for every t in segment k

Segment k is routed on segment k-1, which lies wholly in its past: the layer is causal and per
example deterministic, and every expert gets a gradient (merging is differentiable, nothing is
dropped). Segment 0 has no past and uses learned prior logits.

first_segment="self" routes segment 0 on its own mean (with stop-gradient) instead. That is a
KNOWN-LEAKY negative control: stop-gradient hides the leak from gradient tests, but position 0's
output depends on positions 1 .. C-1 in the forward pass. `is_causal` is False with it, and it
cannot decode incrementally.

Cost per token: a dense FFN of hidden H (4*D*H FLOPs with GELU), plus the merge of E experts'
weights once per segment (E*2*D*H multiply-adds per segment, 4*E*D*H/C FLOPs per token): a
fraction E/C on top of the FFN, the same fraction again in the backward pass. FLOPs understate
the merge: it writes 2*D*H merged weights per segment and row (and the backward as many
gradients), which is memory-bound, so keep C well above E (C = 64 for E = 8). Segment 0 under
the prior has the same weights in every row and is merged once per batch. Parameters:
E*(2*D*H) experts + E*D router + E prior logits.

Padding (`mask` [B, T], True = real token, padding at the end of rows): padded tokens are left
out of the segment means and output 0.

Decoding: the state keeps the merged weights of the current segment and the running sum of its
inputs; every C tokens the finished segment's mean routes the next one and the experts are merged
again. Per token that is one merged-FFN call, plus one merge every C tokens.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lm_moe.argument_checks import require_choice, require_positive_int
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.ffn import ExpertWeights
from lm_moe.layers.inputs import check_layer_input
from lm_moe.layers.layer_output import LayerAux, deferred_stats
from lm_moe.layers.numerics import coefficient_of_variation, compute_dtype, entropy, masked_mean, routing_dtype

FIRST_SEGMENT_MODES = ("prior", "self")


@dataclass
class SegmentDecodeState:
    """What decoding keeps per sequence between calls."""

    position: int  # tokens seen so far
    segment_sum: torch.Tensor  # [B, D] sum of the current segment's inputs seen so far (fp32 or wider)
    w_in: torch.Tensor  # [B, D, H] merged weights of the current segment ([B, D, 2H] for swiglu)
    w_out: torch.Tensor  # [B, H, D]


@dataclass
class _Segments:
    """The layer's result on whole segments, starting at a segment boundary."""

    y: torch.Tensor  # [B, T, D]
    probs: torch.Tensor  # [B, K, E] routing weights of each segment
    last_sum: torch.Tensor  # [B, D] sum of the last segment's real inputs
    last_w_in: torch.Tensor  # [B, D, H] merged weights of the last segment
    last_w_out: torch.Tensor  # [B, H, D]


class SegmentMergedMoE(FeedForwardLayer):
    """Segment-routed, weight-merged MoE: x [B, T, D] -> (y [B, T, D], LayerAux with zero loss).

    aux.stats: routing_entropy (mean over segments of the entropy of r^k; ln E = uniform merge),
    expert_weights [E] (mean routing weight of each expert) and expert_weight_spread (its
    coefficient of variation: 0 = every expert used equally).
    expert_dropout: in training, dropout on the merged FFN's hidden activations (see `ExpertWeights`).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        segment_size: int = 32,
        first_segment: str = "prior",
        activation: str = "gelu",
        expert_dropout: float = 0.0,
    ):
        super().__init__()
        self.num_experts = require_positive_int("num_experts", num_experts)
        self.segment_size = require_positive_int("segment_size", segment_size)
        require_choice("first_segment", first_segment, FIRST_SEGMENT_MODES)
        self.first_segment = first_segment
        # The merged FFN is a convex mix of the experts' weights: drawn sqrt(E) larger, the mix
        # starts at one FFN's scale (1/E of its output otherwise; 0.32 nats at 300 steps,
        # docs/moe_baseline.md).
        self.experts = ExpertWeights(num_experts, dim, hidden_dim, activation, init_scale=math.sqrt(num_experts),
                                     dropout=expert_dropout)
        self.router_weight = nn.Parameter(torch.randn(num_experts, dim) * dim**-0.5)  # W_r [E, D]
        if first_segment == "prior":
            self.prior_logits = nn.Parameter(torch.zeros(num_experts))  # [E], uniform merge at init

    @property
    def is_causal(self) -> bool:  # per instance: False for the leaky "self" control
        return self.first_segment == "prior"

    @property
    def structure_lengths(self) -> tuple[int, ...]:
        return (self.segment_size,)

    def parameter_macs_per_token(self) -> float:
        """One merged FFN per token, plus the router (D*E) and the merge of all E experts once per
        segment of C tokens."""
        merge = self.experts.parameters_per_expert * self.num_experts / self.segment_size
        return self.router_weight.numel() / self.segment_size + self.experts.parameters_per_expert + merge

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        check_layer_input(x, mask, self.experts.dim)
        out = self._segments(x, mask, previous_mean=None)
        y = out.y if mask is None else out.y * mask.unsqueeze(-1)  # [B, T, D]
        aux = LayerAux.empty(x)
        aux.stats = deferred_stats(self._stats, out.probs, mask)
        return y, aux

    def decode(self, x: torch.Tensor, state: SegmentDecodeState | None) -> tuple[torch.Tensor, SegmentDecodeState]:
        """Incremental decoding: x [B, t, D] are the next t tokens (any t >= 1)."""
        if not self.is_causal:
            raise ValueError(
                "first_segment='self' routes segment 0 on tokens that are not yet decoded: "
                "this leaky control cannot decode incrementally"
            )
        C = self.segment_size
        outputs = []
        if state is not None and state.position % C != 0:
            # Finish the current segment with its cached merged weights.
            head = x[:, : C - state.position % C]  # [B, h, D]
            outputs.append(self._merged_ffn(head, state.w_in, state.w_out))  # [B, h, D]
            segment_sum = state.segment_sum + head.sum(dim=1, dtype=state.segment_sum.dtype)  # [B, D]
            state = SegmentDecodeState(state.position + head.shape[1], segment_sum, state.w_in, state.w_out)
            x = x[:, head.shape[1] :]
        if x.shape[1] > 0:
            # The rest starts at a segment boundary: the finished segment (if any) routes the next.
            previous_mean = None if state is None else state.segment_sum / C  # [B, D]
            out = self._segments(x, None, previous_mean)
            outputs.append(out.y)
            position = x.shape[1] + (0 if state is None else state.position)
            state = SegmentDecodeState(position, out.last_sum, out.last_w_in, out.last_w_out)
        return torch.cat(outputs, dim=1), state

    def _segments(self, x: torch.Tensor, mask: torch.Tensor | None, previous_mean: torch.Tensor | None) -> _Segments:
        """The layer on x [B, T, D] starting at a segment boundary; `previous_mean` [B, D] is the
        mean of the segment before x (None: x starts the sequence)."""
        B, T, D = x.shape
        C = self.segment_size
        K = math.ceil(T / C)
        padded = x if K * C == T else F.pad(x, (0, 0, 0, K * C - T))  # [B, K*C, D], zeros past T
        segments = padded.reshape(B, K, C, D)  # [B, K, C, D]
        accumulate = routing_dtype(x)  # segment sums in fp32 or wider, also for bf16 inputs
        if mask is None:
            sums = segments.sum(dim=2, dtype=accumulate)  # [B, K, D]
            counts = (T - C * torch.arange(K, device=x.device)).clamp(max=C).view(1, K, 1)  # [1, K, 1]
        else:
            real = F.pad(mask, (0, K * C - T)).view(B, K, C, 1)  # [B, K, C, 1]
            sums = (segments * real).sum(dim=2, dtype=accumulate)  # [B, K, D] over real tokens only
            counts = real.sum(dim=2)  # [B, K, 1]
        means = sums / counts.clamp_min(1)  # [B, K, D]

        first_logits, later_logits = self._routing(means, previous_mean)  # [B, E] or [E], [B, K-1, E]
        first_probs, later_probs = first_logits.softmax(dim=-1), later_logits.softmax(dim=-1)
        # Under the prior, segment 0 has the same weights in every row: merged once for the batch.
        first_w_in, first_w_out = self._merge(first_probs)  # [B, D, H] or [D, H], [B, H, D] or [H, D]
        y_first = self._merged_ffn(segments[:, 0], first_w_in, first_w_out)  # [B, C, D]
        w_in, w_out = self._merge(later_probs.reshape(B * (K - 1), self.num_experts))  # [B*(K-1), D, H], [.., H, D]
        y_later = self._merged_ffn(segments[:, 1:].reshape(B * (K - 1), C, D), w_in, w_out)  # [B*(K-1), C, D]
        y = torch.cat([y_first, y_later.view(B, (K - 1) * C, D)], dim=1)[:, :T]  # [B, T, D]

        probs = torch.cat([first_probs.expand(B, -1).unsqueeze(1), later_probs], dim=1)  # [B, K, E]
        if K > 1:
            last_w_in, last_w_out = w_in.view(B, K - 1, D, -1)[:, -1], w_out.view(B, K - 1, -1, D)[:, -1]
        else:
            last_w_in, last_w_out = first_w_in.expand(B, D, -1), first_w_out.expand(B, -1, D)
        return _Segments(y, probs, sums[:, -1], last_w_in, last_w_out)

    def _routing(self, means: torch.Tensor, previous_mean: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits, in fp32 or wider, from the segment means [B, K, D] and the mean of the
        segment before them [B, D] (None: start of the sequence): (segment 0 [B, E], or [E] when
        every row uses the prior; segments 1 .. K-1 [B, K-1, E], each from its predecessor)."""
        dtype = routing_dtype(means)
        with torch.autocast(device_type=means.device.type, enabled=False):
            router = self.router_weight.to(dtype)  # [E, D]
            later = F.linear(means[:, :-1].to(dtype), router)  # [B, K-1, E]
            if previous_mean is not None:
                first = F.linear(previous_mean.to(dtype), router)  # [B, E]
            elif self.first_segment == "prior":
                first = self.prior_logits.to(dtype)  # [E]
            else:  # "self": the leaky control reads segment 0's own mean
                first = F.linear(means[:, 0].detach().to(dtype), router)  # [B, E]
            return first, later

    def _merge(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [..., E] -> merged weights w_in [..., D, H] and w_out [..., H, D]."""
        dtype = compute_dtype(self.experts.w_in)
        probs = probs.to(dtype)
        w_in, w_out = self.experts.w_in.to(dtype), self.experts.w_out.to(dtype)  # [E, D, H], [E, H, D]
        E = self.num_experts
        w_in = (probs @ w_in.view(E, -1)).view(*probs.shape[:-1], *w_in.shape[1:])  # [..., D, H]
        w_out = (probs @ w_out.view(E, -1)).view(*probs.shape[:-1], *w_out.shape[1:])  # [..., H, D]
        return w_in, w_out

    def _merged_ffn(self, tokens: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """tokens [N, c, D] through merged weights shared by all (w_in [D, H], w_out [H, D]) or
        their own (w_in [N, D, H], w_out [N, H, D])."""
        tokens = tokens.to(compute_dtype(tokens))
        return self.experts.activate(tokens @ w_in) @ w_out  # [N, c, D]

    def _stats(self, probs: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        B, K, E = probs.shape
        C = self.segment_size
        # A segment counts if it holds a real token: with padding at the end, its first one.
        routed = None if mask is None else mask[:, ::C].reshape(B * K)  # [B*K]
        flat = probs.reshape(B * K, E)  # [B*K, E]
        expert_weights = masked_mean(flat, routed)  # [E], sums to 1
        return {
            "routing_entropy": masked_mean(entropy(flat, dim=-1), routed).float(),
            "expert_weights": expert_weights.float(),
            "expert_weight_spread": coefficient_of_variation(expert_weights).float(),
        }

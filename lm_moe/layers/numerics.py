"""Numerics every layer shares: the dtypes computations run in, and masked means, entropies and
spreads of routing weights."""

import torch


def routing_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for low-precision inputs, float64 kept as is (reference tests compare in float64).
    Routing math (softmaxes, log-sum-exps, weight sums) runs in it, also under autocast."""
    return torch.promote_types(x.dtype, torch.float32)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: the autocast dtype inside an autocast region, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` [N, ...] over the rows where `valid` [N] is True (all rows if None)."""
    if valid is None:
        return values.mean(0)
    weights = valid.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))  # [N, 1, ...]
    return (values * weights).sum(0) / weights.sum().clamp_min(1)


def clamp_to_tiny(total: torch.Tensor) -> torch.Tensor:
    """`total`, a sum of non-negative weights, raised to at least the smallest normal number of its
    dtype: a sum over nothing (all padding, or weights that underflowed) then divides its weighted
    sum, itself 0, to 0 instead of NaN."""
    return total.clamp_min(torch.finfo(total.dtype).tiny)


def entropy(probs: torch.Tensor, dim: int) -> torch.Tensor:
    """Entropy in nats of the distributions along `dim` (0 log 0 = 0), in one fused pass."""
    return torch.special.entr(probs).sum(dim=dim)


def softmax_entropy(probs: torch.Tensor, logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Entropy in nats along `dim` of `probs`, the softmax of `logits` over the entries where
    `probs` > 0. Entries a caller zeroed (padding) must have a logit no larger than the kept ones,
    such as the finite fill value of a masked softmax; an all-zero row scores 0.

    H = logsumexp(L) - sum p L, and logsumexp(L) = max L - log max p (softmax keeps the order).
    Two max-reductions and a dot product: no log per element, unlike `entropy`, and no arg-max.
    """
    top = probs.amax(dim=dim)
    log_normalizer = logits.amax(dim=dim) - top.log()
    return torch.where(top > 0, log_normalizer - torch.linalg.vecdot(probs, logits, dim=dim), 0)


def entropy_from_sums(total: torch.Tensor, weighted_log_total: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the distribution w / sum(w) of positive weights w, from two sums alone:
    total = sum w and weighted_log_total = sum w log w (elementwise over any shape):
    H = log(sum w) - sum(w log w) / sum w. A sum over nothing gives log(tiny), finite: for the
    caller to mask out."""
    total = clamp_to_tiny(total)
    return total.log() - weighted_log_total / total


def coefficient_of_variation(values: torch.Tensor) -> torch.Tensor:
    """The spread of `values` (usage of each expert or slot) relative to their mean: population
    std / mean over all entries. 0 = all equal."""
    return values.std(correction=0) / values.mean()

"""Batches for layers that mix groups of rows: the multiple a model's batch size must be, and
filling a short batch up to it."""

import math

import torch
from torch import nn

from lm_moe.layers.feed_forward_layer import feed_forward_layers


def required_batch_multiple(module: nn.Module) -> int:
    """The multiple of which a batch through `module` must be: the least common multiple of its FFN
    layers' `batch_multiple` (1 without any)."""
    return math.lcm(1, *(layer.batch_multiple for layer in feed_forward_layers(module)))


def fill_groups(rows: torch.Tensor, multiple: int) -> torch.Tensor:
    """rows [B, ...] -> [B', ...], B' the next multiple of `multiple`, by repeating rows from the
    start: a short last evaluation batch still fills whole groups. The added rows share groups
    with real ones (as any batch-mates do in Mixture of Tokens); callers drop their outputs."""
    missing = -rows.shape[0] % multiple
    if missing == 0:
        return rows
    return torch.cat([rows, rows[torch.arange(missing, device=rows.device) % rows.shape[0]]])  # [B', ...]

"""Pre-norm transformer block: causal self-attention, then any FFN layer (`FeedForwardLayer`); and
what both models do with their blocks: choose which get the configured FFN, and run them in turn.

When decoding, the block runs the FFN's `decode(x, state) -> (y, new_state)` on the new tokens,
state None at the start, and keeps the state in its `BlockCache`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lm_moe.argument_checks import require_choice
from lm_moe.layers.attention import CausalSelfAttention, KVCache
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.layer_output import LayerAux


MOE_BLOCKS = ("all", "every_other", "second_half", "none")


def moe_block_indices(moe_blocks: str, n_layer: int) -> set[int]:
    """Which of the n_layer blocks get the configured FFN (the others are dense)."""
    require_choice("moe_blocks", moe_blocks, MOE_BLOCKS)
    if moe_blocks == "all":
        return set(range(n_layer))
    if moe_blocks == "every_other":
        return set(range(1, n_layer, 2))
    if moe_blocks == "second_half":
        return set(range(n_layer // 2, n_layer))
    return set()


@dataclass
class BlockCache:
    """What one block remembers between decoding calls."""

    kv: KVCache
    ffn_state: Any = None  # whatever the FFN's decode() returned last; None for per-token FFNs


def run_ffn(ffn: FeedForwardLayer, x: torch.Tensor, cache: BlockCache | None) -> tuple[torch.Tensor, LayerAux]:
    """The FFN on x [B, T, D]; when decoding, through its decode() (updating cache.ffn_state)."""
    if cache is None:
        return ffn(x)
    y, cache.ffn_state = ffn.decode(x, cache.ffn_state)
    return y, LayerAux.empty(x)  # decode() reports no loss or stats: decoding is not training


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_head: int, ffn: FeedForwardLayer, dropout: float = 0.0, rotary: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_head, dropout=dropout, rotary=rotary)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: BlockCache | None = None) -> tuple[torch.Tensor, LayerAux]:
        """x [B, T, D] -> (x [B, T, D], the FFN's aux); with a cache, x holds only the new tokens."""
        x = x + self.drop(self.attn(self.ln1(x), None if cache is None else cache.kv))  # [B, T, D]
        y, aux = run_ffn(self.ffn, self.ln2(x), cache)  # [B, T, D]
        x = x + self.drop(y)  # [B, T, D]
        return x, aux


def run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, caches: Sequence[BlockCache] | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """x [B, T, D] through every block in turn (with its cache, when decoding) -> (x [B, T, D], the
    sum of the FFN layers' aux losses, their stats by block: "block_3" -> stats)."""
    aux_loss = torch.zeros((), device=x.device)
    layer_stats = {}
    for i, block in enumerate(blocks):
        x, aux = block(x) if caches is None else block(x, caches[i])  # [B, T, D]
        aux_loss = aux_loss + aux.loss
        if aux.stats:
            layer_stats[f"block_{i}"] = aux.stats
    return x, aux_loss, layer_stats

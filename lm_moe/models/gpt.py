"""A GPT-style causal language model whose FFN blocks can be any layer with the MoE layer contract.

Notation: B batch, T tokens in this call, P tokens already cached, D width, V vocabulary.

Cached decoding: `cache = model.new_cache(B)`, then call `model(ids, cache=cache)` on the prompt
(in one piece or several) and on each new token. The cache is updated in place (and also returned
as `output.cache`); it holds one attention KV cache and one FFN decode state per block.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lm_moe.layers.attention import KVCache
from lm_moe.layers.block import BlockCache, TransformerBlock, moe_block_indices, run_blocks
from lm_moe.layers.feed_forward_layer import FeedForwardLayer, build_feed_forward_layer
from lm_moe.argument_checks import require_choice, require_fraction, require_positive_int
from lm_moe.layers.ffn import ACTIVATIONS, DenseFFN, ExpertWeights, default_hidden_dim

POSITIONS = ("learned", "rotary")
INIT_STD = 0.02


def require_causal_ffns(blocks: nn.ModuleList) -> None:
    """Refuse FFN layers that declare `is_causal = False`: in a decoder they would see the future."""
    for i, block in enumerate(blocks):
        if not block.ffn.is_causal:
            raise ValueError(
                f"block {i}'s FFN {type(block.ffn).__name__} is not causal: its outputs depend on later tokens, "
                "so a language model built with it sees the future. Choose a causal layer (DenseFFN, TopKMoE "
                "with position-priority capacity, the causal Soft MoE variants), or set allow_noncausal: true "
                "to build it anyway (e.g. as a negative control for the leakage suite)."
            )


@dataclass
class GPTCache:
    """Decoding state of a whole model: one `BlockCache` per block, all at the same length."""

    batch_size: int
    blocks: list[BlockCache]

    @property
    def length(self) -> int:
        """Tokens seen so far (the position of the next token)."""
        return self.blocks[0].kv.length


@dataclass
class GPTOutput:
    logits: torch.Tensor  # [B, T, V]
    aux_loss: torch.Tensor  # scalar: sum of the FFN layers' aux losses
    layer_stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "block_3" -> stats
    cache: GPTCache | None = None  # the (updated) cache when called with one


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        dim: int = 256,
        ffn: Callable[[int], FeedForwardLayer] | None = None,
        moe_blocks: str = "all",
        dense_hidden_dim: int | None = None,
        dense_activation: str = "gelu",
        positions: str = "rotary",
        dropout: float = 0.0,
        allow_noncausal: bool = False,
    ):
        """Blocks outside `moe_blocks` (all of them without `ffn`) get a dense MLP with
        `dense_activation`, of width `dense_hidden_dim` (None: the FLOPs of a 4 * dim GELU MLP, see
        `default_hidden_dim`). Rotary positions and GELU are the defaults: the strongest dense and
        MoE models measured at this scale (docs/moe_baseline.md).
        `allow_noncausal=True` lets a layer that sees the future (`is_causal = False`, e.g. the
        naive SoftMoE) into this decoder, as a control for the leakage suite; otherwise it is refused."""
        super().__init__()
        for name, value in [("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer),
                            ("n_head", n_head), ("dim", dim)]:
            require_positive_int(name, value)
        if dim % n_head:
            raise ValueError(f"dim must be divisible by n_head, got dim={dim}, n_head={n_head}")
        if ffn is not None and not callable(ffn):
            raise ValueError(f"ffn must be a callable dim -> FeedForwardLayer or None, got {ffn!r}")
        moe_indices = moe_block_indices(moe_blocks, n_layer)
        if dense_hidden_dim is not None:
            require_positive_int("dense_hidden_dim", dense_hidden_dim)
        require_choice("dense_activation", dense_activation, ACTIVATIONS)
        require_choice("positions", positions, POSITIONS)
        require_fraction("dropout", dropout)

        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.positions = positions
        self.moe_indices = moe_indices if ffn is not None else set()

        def block_ffn(i: int) -> FeedForwardLayer:
            if i in self.moe_indices:
                return build_feed_forward_layer(ffn, dim, "ffn")
            return DenseFFN(dim, dense_hidden_dim or default_hidden_dim(dim, dense_activation), dense_activation)

        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Embedding(block_size, dim) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, n_head, block_ffn(i), dropout=dropout, rotary=positions == "rotary")
            for i in range(n_layer)
        )
        if not allow_noncausal:
            require_causal_ffns(self.blocks)
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embeddings
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2: N(0, 0.02) everywhere; projections that write into the residual stream get
        0.02 / sqrt(2 * n_layer), since each block adds two of them; expert weights times their
        `init_scale` (see ExpertWeights). Other raw parameters of the FFN
        layers (routers, slot embeddings, scales) keep their layer's own init."""
        residual_std = INIT_STD / math.sqrt(2 * self.n_layer)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, ExpertWeights):
                nn.init.normal_(module.w_in, std=INIT_STD * module.init_scale)
                nn.init.normal_(module.w_out, std=residual_std * module.init_scale)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)

    def num_parameters(self) -> int:
        """Parameters of the model, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int) -> GPTCache:
        """An empty decoding cache for `batch_size` sequences of up to block_size tokens."""
        require_positive_int("batch_size", batch_size)
        return GPTCache(batch_size, [BlockCache(KVCache(self.block_size)) for _ in self.blocks])

    def forward(self, input_ids: torch.Tensor, cache: GPTCache | None = None) -> GPTOutput:
        """input_ids [B, T] -> logits [B, T, V]; with a cache, input_ids are the tokens after its P."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = 0 if cache is None else cache.length
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"input_ids has batch size {B} but the cache was made for {cache.batch_size}")
        if past + T > self.block_size:
            raise ValueError(
                f"sequence length {past + T} (cached {past} + new {T}) exceeds block_size {self.block_size}"
            )

        x = self.wte(input_ids)  # [B, T, D]
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(past, past + T, device=input_ids.device))  # [B, T, D]
        x = self.drop(x)
        x, aux_loss, layer_stats = run_blocks(self.blocks, x, None if cache is None else cache.blocks)  # [B, T, D]
        logits = self.lm_head(self.ln_f(x))  # [B, T, V]
        return GPTOutput(logits, aux_loss, layer_stats, cache)

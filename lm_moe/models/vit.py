"""A Vision Transformer classifier whose FFN blocks can be any layer with the MoE layer contract.

Notation: B batch, C channels, S image side, p patch side, T tokens, D width, K classes.

    images [B, C, S, S] -> patches (a p x p convolution with stride p) -> tokens [B, (S/p)^2, D]
    (+ a class token in front when pool="cls") + learned position embeddings
    -> depth x pre-norm encoder block: x += attention(LN(x)); x += ffn(LN(x))
    -> LN -> class token or mean over tokens -> linear head -> logits [B, K]

As in the Soft MoE paper, the FFNs (MLPs) of the second half of the blocks are MoE layers by
default (`moe_blocks`); the others are dense.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lm_moe.argument_checks import require_choice, require_fraction, require_positive_int
from lm_moe.layers.block import moe_block_indices, run_blocks
from lm_moe.layers.encoder_attention import EncoderSelfAttention
from lm_moe.layers.feed_forward_layer import FeedForwardLayer, build_feed_forward_layer
from lm_moe.layers.ffn import DenseFFN, ExpertWeights
from lm_moe.layers.layer_output import LayerAux

POOLS = ("cls", "mean")
CHANNELS = (1, 3)


@dataclass
class ViTOutput:
    logits: torch.Tensor  # [B, K]
    aux_loss: torch.Tensor  # scalar: sum of the FFN layers' aux losses
    layer_stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "block_3" -> stats


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: non-causal self-attention, then the FFN layer."""

    def __init__(self, dim: int, n_head: int, ffn: FeedForwardLayer, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = EncoderSelfAttention(dim, n_head, dropout=dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = ffn  # blocks.<i>.mlp.*: the name of its weights in every ViT checkpoint and export
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, LayerAux]:
        """x [B, T, D] -> (x [B, T, D], the FFN's aux)."""
        x = x + self.drop(self.attn(self.ln1(x)))  # [B, T, D]
        y, aux = self.mlp(self.ln2(x))  # [B, T, D]
        return x + self.drop(y), aux


class ViT(nn.Module):
    def __init__(
        self,
        num_classes: int,
        image_size: int,
        channels: int,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 6,
        n_head: int = 4,
        ffn: Callable[[int], FeedForwardLayer] | None = None,
        moe_blocks: str = "second_half",
        dense_hidden_dim: int | None = None,
        pool: str = "mean",
        dropout: float = 0.0,
    ):
        """`ffn` builds the FFN of the blocks `moe_blocks` selects (all|every_other|second_half|none)
        from the width D, e.g. a `SoftMoE` with its other arguments bound; None = dense everywhere.
        The other blocks get a dense GELU MLP of width `dense_hidden_dim` (default 4 * dim)."""
        super().__init__()
        for name, value in [("num_classes", num_classes), ("image_size", image_size), ("patch_size", patch_size),
                            ("dim", dim), ("depth", depth), ("n_head", n_head)]:
            require_positive_int(name, value)
        require_choice("channels", channels, CHANNELS)
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not divisible by patch_size {patch_size}: the patches must tile the "
                "image; choose a patch_size that divides it, or another data.image_size"
            )
        if dim % n_head:
            raise ValueError(f"dim must be divisible by n_head, got dim={dim}, n_head={n_head}")
        if ffn is not None and not callable(ffn):
            raise ValueError(f"ffn must be a callable dim -> FeedForwardLayer or None, got {ffn!r}")
        moe_indices = moe_block_indices(moe_blocks, depth)
        if dense_hidden_dim is not None:
            require_positive_int("dense_hidden_dim", dense_hidden_dim)
        require_choice("pool", pool, POOLS)
        require_fraction("dropout", dropout)

        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.depth = depth
        self.pool = pool
        self.moe_indices = moe_indices if ffn is not None else set()
        self.num_patches = (image_size // patch_size) ** 2
        num_tokens = self.num_patches + (pool == "cls")

        def block_ffn(i: int) -> FeedForwardLayer:
            if i in self.moe_indices:
                return build_feed_forward_layer(ffn, dim, "ffn")
            return DenseFFN(dim, dense_hidden_dim or 4 * dim)

        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        # 1-D and an embedding table: AdamW's grouping leaves both out of weight decay.
        self.cls_token = nn.Parameter(torch.zeros(dim)) if pool == "cls" else None
        self.pos_embed = nn.Embedding(num_tokens, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(dim, n_head, block_ffn(i), dropout) for i in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform projections and experts, LeCun-normal patches, zero biases, N(0, 1)
        position embeddings (the patch embeddings' scale, so positions tell tokens apart from the
        first step), PyTorch's default head. Routers, slot embeddings and scales of the FFN layers
        keep their layer's own init. Measured on the offline MNIST subset (4 blocks of width 64,
        validation accuracy after 105 steps): 62% with N(0, 0.02) positions and a zero head, 89%
        with this init."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.head:
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, ExpertWeights):
                for weight in (module.w_in, module.w_out):  # [E, fan_in, fan_out]
                    bound = module.init_scale * math.sqrt(6 / (weight.shape[1] + weight.shape[2]))
                    nn.init.uniform_(weight, -bound, bound)
        fan_in = self.channels * self.patch_embed.kernel_size[0] * self.patch_embed.kernel_size[1]
        nn.init.normal_(self.patch_embed.weight, std=fan_in**-0.5)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.pos_embed.weight, std=1.0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, images: torch.Tensor) -> ViTOutput:
        """images [B, C, S, S] -> logits [B, K]."""
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape [B, {', '.join(map(str, expected))}], got {tuple(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, T, D], patches in row-major order
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)  # [B, 1 + T, D]
        x = self.drop(x + self.pos_embed.weight)  # [B, T, D]
        x, aux_loss, layer_stats = run_blocks(self.blocks, x)  # [B, T, D]
        x = self.ln_f(x)  # [B, T, D]
        pooled = x[:, 0] if self.pool == "cls" else x.mean(dim=1)  # [B, D]
        return ViTOutput(self.head(pooled), aux_loss, layer_stats)

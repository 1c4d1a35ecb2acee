"""Non-causal multi-head self-attention on PyTorch's SDPA: every token sees every token (encoders, ViT).

Notation: B batch, T tokens, H heads, hd head width (D / H).

The decoder's `CausalSelfAttention` (attention.py) adds a causal mask, rotary positions and a KV
cache; an encoder needs none of them, so this module is the plain all-to-all form.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lm_moe.argument_checks import require_fraction, require_positive_int


class EncoderSelfAttention(nn.Module):
    def __init__(self, dim: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        require_positive_int("dim", dim)
        require_positive_int("n_head", n_head)
        if dim % n_head:
            raise ValueError(f"dim must be divisible by n_head, got dim={dim}, n_head={n_head}")
        require_fraction("dropout", dropout)
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)  # writes into the residual stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)  # [B, T, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, hd] each
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, hd]
        y = y.transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        return self.proj(y)

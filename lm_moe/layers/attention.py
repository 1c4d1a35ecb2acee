"""Causal multi-head self-attention on PyTorch's SDPA, with optional rotary positions and a KV cache.

Notation: B batch, T new tokens, P tokens already in the cache, H heads, hd head width (D / H).

Decoding: a query at absolute position P+i sees every cached key and the new keys up to P+i. With
an empty cache that is SDPA's `is_causal`; with one new token it is "see everything"; otherwise
(a prefill split into pieces) an explicit [T, P+T] boolean mask. Rotary embeddings rotate q and k
by their absolute positions, so cached keys never need re-rotating.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lm_moe.argument_checks import require_fraction, require_positive_float, require_positive_int


class KVCache:
    """Keys and values of one attention layer, preallocated to `max_len` positions.

    The buffers are written in place and read back as views, so decoding T tokens copies each key
    once (O(T)); concatenating a growing tensor every step would copy O(T^2). They are allocated on
    the first write, in that write's dtype and device, so a cache works under autocast and never
    needs to know the model's dtype. Meant for inference (no_grad / inference_mode): the in-place
    writes would clobber tensors autograd saved from earlier steps.
    """

    def __init__(self, max_len: int):
        self.max_len = require_positive_int("max_len", max_len)
        self.length = 0  # positions filled so far
        self.k: torch.Tensor | None = None  # [B, H, max_len, hd]
        self.v: torch.Tensor | None = None  # [B, H, max_len, hd]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys and values [B, H, T, hd]; return all of them so far [B, H, P+T, hd]."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {start} used + {k.shape[2]} new exceed it")
        if self.k is None:
            B, H, _, hd = k.shape
            self.k = k.new_empty(B, H, self.max_len, hd)
            self.v = v.new_empty(B, H, self.max_len, hd)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos and sin [T, hd] of the angles position * base^(-2i/hd), each frequency used for both halves."""
    work = torch.promote_types(dtype, torch.float32)  # fp16 angles would lose whole turns at large positions
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim)  # [hd/2]
    angles = positions.to(work)[:, None] * inv_freq[None, :]  # [T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, hd]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) of x [B, H, T, hd] by the angles behind cos and sin [T, hd]."""
    first, second = x.chunk(2, dim=-1)  # [B, H, T, hd/2] each
    rotated_half = torch.cat([-second, first], dim=-1)  # [B, H, T, hd]
    return x * cos + rotated_half * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_head: int, dropout: float = 0.0, rotary: bool = False, rope_base: float = 10000):
        super().__init__()
        require_positive_int("dim", dim)
        require_positive_int("n_head", n_head)
        if dim % n_head:
            raise ValueError(f"dim must be divisible by n_head, got dim={dim}, n_head={n_head}")
        if rotary and (dim // n_head) % 2:
            raise ValueError(f"rotary positions need an even head width dim/n_head, got {dim}/{n_head}")
        require_fraction("dropout", dropout)
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.dropout = dropout
        self.rotary = rotary
        self.rope_base = require_positive_float("rope_base", rope_base)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)  # writes into the residual stream

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; with a cache, x holds the tokens after the P cached ones."""
        B, T, D = x.shape
        past = 0 if cache is None else cache.length
        q, k, v = self.qkv(x).split(D, dim=2)  # [B, T, D] each
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, hd]

        if self.rotary:
            positions = torch.arange(past, past + T, device=x.device)  # [T], absolute
            cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_base, q.dtype)  # [T, hd]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # [B, H, P+T, hd]

        # SDPA's is_causal aligns the mask top-left, which is only right when there is no past.
        mask = None
        if past > 0 and T > 1:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)  # [T, P+T]
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=past == 0 and T > 1,
        )  # [B, H, T, hd]
        y = y.transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        return self.proj(y)

"""The check every FFN layer makes of its input: x [B, T, D] of its width, and an optional bool mask [B, T]."""

import torch


def check_layer_input(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> None:
    """Raise ValueError, naming the shapes, unless x is [B, T, dim] with B, T >= 1 and mask is None
    or bool [B, T]."""
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must be [batch, tokens, dim] with dim={dim}, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        # Routing over no tokens has no meaning (softmaxes over nothing, loads of 0/0).
        raise ValueError(f"x must hold at least one sequence of at least one token, got shape {tuple(x.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:2]):
        raise ValueError(
            f"mask must be a bool tensor of shape [batch, tokens] = {tuple(x.shape[:2])} (True = real token), "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )

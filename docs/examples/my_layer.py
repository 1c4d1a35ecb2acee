"""A layer of your own for lm_moe: a dense MLP whose output each token scales by a gate it computes.

    y_t = sigmoid(g . x_t) * W_out gelu(W_in x_t)

Every output depends on its own token only, so the layer is causal (the default `is_causal = True`,
which `python -m lm_moe.causality` tests) and per-example deterministic.
"""

import torch
from torch import nn

from lm_moe.layers import FeedForwardLayer, LayerAux
from lm_moe.layers.inputs import check_layer_input


class GatedMLP(FeedForwardLayer):
    """x [B, T, D], mask [B, T] | None -> (y [B, T, D], LayerAux). `dim` comes from the model."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))
        self.gate = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        check_layer_input(x, mask, self.dim)  # a wrong shape or mask dtype: a ValueError that names it
        gate = torch.sigmoid(self.gate(x))  # [B, T, 1]
        y = gate * self.mlp(x)  # [B, T, D]
        if mask is not None:
            y = y * mask.unsqueeze(-1)  # the contract: padded positions output 0
        # No loss to add; every scalar stat is logged as moe/block_<i>/<name> on the logging steps.
        return y, LayerAux(loss=torch.zeros((), device=x.device), stats={"gate_mean": gate.detach().mean()})

    def parameter_macs_per_token(self) -> float:
        """The layer's cost as lm_moe's profiler counts it: every parameter is used once per token."""
        return sum(parameter.numel() for parameter in self.parameters())

"""The base class of the FFN layers the models build: the contract, and what code reads off a layer."""

import torch
from torch import nn

from lm_moe.layers.layer_output import LayerAux


class FeedForwardLayer(nn.Module):
    """A layer that takes a transformer block's FFN place: x [B, T, D], mask [B, T] | None ->
    (y [B, T, D], LayerAux).

    The models' `ffn` (GPT) and `mlp` (ViT) settings take a subclass: its class_path in a config,
    with `dim` given by the model. A layer of your own subclasses this one to be accepted there.
    The class attributes describe it to the rest of lm_moe:

    is_causal: whether y[:, t] depends on x[:, :t + 1] only. The GPT refuses a layer that sets it
        False; the leakage suite (`lm_moe.causality`) tests the claim of one that leaves it True.
    per_example_deterministic: whether a row's outputs are independent of the other rows of the
        batch (False for a layer that mixes rows, such as Mixture of Tokens).
    no_weight_decay: names of parameters AdamW must leave undecayed (see `adamw_param_groups`).
    """

    is_causal: bool = True
    per_example_deterministic: bool = True
    no_weight_decay: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        raise NotImplementedError(f"{type(self).__name__} must define forward(x, mask=None) -> (y, LayerAux)")

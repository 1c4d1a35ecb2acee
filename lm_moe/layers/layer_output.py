"""The second half of every FFN-replacement layer's result: what training adds and what it logs."""

from dataclasses import dataclass, field

import torch


@dataclass
class LayerAux:
    """Auxiliary output of a layer: `forward(x) -> (y, LayerAux)`.

    loss:  scalar to add to the training loss (zero for layers without one).
    stats: detached tensors for logging (tokens per expert, router entropy, ...).
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def empty(like: torch.Tensor) -> "LayerAux":
        """No loss and nothing to log, on the device of `like`."""
        return LayerAux(loss=torch.zeros((), device=like.device, dtype=torch.float32))

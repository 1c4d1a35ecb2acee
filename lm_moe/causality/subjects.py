"""What the leakage checks run on: one FFN layer, or a whole language model.

A subject turns inputs into per-position outputs and knows how to make inputs, how to replace
their future, how to decode incrementally and what to differentiate. The checks in `checks.py`
only talk to this interface, so the same checks prove a layer and a model built from a config.
"""

from dataclasses import dataclass

import torch
from torch import nn

from lm_moe.layers.batch_groups import required_batch_multiple
from lm_moe.layers.feed_forward_layer import FeedForwardLayer, feed_forward_layers
from lm_moe.models.gpt import GPT


def _structure_sizes(module: nn.Module) -> tuple[set[int], int]:
    """The structure lengths of the FFN layers in `module` (where the probes must look closely) and
    the batch multiple they need (Mixture of Tokens decodes groups of sequences together)."""
    boundaries = {length for layer in feed_forward_layers(module) for length in layer.structure_lengths}
    return boundaries, required_batch_multiple(module)


def _starts(pieces: list[int]) -> list[int]:
    """Where each piece of a split sequence starts."""
    return [sum(pieces[:i]) for i in range(len(pieces))]


@dataclass
class LayerSubject:
    """An FFN layer with the layer contract, on float inputs [B, T, D] (float64 for exact checks)."""

    layer: FeedForwardLayer
    dim: int

    def __post_init__(self):
        self.boundaries, self.batch_multiple = _structure_sizes(self.layer)
        self.max_length = None  # a layer takes any length
        self.per_example = self.layer.per_example_deterministic

    @property
    def name(self) -> str:
        return type(self.layer).__name__

    def inputs(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(batch, length, self.dim, generator=generator, dtype=torch.float64)

    def replace_future(self, x: torch.Tensor, t: int, generator: torch.Generator, rows=slice(None)) -> torch.Tensor:
        """Positions after t of the given rows get large fresh noise."""
        changed = x.clone()
        noise = 10 * torch.randn(x[rows, t + 1 :].shape, generator=generator, dtype=x.dtype)
        changed[rows, t + 1 :] = noise
        return changed

    def run(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.layer(x, mask)[0]

    def decode(self, x: torch.Tensor, pieces: list[int]) -> torch.Tensor:
        """As the model decodes: through the layer's decode(), carrying its state."""
        state, outputs = None, []
        for piece in (x[:, start : start + length] for start, length in zip(_starts(pieces), pieces)):
            y, state = self.layer.decode(piece, state)
            outputs.append(y)
        return torch.cat(outputs, dim=1)

    def differentiable_view(self, x: torch.Tensor):
        """(leaf to differentiate, outputs): here the inputs themselves."""
        leaf = x.detach().requires_grad_()
        return leaf, self.run(leaf)

    def supports_padding(self) -> bool:
        return True

    def modules(self) -> nn.Module:
        return self.layer


@dataclass
class ModelSubject:
    """A GPT on token ids [B, T]; outputs are its logits. Its Jacobian is taken with respect to
    the token embeddings, the first float tensor of the network."""

    model: GPT

    def __post_init__(self):
        self.boundaries, self.batch_multiple = _structure_sizes(self.model)
        self.max_length = self.model.block_size
        self.per_example = all(layer.per_example_deterministic for layer in feed_forward_layers(self.model))

    @property
    def name(self) -> str:
        return "GPT"

    def inputs(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.model.vocab_size, (batch, length), generator=generator)

    def replace_future(self, ids: torch.Tensor, t: int, generator: torch.Generator, rows=slice(None)) -> torch.Tensor:
        changed = ids.clone()
        changed[rows, t + 1 :] = torch.randint(0, self.model.vocab_size, ids[rows, t + 1 :].shape, generator=generator)
        return changed

    def run(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(ids).logits

    def decode(self, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
        cache = self.model.new_cache(ids.shape[0])
        outputs = [self.model(ids[:, start : start + length], cache=cache).logits for start, length in zip(_starts(pieces), pieces)]
        return torch.cat(outputs, dim=1)

    def differentiable_view(self, ids: torch.Tensor):
        captured = {}

        def keep_embeddings(module, args, output):
            captured["embeddings"] = output

        handle = self.model.wte.register_forward_hook(keep_embeddings)
        try:
            logits = self.run(ids)
        finally:
            handle.remove()
        return captured["embeddings"], logits

    def supports_padding(self) -> bool:
        return False  # GPT has no padding mask; right padding is the future, covered by perturbation

    def modules(self) -> nn.Module:
        return self.model

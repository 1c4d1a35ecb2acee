"""The second half of every FFN-replacement layer's result: what training adds and what it logs."""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch


class DeferredStats(Mapping[str, torch.Tensor]):
    """Logging stats computed on first read, without gradients.

    A layer's stats cost several passes over its routing tensors (a tenth of a Soft MoE layer's
    training step), yet training logs them only every `log_every_n_steps`: the steps that never
    read them never pay. Until read or dropped, they keep their input tensors alive (autograd
    keeps most of those for the backward anyway); once computed, they release them.
    """

    def __init__(self, compute: Callable[[], dict[str, torch.Tensor]]):
        self._compute: Callable[[], dict[str, torch.Tensor]] | None = compute
        self._values: dict[str, torch.Tensor] = {}

    def _resolved(self) -> dict[str, torch.Tensor]:
        if self._compute is not None:
            with torch.no_grad():
                self._values = self._compute()
            self._compute = None
        return self._values

    def __bool__(self) -> bool:
        # Layers defer only stats they have: asking whether there are any must not compute them.
        return True

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._resolved()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())

    def __repr__(self) -> str:
        return f"DeferredStats({'pending' if self._compute is not None else self._values})"


def deferred_stats(compute: Callable[..., dict[str, torch.Tensor]], *args) -> Mapping[str, torch.Tensor]:
    """`compute(*args)` when first read. Inside torch.compile it runs at once, in the graph
    (a Python object holding a closure cannot leave a compiled region)."""
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return compute(*args)
    return DeferredStats(lambda: compute(*args))


@dataclass
class LayerAux:
    """Auxiliary output of a layer: `forward(x) -> (y, LayerAux)`.

    loss:  scalar to add to the training loss (zero for layers without one).
    stats: detached tensors for logging (tokens per expert, router entropy, ...); the MoE layers
           compute them when first read (`DeferredStats`). A stat's dtype says how the stats of
           data-parallel ranks combine into those of the global batch: an integer stat is a
           count, summed over the ranks; a floating one (a mean, fraction, entropy or loss) is
           averaged over them.
    """

    loss: torch.Tensor
    stats: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def empty(like: torch.Tensor) -> "LayerAux":
        """No loss and nothing to log, on the device of `like`."""
        return LayerAux(loss=torch.zeros((), device=like.device, dtype=torch.float32))

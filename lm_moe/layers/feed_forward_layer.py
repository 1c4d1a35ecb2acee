"""The contract of the FFN layers the models build (`FeedForwardLayer`), and the walk that finds them in a model."""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lm_moe.layers.layer_output import LayerAux


class FeedForwardLayer(nn.Module):
    """A layer that takes a transformer block's FFN place: x [B, T, D], mask [B, T] | None ->
    (y [B, T, D], LayerAux).

    The models' `ffn` setting (GPT's and the ViT's) takes a subclass: its class_path in a config,
    with `dim` given by the model. A layer of your own subclasses this one, implements `forward`
    (refusing bad input with `check_layer_input`) and overrides what differs from the defaults,
    which fit a layer that treats every token on its own. The rest of lm_moe knows a layer by
    these members only:

    forward, decode: the layer on whole sequences; incrementally, as a decoder generates.
    is_causal: whether y[:, t] depends on x[:, :t + 1] only. The GPT refuses a layer that sets it
        False; the leakage suite (`lm_moe.causality`) tests the claim of one that leaves it True.
    per_example_deterministic: whether a row's outputs are independent of the other rows of the
        batch (False for a layer that mixes rows, such as Mixture of Tokens).
    no_weight_decay: names of parameters AdamW must leave undecayed (see `adamw_param_groups`).
    structure_lengths: the lengths of the blocks of time the layer works in.
    batch_multiple: what the batch size must be a multiple of.
    parameter_macs_per_token: the layer's cost, as the profiler counts it.
    before_optimizer_step: what the layer does once per optimizer step (loss-free balancing);
        before_optimizer_step_of_model: the same for all of a model's layers of one class together.
    parameter_parts: which part (experts, router, ...) each parameter is, for freezing and per-part
        learning rates (`lm_moe.lit.fine_tuning`).
    upcycle_from_dense: start the layer's experts from a trained dense MLP (`lm_moe.lit.upcycling`).
    shard_experts: keep only this rank's experts, under expert parallelism.
    The stats in `LayerAux.stats` declare by their dtype how data-parallel ranks combine them.
    """

    is_causal: bool = True
    per_example_deterministic: bool = True
    no_weight_decay: tuple[str, ...] = ()
    # Expert parallelism: a layer whose `experts` (an ExpertWeights) it runs only through the
    # paths of lm_moe.layers.expert_parallel sets this True; `expert_shard` is then its share.
    supports_expert_parallelism: bool = False
    expert_shard = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerAux]:
        """The layer on whole sequences, as in training and evaluation.

        Args:
            x: [B, T, D] float, B, T >= 1.
            mask: [B, T] bool, True = real token, or None (all real). Padding takes no part in
                any other token's output.
        Returns:
            y: [B, T, D], 0 at padding.
            aux: the loss to add to the training loss and the stats to log (see `LayerAux`).
        """
        raise NotImplementedError(f"{type(self).__name__} must define forward(x, mask=None) -> (y, LayerAux)")

    def decode(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """The next tokens of every sequence, given what earlier calls returned.

        Args:
            x: [B, t, D], the t >= 1 tokens after those the state has seen.
            state: what the previous call returned; None at the start of the sequences.
        Returns:
            y: [B, t, D], what `forward` gives these positions on the whole sequence (for a causal
                layer; decoding reports no loss or stats).
            state: to pass to the next call.

        By default the layer runs on the new tokens alone and keeps no state: right for a layer
        that treats every token on its own. A layer that mixes tokens over time overrides this.
        """
        return self(x)[0], None

    @property
    def structure_lengths(self) -> tuple[int, ...]:
        """The lengths, in tokens, of the blocks of time the layer works in (chunks, segments): the
        leakage suite splits sequences at and around their multiples, where a leak from one block
        to the next would show. None by default."""
        return ()

    @property
    def batch_multiple(self) -> int:
        """The batch size must be a multiple of this: a layer that mixes groups of rows needs whole
        groups (training refuses other batch sizes, evaluation and decoding fill their batches).
        1 by default."""
        return 1

    def parameter_macs_per_token(self) -> float:
        """Multiply-adds with parameters per token: the layer's cost as `lm_moe.profiling.model_cost`
        counts it (a dense layer's parameter count; for a sparse or pooled layer, the parameters
        its tokens use, in the share they use them)."""
        raise NotImplementedError(f"{type(self).__name__} must define parameter_macs_per_token() to be costed")

    def parameter_parts(self) -> dict[str, str]:
        """The part each parameter belongs to, by its name in the layer: "experts" (the routed
        experts' weights, a submodule named `experts`), "shared_experts" (what every token passes
        through: a submodule or parameter whose name starts with `shared`) or "router" (the rest:
        what decides where tokens go and how outputs mix, such as routers, slot embeddings, scales).
        A layer whose parameters follow other names overrides this."""
        parts = {}
        for name, _ in self.named_parameters():
            top = name.split(".")[0]
            parts[name] = "experts" if top == "experts" else "shared_experts" if top.startswith("shared") else "router"
        return parts

    def upcycle_from_dense(self, dense, noise: float = 0.0) -> None:
        """Sparse upcycling (Komatsuzaki et al., 2022): every expert starts as a copy of `dense`, the
        trained MLP (an `ExpertWeights` of one expert) this layer replaces, with relative noise
        `noise` (see `ExpertWeights.copy_from`); the routing keeps its fresh initialisation. By
        default every `ExpertWeights` of the layer is copied into, shared experts included; one of
        another width is refused with a ValueError naming it. A layer that can start out computing
        exactly what the dense MLP computes adjusts the copies (TopKMoE)."""
        from lm_moe.layers.ffn import ExpertWeights  # ffn.py builds on this module

        for name, module in self.named_modules():
            if isinstance(module, ExpertWeights):
                try:
                    module.copy_from(dense, noise)
                except ValueError as error:
                    raise ValueError(f"{type(self).__name__}.{name}: {error}; upcycling copies the dense MLP into "
                                     "experts of its own width") from None

    def shard_experts(self, shard) -> None:
        """Expert parallelism: keep only this rank's share of `experts` (`shard`, an
        `lm_moe.layers.expert_parallel.ExpertShard`); the layer's expert paths then send the rows
        to the ranks that hold their experts. Refused by a layer that does not support it."""
        if not self.supports_expert_parallelism:
            raise ValueError(f"{type(self).__name__} does not support expert parallelism (the layers that do: "
                             "TopKMoE, ReMoE, SoftMoE and the causal variants V1-V3)")
        from lm_moe.layers.expert_parallel import keep_shard  # it builds on ffn.py, which builds on this module

        keep_shard(self.experts, shard)
        self.expert_shard = shard

    def before_optimizer_step(self) -> None:
        """Called by the training loop once per optimizer step, on every data-parallel rank, after
        the backward passes of all its micro-batches and before the optimizer steps: the place for
        state that follows the whole step rather than one forward (loss-free balancing's expert
        bias). Nothing by default."""

    @classmethod
    def before_optimizer_step_of_model(cls, layers: list["FeedForwardLayer"]) -> None:
        """The per-step updates of all the layers of this class in one model, in model order
        (`end_of_step` calls it once per class): each layer's own `before_optimizer_step` by
        default. A class overrides it for state its layers steer together (ReMoE's model-wide
        L1 coefficient)."""
        for layer in layers:
            layer.before_optimizer_step()


def feed_forward_layers(module: nn.Module) -> list[FeedForwardLayer]:
    """The FFN layers in `module`, itself included."""
    return [layer for layer in module.modules() if isinstance(layer, FeedForwardLayer)]


def end_of_step(module: nn.Module) -> None:
    """What a training loop does once per optimizer step, after the backward passes of all its
    micro-batches and before the optimizer steps: for every FFN layer in `module`, its sharded
    experts' gradients averaged over their replicas (expert parallelism), then the layer's own
    per-step updates (`before_optimizer_step_of_model`, once per class of layer)."""
    layers = feed_forward_layers(module)
    for layer in layers:
        if layer.expert_shard is not None:
            layer.expert_shard.average_gradients(layer.experts)
    for kind in dict.fromkeys(type(layer) for layer in layers):  # each class once, in model order
        kind.before_optimizer_step_of_model([layer for layer in layers if type(layer) is kind])


def build_feed_forward_layer(factory: Callable[[int], FeedForwardLayer], dim: int, setting: str) -> FeedForwardLayer:
    """`factory(dim)`, refused with ValueError unless it is a `FeedForwardLayer`: the models know a
    layer only through that contract. `setting` names the factory in the message."""
    layer = factory(dim)
    if not isinstance(layer, FeedForwardLayer):
        raise ValueError(f"{setting}(dim) must build a FeedForwardLayer, got {type(layer).__name__}")
    return layer

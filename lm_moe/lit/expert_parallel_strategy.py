"""Expert parallelism combined with data parallelism, as a Lightning strategy.

On `world = dp x ep` processes, ranks [g*ep, (g+1)*ep) form expert-parallel group g: each of its
ranks holds E / ep experts of every MoE layer, and the tokens' rows travel to them by all-to-all
(lm_moe.layers.expert_parallel). Every parameter outside the experts is data-parallel over all
ranks (DDP, which is told to leave the expert shards alone: no find_unused_parameters); the ranks
i, i + ep, i + 2 ep, ... hold the same shard, and the training module (MoEModule) averages the
shard's gradients over them before the optimizer steps. Gradient clipping takes the norm of the
whole model.

Checkpoints hold one full state dict, the experts gathered (model weights and the optimizer's
moments), so they load at any `ep`, in one process too, and a run resumes at another `ep`.
"""

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from lm_moe.argument_checks import require_positive_int
from lm_moe.layers.expert_parallel import ExpertShard
from lm_moe.layers.feed_forward_layer import feed_forward_layers
from lm_moe.layers.ffn import DenseFFN


def sharded_layers(module: torch.nn.Module) -> list:
    """The FFN layers of `module` whose experts are sharded."""
    return [layer for layer in feed_forward_layers(module) if layer.expert_shard is not None]


def sharded_parameters(module: torch.nn.Module) -> dict[int, ExpertShard]:
    """id(parameter) -> its layer's shard, for every expert parameter held as a shard."""
    return {id(parameter): layer.expert_shard for layer in sharded_layers(module) for parameter in layer.experts.parameters()}


def shard_moe_layers(module: torch.nn.Module, shard: ExpertShard) -> None:
    """Keep `shard`'s experts of every MoE layer of `module` (a ValueError from a layer that does
    not support it) and tell DistributedDataParallel to leave them out of its all-reduce."""
    for layer in feed_forward_layers(module):
        if not isinstance(layer, DenseFFN):
            layer.shard_experts(shard)
    sharded = sharded_parameters(module)
    names = [name for name, parameter in module.named_parameters() if id(parameter) in sharded]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


class ExpertParallelStrategy(DDPStrategy):
    """DDP over all ranks, with the MoE layers' experts split over groups of `expert_parallel_size`
    ranks (it must divide the number of processes and every layer's number of experts). The layers
    that support it: TopKMoE, ReMoE, SoftMoE and the causal variants V1-V3; a model with another MoE
    layer is refused. Other arguments are DDPStrategy's."""

    def __init__(self, expert_parallel_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.expert_parallel_size = require_positive_int("expert_parallel_size", expert_parallel_size)

    def setup(self, trainer) -> None:
        # Before DDP wraps the model and the optimizer is built: both must see the shards. (A
        # checkpoint's full weights were loaded into the full model just before this.)
        self._shard_experts()
        super().setup(trainer)

    def _shard_experts(self) -> None:
        world, ep = self.world_size, self.expert_parallel_size
        if world % ep:
            raise ValueError(f"expert_parallel_size={ep} must divide the number of processes, {world}")
        # Every rank creates every group, in the same order, as torch.distributed requires.
        expert_groups = [dist.new_group(list(range(start, start + ep))) for start in range(0, world, ep)]
        replica_groups = [dist.new_group(list(range(index, world, ep))) for index in range(ep)] if world > ep else None
        shard = ExpertShard.of_group(expert_groups[self.global_rank // ep],
                                     replica_groups[self.global_rank % ep] if replica_groups else None,
                                     gradient_divisor=world)
        shard_moe_layers(self.lightning_module, shard)

    def lightning_module_state_dict(self) -> dict:
        """The full state dict: every rank takes part in gathering the expert shards."""
        state = super().lightning_module_state_dict()
        sharded = sharded_parameters(self.lightning_module)
        for name, parameter in self.lightning_module.named_parameters():
            if id(parameter) in sharded:
                state[name] = sharded[id(parameter)].gather(parameter.detach())
        return state

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        """Full weights into a model whose experts may already be sharded: each rank takes its shard."""
        sharded = sharded_parameters(self.lightning_module)
        state = dict(checkpoint["state_dict"])
        for name, parameter in self.lightning_module.named_parameters():
            if id(parameter) in sharded and state[name].shape != parameter.shape:
                state[name] = sharded[id(parameter)].local(state[name])
        self.lightning_module.load_state_dict(state, strict=strict)

    def _optimizer_parameters(self, optimizer) -> list[torch.nn.Parameter]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        return [parameter for group in optimizer.param_groups for parameter in group["params"]]

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's state with the expert shards' moments gathered, as for the weights."""
        state = super().optimizer_state(optimizer)
        sharded = sharded_parameters(self.lightning_module)
        for index, parameter in enumerate(self._optimizer_parameters(optimizer)):
            if id(parameter) in sharded and index in state["state"]:
                # A new dict: the state dict's entries are the optimizer's live ones.
                state["state"][index] = {
                    key: sharded[id(parameter)].gather(value) if torch.is_tensor(value) and value.shape == parameter.shape
                    else value
                    for key, value in state["state"][index].items()}
        return state

    def load_optimizer_state_dict(self, checkpoint) -> None:
        """Full moments into the sharded optimizer: each rank takes its shard's."""
        sharded = sharded_parameters(self.lightning_module)
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            for index, parameter in enumerate(self._optimizer_parameters(optimizer)):
                moments = saved["state"].get(index, {})
                if id(parameter) in sharded:
                    for key, value in moments.items():
                        if torch.is_tensor(value) and value.dim() and value.shape != parameter.shape:
                            moments[key] = sharded[id(parameter)].local(value)
        super().load_optimizer_state_dict(checkpoint)


def clip_gradient_norm(module: torch.nn.Module, max_norm: float) -> None:
    """Clip the gradients of `module`'s parameters to a total norm of `max_norm`, as
    torch.nn.utils.clip_grad_norm_ does, with the norm of the whole model when its experts are
    sharded: the expert shards' squares summed over their group, the replicated parameters' once."""
    sharded = sharded_parameters(module)
    grads = [(id(p), p.grad) for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    zero = grads[0][1].new_zeros((), dtype=torch.float32)
    replicated = sum((grad.float().square().sum() for key, grad in grads if key not in sharded), zero)
    shards = sum((grad.float().square().sum() for key, grad in grads if key in sharded), zero.clone())
    if sharded:
        dist.all_reduce(shards, group=next(iter(sharded.values())).group)
    total = (replicated + shards).sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for _, grad in grads:
        grad.mul_(coefficient.to(grad.dtype))

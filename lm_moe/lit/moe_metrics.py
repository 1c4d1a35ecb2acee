"""Turn the MoE layers' `aux.stats` into loggable scalars and histograms.

Names are grouped with `/` so TensorBoard folds them: `moe/block_3/router_entropy`.
"""

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

# A stat with one value per expert or slot (any stat that is not a scalar) is logged as a
# histogram; a load vector (non-negative, not all zero) also as a max/min load ratio and an idle
# fraction. A signed vector, such as the loss-free balancing bias, is not a load.

LayerStats = dict[str, dict[str, torch.Tensor]]


def reduce_over_ranks(layer_stats: LayerStats, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], world_size: int) -> LayerStats:
    """The stats of the global batch: one all-reduce of all stats flattened together, then counts
    (integer stats, see `LayerAux`) summed and the floating ones averaged over the `world_size`
    ranks. Every result is float32."""
    if world_size == 1 or not layer_stats:
        return layer_stats
    keys = [(block, name) for block, stats in layer_stats.items() for name in stats]
    flat = torch.cat([layer_stats[block][name].float().reshape(-1) for block, name in keys])  # [n]
    total = all_reduce_sum(flat)
    reduced, start = {}, 0
    for block, name in keys:
        like = layer_stats[block][name]
        value = total[start : start + like.numel()].reshape(like.shape)
        start += like.numel()
        reduced.setdefault(block, {})[name] = value / world_size if like.is_floating_point() else value
    return reduced


def moe_scalars(layer_stats: LayerStats, prefix: str = "moe") -> dict[str, torch.Tensor]:
    """Every scalar stat, plus for each load vector `<vector>_max_min_ratio` (1 = balanced) and
    `<vector>_idle_fraction`, the share of experts (or slots) that got nothing (a collapse)."""
    scalars = {}
    for block, stats in layer_stats.items():
        for name, value in stats.items():
            if value.dim() == 0:
                scalars[f"{prefix}/{block}/{name}"] = value.float()
            elif value.min() >= 0 and value.max() > 0:
                value = value.float()  # counts too
                # An idle expert makes the ratio infinite; eps keeps the curve plottable.
                ratio = value.max() / value.min().clamp_min(1e-6)
                scalars[f"{prefix}/{block}/{name}_max_min_ratio"] = ratio.float()
                scalars[f"{prefix}/{block}/{name}_idle_fraction"] = (value == 0).float().mean()
    return scalars


def moe_histograms(layer_stats: LayerStats, prefix: str = "moe") -> dict[str, torch.Tensor]:
    """The per-expert / per-slot load vectors, to log as histograms."""
    return {
        f"{prefix}/{block}/{name}": value.float()
        for block, stats in layer_stats.items()
        for name, value in stats.items()
        if value.dim() > 0
    }


def log_moe_stats(module: pl.LightningModule, layer_stats: LayerStats) -> None:
    """On the steps the trainer writes logs (every `log_every_n_steps`), log per MoE layer the
    stats of the global batch (reduced over data-parallel ranks): scalars, and the load vectors
    as TensorBoard histograms.

    Other steps return at once: the layers' stats are deferred (`DeferredStats`), so those steps
    neither compute them nor all-reduce them.
    """
    trainer = module.trainer
    # The trainer's own schedule for step logs (LearningRateMonitor asks it the same way).
    if not trainer._logger_connector.should_update_logs:
        return
    stats = reduce_over_ranks(
        layer_stats, lambda flat: trainer.strategy.reduce(flat, reduce_op="sum"), trainer.world_size
    )
    module.log_dict(moe_scalars(stats))
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, values in moe_histograms(stats).items():
                logger.experiment.add_histogram(name, values, global_step=module.global_step)

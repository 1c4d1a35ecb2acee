"""Turn the MoE layers' `aux.stats` into loggable scalars and histograms.

Names are grouped with `/` so TensorBoard folds them: `moe/block_3/router_entropy`.
"""

import torch

# Stats that are a vector per expert or slot: logged as histograms plus a max/min load ratio.
_LOAD_VECTORS = ("tokens_per_expert", "slot_usage")


def moe_scalars(layer_stats: dict[str, dict[str, torch.Tensor]], prefix: str = "moe") -> dict[str, torch.Tensor]:
    """Every scalar stat, plus `<vector>_max_min_ratio` for each load vector (1 = balanced)."""
    scalars = {}
    for block, stats in layer_stats.items():
        for name, value in stats.items():
            if value.dim() == 0:
                scalars[f"{prefix}/{block}/{name}"] = value.float()
            elif name in _LOAD_VECTORS:
                # An idle expert makes the ratio infinite; eps keeps the curve plottable.
                ratio = value.max() / value.min().clamp_min(1e-6)
                scalars[f"{prefix}/{block}/{name}_max_min_ratio"] = ratio.float()
    return scalars


def moe_histograms(layer_stats: dict[str, dict[str, torch.Tensor]], prefix: str = "moe") -> dict[str, torch.Tensor]:
    """The per-expert / per-slot load vectors, to log as histograms."""
    return {
        f"{prefix}/{block}/{name}": value.float()
        for block, stats in layer_stats.items()
        for name, value in stats.items()
        if name in _LOAD_VECTORS
    }

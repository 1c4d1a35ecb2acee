"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lm_moe.argument_checks import (
    require_fraction,
    require_non_negative_float,
    require_non_negative_int,
    require_positive_float,
    require_unit_interval,
)
from lm_moe.layers.feed_forward_layer import feed_forward_layers
from lm_moe.lit.fine_tuning import learning_rate_scales


def check_adamw_settings(
    learning_rate: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int, min_lr_ratio: float
) -> None:
    """Refuse settings AdamW or the schedule would reject late (after the data is prepared) or
    take silently: a negative decay, a negative warmup, a cosine that ends above its start."""
    require_positive_float("learning_rate", learning_rate)
    require_non_negative_float("weight_decay", weight_decay)
    if isinstance(betas, str) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        require_fraction(f"betas[{i}]", beta)
    require_non_negative_int("warmup_steps", warmup_steps)
    require_unit_interval("min_lr_ratio", min_lr_ratio)


def adamw_param_groups(model: nn.Module, weight_decay: float, learning_rate: float,
                       lr_scales: dict[int, float] | None = None) -> list[dict]:
    """Weight decay on matrices and stacked expert weights only: not on norms, biases, scalar
    scales or embeddings (decaying an embedding pulls rare tokens to zero), nor on the parameters
    an FFN layer names in its `no_weight_decay` (Soft MoE's slot embeddings are normalised before
    use: decay would only shrink them, and so raise their effective step size). Frozen parameters
    are left out. `lr_scales` (id(parameter) -> multiplier, see fine_tuning.learning_rate_scales)
    puts the scaled parameters in groups of their own, at learning_rate x multiplier."""
    exempt = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    exempt |= {id(layer.get_parameter(name)) for layer in feed_forward_layers(model) for name in layer.no_weight_decay}
    lr_scales = lr_scales or {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        decayed = parameter.dim() >= 2 and id(parameter) not in exempt
        groups.setdefault((decayed, lr_scales.get(id(parameter), 1.0)), []).append(parameter)
    # Named, so that the learning-rate monitor logs lr-AdamW/decay and lr-AdamW/no_decay, not pg1 and pg2.
    return [
        {"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": learning_rate * scale,
         "name": ("decay" if decayed else "no_decay") + ("" if scale == 1.0 else f"_lr_x{scale:g}")}
        for (decayed, scale), params in groups.items() if params or scale == 1.0
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over `warmup_steps`, then cosine down to `min_lr_ratio`
    at `total_steps`, flat after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_adamw_with_schedule(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    grad_scaler: bool = False,
    lr_scales: dict[int, float] | None = None,
) -> dict:
    """What `configure_optimizers` returns: AdamW and a per-step warmup + cosine schedule.

    grad_scaler: whether a GradScaler steps the optimizer (fp16 mixed precision on a GPU; see
    `uses_grad_scaler`).
    lr_scales: per-parameter learning-rate multipliers (see `adamw_param_groups`).
    """
    # The fused kernel (CPU and GPUs) takes one pass over each parameter and its moments: 3.5x
    # faster than the default foreach path on a 2-core CPU at 20M parameters. Under a GradScaler
    # it unscales inside its step, too late for gradient clipping: there the foreach path runs.
    groups = adamw_param_groups(model, weight_decay, learning_rate, lr_scales)
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=None if grad_scaler else True)
    if not grad_scaler:
        # The flag means "my step unscales for a GradScaler". No scaler steps this optimizer, but
        # Lightning 2.6 refuses gradient clipping whenever the flag is set, bf16 included
        # (Lightning issue 21435): unset, it clips as for any optimizer.
        optimizer._step_supports_amp_scaling = False
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def configure_adamw(module: pl.LightningModule) -> dict:
    """`build_adamw_with_schedule` for `module.model` from the module's hyper-parameters
    (learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio), over the trainer's steps."""
    hp = module.hparams
    total_steps = int(module.trainer.estimated_stepping_batches)
    if hp.warmup_steps >= total_steps:
        rank_zero_warn(
            f"warmup_steps={hp.warmup_steps} is not shorter than the run's {total_steps} steps: the learning rate "
            f"never reaches learning_rate={hp.learning_rate} (set model.warmup_steps lower for a short run)"
        )
    return build_adamw_with_schedule(
        module.model,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay,
        betas=tuple(hp.betas),
        warmup_steps=hp.warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=hp.min_lr_ratio,
        grad_scaler=uses_grad_scaler(module.trainer),
        lr_scales=learning_rate_scales(module.model, dict(hp.get("lr_scale") or {})),
    )


def uses_grad_scaler(trainer: pl.Trainer) -> bool:
    """Whether the trainer's precision steps optimizers through a GradScaler (fp16 mixed on a GPU)."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None

"""Fine-tuning: a new run that starts from trained weights (`model.init_from`), with parts of the
model frozen (`model.freeze`) or trained at their own learning rate (`model.lr_scale`).

The parts of a model (GPT or ViT), each parameter in exactly one:

    experts, router, shared_experts   the MoE layers' parameters, as each layer names them
                                      (FeedForwardLayer.parameter_parts)
    dense_ffn                         the dense MLPs
    attention                         the self-attention projections
    embeddings                        token, position and patch embeddings (the GPT's output layer
                                      shares the token embedding)
    norms                             the layer norms
    head                              the ViT's classifier
and one union: non_moe, every parameter outside the MoE layers.
"""

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lm_moe.argument_checks import require_non_negative_float
from lm_moe.layers.attention import CausalSelfAttention
from lm_moe.layers.encoder_attention import EncoderSelfAttention
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.lit.checkpoints import require_matching_state

MOE_PARTS = ("experts", "router", "shared_experts")
PARTS = (*MOE_PARTS, "dense_ffn", "attention", "embeddings", "norms", "head")
UNIONS = {"non_moe": tuple(part for part in PARTS if part not in MOE_PARTS)}
PART_NAMES = (*PARTS, *UNIONS)
# The ViT's classifier: re-initialised when a checkpoint was trained for another number of classes.
CLASSIFIER_HEAD = ("head.weight", "head.bias")


def parameter_parts(model: nn.Module) -> dict[str, str]:
    """The part of every parameter of `model`, by name (see the module's docstring)."""
    parts: dict[str, str] = {}
    within: list[tuple[str, str]] = []  # (module prefix, part) for the parameters of whole submodules
    for prefix, module in model.named_modules():
        if isinstance(module, FeedForwardLayer):
            parts.update({f"{prefix}.{name}": part for name, part in module.parameter_parts().items()})
        elif isinstance(module, (CausalSelfAttention, EncoderSelfAttention)):
            within.append((prefix + ".", "attention"))
        elif isinstance(module, (nn.Embedding, nn.Conv2d)):
            within.append((prefix + ".", "embeddings"))
        elif isinstance(module, nn.LayerNorm):
            within.append((prefix + ".", "norms"))
    for name, _ in model.named_parameters():
        if name in parts:
            continue
        found = [part for prefix, part in within if name.startswith(prefix)]
        if found:
            parts[name] = found[0]
        elif "." not in name:  # a model-level parameter: the ViT's class token
            parts[name] = "embeddings"
        else:
            parts[name] = "head"
    return parts


def _expand(setting: str, name: str, present: set[str]) -> set[str]:
    """The parts a part name stands for; refused if it is unknown (with the parts allowed) or if
    this model has none of them (`present`: the parts it has)."""
    if name not in PART_NAMES:
        raise ValueError(f"{setting}: unknown part {name!r}; the parts are {', '.join(PART_NAMES)}")
    parts = set(UNIONS.get(name, (name,)))
    if not parts & present:
        raise ValueError(f"{setting}: this model has no {name} parameters (its parts: {', '.join(sorted(present))})")
    return parts


def freeze_parts(model: nn.Module, names: list[str]) -> None:
    """Freeze the parameters of the named parts: no gradient, so no optimizer state and no decay.
    Refuses a part this model has no parameters of, and freezing every parameter."""
    parts = parameter_parts(model)
    wanted = {part for name in names for part in _expand("freeze", name, set(parts.values()))}
    frozen = {name for name, part in parts.items() if part in wanted}
    if frozen == set(parts):
        raise ValueError(f"freeze: {', '.join(names)} covers every parameter: nothing would train")
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)


def learning_rate_scales(model: nn.Module, scales: dict[str, float]) -> dict[int, float]:
    """id(parameter) -> its learning-rate multiplier from `scales` (part name -> multiplier, 1 where
    no part is named). Refuses unknown parts, non-positive scales, and a parameter two given parts cover."""
    parts = parameter_parts(model)
    covered = {entry: _expand("lr_scale", entry, set(parts.values())) for entry in scales}
    for entry, scale in scales.items():
        if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"lr_scale: {entry}: the scale must be a positive number, got {scale!r}")
    result: dict[int, float] = {}
    given: dict[str, str] = {}  # parameter name -> the lr_scale entry that covers it
    for name, parameter in model.named_parameters():
        for entry, scale in scales.items():
            if parts[name] in covered[entry]:
                if name in given:
                    raise ValueError(f"lr_scale: {given[name]!r} and {entry!r} both cover {name}: give each part one scale")
                given[name] = entry
                result[id(parameter)] = float(scale)
    return result


def load_initial_weights(model: nn.Module, path: str | Path, task: str) -> None:
    """Load the weights of a checkpoint file or export folder of `task` into `model` (a new run: its
    optimizer, schedule and step count start afresh). The shapes must fit, except a ViT's classifier
    head trained for another number of classes, which keeps its new initialisation (with a warning)."""
    from lm_moe.lit.trained_model import read_trained  # reads through the checkpoint machinery

    weights = read_trained(path, task)
    state = {name.removeprefix("model."): tensor for name, tensor in weights.state_dict.items()}
    own = model.state_dict()
    kept_new = [name for name in CLASSIFIER_HEAD if task == "vit" and name in state and state[name].shape != own[name].shape]
    if kept_new:
        rank_zero_warn(f"model.init_from: {path} classifies {state['head.weight'].shape[0]} classes, this run "
                       f"{own['head.weight'].shape[0]}: the classifier head ({', '.join(kept_new)}) starts afresh")
        state.update({name: own[name] for name in kept_new})
    try:
        require_matching_state(state, own)
    except ValueError as error:
        raise ValueError(f"model.init_from {path}: {error}") from None
    with torch.no_grad():
        model.load_state_dict(state)
    rank_zero_info(f"model.init_from: the weights of {path} loaded ({sum(t.numel() for t in state.values()):,} "
                   "numbers); the optimizer, schedule and step count start afresh")


def check_starting_weights(init_from: str | None, upcycle_from: str | None, upcycle_noise: float) -> None:
    """A run starts from one set of trained weights: `init_from` (the same architecture) or
    `upcycle_from` (a dense model, into this MoE), not both; the noise is a non-negative number."""
    if init_from is not None and upcycle_from is not None:
        raise ValueError(f"model.init_from ({init_from}) and model.upcycle_from ({upcycle_from}) both name the "
                         "weights to start from: give one (init_from: a model of this architecture; upcycle_from: "
                         "a dense one, whose MLPs the experts copy)")
    require_non_negative_float("upcycle_noise", upcycle_noise)


def apply_part_settings(model: nn.Module, freeze: list[str] | None, lr_scale: dict[str, float] | None) -> None:
    """A module's `freeze` and `lr_scale` settings on its freshly built model: the parts frozen, the
    scales checked (the optimizer applies them), so that a bad one is refused before any data work."""
    if freeze:
        freeze_parts(model, list(freeze))
    if lr_scale:
        learning_rate_scales(model, dict(lr_scale))


def report_trainable(module: pl.LightningModule) -> None:
    """Say, and log as params/trainable and params/total, how many parameters the run trains."""
    rank_zero_info(trainable_summary(module.model))
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.model.parameters())
    for logger in module.loggers:
        logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)


def trainable_summary(model: nn.Module) -> str:
    """`12,345 of 67,890 parameters train (frozen: experts)`."""
    parts = parameter_parts(model)
    total = trainable = 0
    frozen_parts = set()
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
        else:
            frozen_parts.add(parts[name])
    frozen = f" (frozen: {', '.join(sorted(frozen_parts))})" if frozen_parts else ""
    return f"{trainable:,} of {total:,} parameters train{frozen}"

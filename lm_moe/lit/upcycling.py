"""Sparse upcycling (Komatsuzaki et al., 2022): a new MoE run (`model.upcycle_from`) that starts from
a trained dense model of the same shape. Everything outside the FFN layers is copied; each MoE
layer's experts start as copies of the dense MLP of its block (`FeedForwardLayer.upcycle_from_dense`),
its routing freshly initialised; dense blocks keep their MLP. Expert width = the dense MLP's width:
each expert is a whole copy (slicing the dense MLP into narrower experts is not supported)."""

from pathlib import Path

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.layers.ffn import ExpertWeights
from lm_moe.lit.checkpoints import require_matching_state


def _dense_mlp(state: dict[str, torch.Tensor], prefix: str, path: str | Path) -> ExpertWeights:
    """The trained dense MLP of one block (`<prefix>.expert.w_in / w_out`) as an ExpertWeights."""
    try:
        w_in, w_out = state[f"{prefix}.expert.w_in"], state[f"{prefix}.expert.w_out"]  # [1, D, H or 2H], [1, H, D]
    except KeyError:
        raise ValueError(f"model.upcycle_from {path}: no dense MLP for {prefix} (its weights "
                         f"{prefix}.expert.w_in and .w_out are not in the checkpoint)") from None
    dim, hidden = w_in.shape[1], w_out.shape[1]
    activation = "swiglu" if w_in.shape[2] == 2 * hidden else "gelu"
    mlp = ExpertWeights(1, dim, hidden, activation)
    with torch.no_grad():
        mlp.w_in.copy_(w_in)
        mlp.w_out.copy_(w_out)
    return mlp


def upcycle_from_dense(model: nn.Module, path: str | Path, task: str, noise: float = 0.0) -> None:
    """Start `model` (an MoE GPT or ViT, freshly built) from the dense model of checkpoint file or
    export folder `path`: refused unless that model is dense (`ffn: null`) and every tensor outside
    the FFN layers fits."""
    from lm_moe.lit.trained_model import read_trained  # reads through the checkpoint machinery

    weights = read_trained(path, task)
    if weights.model_settings.get("ffn") is not None:
        raise ValueError(f"model.upcycle_from {path}: upcycling starts from a dense model (ffn: null); this one has "
                         f"ffn {weights.model_settings['ffn'].get('class_path')}")
    state = {name.removeprefix("model."): tensor for name, tensor in weights.state_dict.items()}
    layers = {prefix: layer for prefix, layer in model.named_modules() if isinstance(layer, FeedForwardLayer)}

    def outside_ffns(names) -> set[str]:
        return {name for name in names if not any(name.startswith(prefix + ".") for prefix in layers)}

    own = model.state_dict()
    kept = outside_ffns(own)
    try:
        require_matching_state({name: state[name] for name in outside_ffns(state)}, {name: own[name] for name in kept})
    except ValueError as error:
        raise ValueError(f"model.upcycle_from {path}: {error}") from None
    with torch.no_grad():
        model.load_state_dict({name: state[name] for name in kept}, strict=False)
    for prefix, layer in layers.items():
        try:
            layer.upcycle_from_dense(_dense_mlp(state, prefix, path), noise)
        except ValueError as error:
            raise ValueError(f"model.upcycle_from {path}: {prefix}: {error}") from None
    rank_zero_info(f"model.upcycle_from: the {len(layers)} FFN layers start from the dense MLPs of {path}"
                   + (f" (noise {noise:g})" if noise else "") + ", the routing afresh; so do the optimizer and step count")

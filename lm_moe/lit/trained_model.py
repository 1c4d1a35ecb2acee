"""A trained model from a Lightning checkpoint (`.ckpt`) or an export folder (model.safetensors +
config.yaml): its settings, its weights, and the LightningModule they build. Both load without
running code from the file (see safe_loading and weights_export)."""

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import instantiate_module

from lm_moe.command_line import LAYER_SETTING
from lm_moe.layers.feed_forward_layer import FeedForwardLayer
from lm_moe.lit.checkpoints import TASK_MODELS, read_checkpoint, require_matching_state, require_task
from lm_moe.lit.safe_loading import require_safe_pickle
from lm_moe.lit.weights_export import export_config, is_export, read_export, require_export_files


@dataclass(frozen=True)
class TrainedWeights:
    task: str  # "lm" or "vit"
    model_settings: dict  # the LightningModule's arguments (as its hyper-parameters)
    data_settings: dict  # the data module's, which name the tokenizer or the classes
    state_dict: dict[str, torch.Tensor]


def read_trained(
    path: str | Path, task: str | None = None, map_location: str | torch.device = "cpu", allow_unsafe_pickle: bool = False
) -> TrainedWeights:
    """The settings and weights of a checkpoint file or an export folder, of task `task` (None = either)."""
    if is_export(path):
        config, state_dict = read_export(path, map_location)
        if config["task"] not in TASK_MODELS:
            raise ValueError(f"{str(path)!r}: task must be one of {sorted(TASK_MODELS)}, got {config['task']!r}")
    else:
        checkpoint = read_checkpoint(path, map_location, allow_unsafe_pickle=allow_unsafe_pickle)
        config, state_dict = export_config(checkpoint), checkpoint["state_dict"]
    require_task(config["task"], task, path)
    return TrainedWeights(config["task"], config["model"], config["data"], state_dict)


def check_trained_path(path: str | Path, allow_unsafe_pickle: bool = False) -> None:
    """Refuse, without reading any tensor, a path that is neither a checkpoint file nor an export
    folder, or a checkpoint whose pickle would run foreign code: for tools that load later."""
    if is_export(path):
        require_export_files(path)
    elif not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint file or export folder at {str(path)!r}")
    else:
        require_safe_pickle(path, allow_unsafe_pickle)


def module_class(task: str) -> type[pl.LightningModule]:
    if task == "vit":
        from lm_moe.lit.image_classifier import ImageClassifier

        return ImageClassifier
    from lm_moe.lit.language_model import LanguageModel

    return LanguageModel


def _layer_class(class_path: str):
    """The class `class_path` names, imported only from lm_moe's own modules or one already imported."""
    module_name, _, name = class_path.rpartition(".")
    if module_name.split(".")[0] == "lm_moe":
        try:
            importlib.import_module(module_name)
        except ImportError:
            return None
    return getattr(sys.modules.get(module_name), name, None)


def require_known_layer_classes(settings: dict) -> None:
    """Saved settings name their layers by class_path, which the parser would import and call: only
    FFN layer classes of lm_moe, or of a module the program has imported itself, are built."""
    for key, value in settings.items():
        if isinstance(value, dict):
            require_known_layer_classes(value)
        elif key == LAYER_SETTING and value is not None:
            raise ValueError(f"saved setting {key}: expected a class_path and init_args, got {value!r}")
        if key == "class_path":
            layer = _layer_class(str(value))
            if not (isinstance(layer, type) and issubclass(layer, FeedForwardLayer)):
                raise ValueError(
                    f"saved setting class_path {value!r} is not an FFN layer of lm_moe nor of a module this program "
                    "imported: only those are built from saved settings (for a layer of your own, import its module, "
                    "then call lm_moe.lit.trained_model.load_trained_module)"
                )


def build_trained_module(weights: TrainedWeights) -> pl.LightningModule:
    """The LightningModule its settings build, holding its weights, in eval mode. The settings are
    parsed as the CLI parses a config, once every class they name is known to be an FFN layer."""
    require_known_layer_classes(weights.model_settings)
    try:
        module = instantiate_module(module_class(weights.task), dict(weights.model_settings))
    except argparse.ArgumentError as error:  # a setting the model does not take, or a class that is no FFN layer
        raise ValueError(f"the saved settings do not build an lm_moe model: {error}") from None
    require_matching_state(weights.state_dict, module.state_dict())
    module.load_state_dict(weights.state_dict)
    return module.eval()


def load_trained_module(path: str | Path, task: str | None = None, allow_unsafe_pickle: bool = False) -> pl.LightningModule:
    """The trained LightningModule of a checkpoint file or export folder, on the CPU, in eval mode."""
    return build_trained_module(read_trained(path, task, allow_unsafe_pickle=allow_unsafe_pickle))

"""Weights to share: a folder holding `model.safetensors` (the tensors, nothing else) and
`config.yaml` (the task, the model's and data's settings, the step trained to). Neither file can run
code when opened, unlike a `.ckpt` pickle; a checkpoint stays what a run resumes from (optimizer,
schedule, data order), the folder is what others load to sample, evaluate or fine-tune."""

from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lm_moe.lit.checkpoints import checkpoint_task, with_current_setting_names
from lm_moe.output_files import output_problem, staged_folder

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def _settings(hyper_parameters: dict) -> dict:
    return {key: value for key, value in hyper_parameters.items() if key != "_instantiator"}  # Lightning's own


def export_config(checkpoint: dict) -> dict:
    """What config.yaml holds for a Lightning checkpoint of an lm_moe model."""
    return {
        "task": checkpoint_task(checkpoint),
        "model": _settings(checkpoint["hyper_parameters"]),
        "data": _settings(checkpoint.get("datamodule_hyper_parameters", {})),
        "trained": {"global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")},
    }


def write_export(checkpoint: dict, out: Path, overwrite: bool = False) -> None:
    """Write the export folder of `checkpoint` at `out`, whole or not at all (see
    lm_moe.output_files); an `out` that holds files is refused unless `overwrite`, which replaces it."""
    out = Path(out)
    problem = output_problem(out, overwrite, folder=True)
    if problem:
        raise ValueError(f"export folder {problem}")
    # Tied weights share a storage, which safetensors refuses to write twice: each key gets its own copy.
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in checkpoint["state_dict"].items()}
    config = export_config(checkpoint)
    try:
        config_text = yaml.safe_dump(config, sort_keys=False)
    except yaml.representer.RepresenterError as error:  # a setting stored as a Python object
        raise ValueError(f"the checkpoint's settings are not plain values YAML can hold: {error}") from None
    with staged_folder(out) as staging:
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt", "task": config["task"]})
        (staging / CONFIG_FILE).write_text(config_text)


def is_export(path: str | Path) -> bool:
    return Path(path).is_dir()


def require_export_files(folder: str | Path) -> None:
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if not (Path(folder) / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{str(folder)!r} is not an lm_moe export: no {' or '.join(missing)} in it "
            "(python -m lm_moe.export CKPT FOLDER writes one)"
        )


def read_export(folder: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of an export folder, with clear errors for a missing or damaged file;
    the model settings under their current names (see `with_current_setting_names`)."""
    folder = Path(folder)
    require_export_files(folder)
    try:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(folder / CONFIG_FILE)!r} is not readable YAML: {error}") from None
    if not isinstance(config, dict) or not {"task", "model", "data"} <= config.keys():
        raise ValueError(f"{str(folder / CONFIG_FILE)!r} is not an lm_moe export config (task:, model:, data:)")
    config["model"] = with_current_setting_names(config["model"])
    try:
        state_dict = load_file(folder / WEIGHTS_FILE, device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{str(folder / WEIGHTS_FILE)!r} is not a readable safetensors file: {error}") from None
    return config, state_dict

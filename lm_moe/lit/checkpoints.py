"""A run's checkpoints: finding them (the newest last one, the best one), reading one safely,
refusing one that does not fit the model and saying why, naming the settings it was trained with
that differ from the config's."""

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from pytorch_lightning.utilities import rank_zero_warn

from lm_moe.lit.safe_loading import load_checkpoint_file

LAST_CHECKPOINT = re.compile(r"last(-v\d+)?\.ckpt")  # Lightning's names for it
# Former names of model settings, which the files saved with them (checkpoints, exports, a run's
# config.yaml) still carry: the ViT's FFN setting, `ffn` as in the GPT, was `mlp`.
FORMER_SETTING_NAMES = {"mlp": "ffn"}


def run_root(logger_config) -> Path:
    """<save_dir>/<name> of the configured TensorBoardLogger, where the run's versions live."""
    init_args = getattr(logger_config, "init_args", None)
    if init_args is None or "save_dir" not in init_args or "name" not in init_args:
        raise ValueError("--ckpt_path last or best needs a TensorBoardLogger with save_dir and name to find the run")
    return Path(init_args.save_dir) / init_args.name


def newest_last_checkpoint(run_root: Path) -> Path | None:
    """The newest last checkpoint of the run versions under `run_root` (runs/<name>), if any."""
    # Every version folder: version_<n>, or the name a logger's `version` setting gave it. A run
    # into a folder that holds an earlier run's last.ckpt writes its own as last-v1.ckpt, ...
    candidates = [path for path in run_root.glob("*/checkpoints/last*.ckpt") if LAST_CHECKPOINT.fullmatch(path.name)]
    return max(candidates, key=lambda path: path.stat().st_mtime, default=None)


def best_checkpoint(run_root: Path, mode: str) -> Path | None:
    """The checkpoint with the best monitored score (`mode` "min" or "max") among every run version
    under `run_root`, last.ckpt aside, if any: each records its own score when it is written.
    (Lightning resolves `best` only within the process that trained, and a resumed run starts its
    own best afresh in its new version folder.)"""
    scored = []
    for path in run_root.glob("*/checkpoints/*.ckpt"):
        if path.stem.startswith("last"):
            continue
        try:
            states = read_checkpoint(path).get("callbacks", {}).values()
        except ValueError as error:  # one damaged file must not hide the run's other checkpoints
            rank_zero_warn(f"--ckpt_path best: skipping {error}")
            continue
        score = next((state["current_score"] for state in states if state.get("current_score") is not None), None)
        if score is not None:
            scored.append((float(score), path))
    return (min if mode == "min" else max)(scored)[1] if scored else None


def require_matching_state(checkpoint_state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]) -> None:
    """Raise ValueError listing the missing, unexpected and mis-shaped tensors, if any."""
    missing = sorted(model_state.keys() - checkpoint_state.keys())
    unexpected = sorted(checkpoint_state.keys() - model_state.keys())
    mis_shaped = [
        f"{name}: checkpoint {tuple(checkpoint_state[name].shape)} vs model {tuple(model_state[name].shape)}"
        for name in sorted(model_state.keys() & checkpoint_state.keys())
        if checkpoint_state[name].shape != model_state[name].shape
    ]
    if not (missing or unexpected or mis_shaped):
        return
    problems = []
    for title, names in (("missing", missing), ("unexpected", unexpected), ("different shape", mis_shaped)):
        if names:
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
            problems.append(f"{title}: {shown}")
    raise ValueError(
        "the checkpoint was trained with a different architecture than this config builds ("
        + "; ".join(problems)
        + "); use the config the checkpoint was trained with (its run folder holds config.yaml)"
    )


TASK_MODELS = {"lm": "a language model", "vit": "an image classifier"}


def checkpoint_task(checkpoint: dict) -> str:
    """The task a checkpoint was trained for: "vit" (its hyper-parameters name the classes) or "lm"."""
    return "vit" if "num_classes" in checkpoint["hyper_parameters"] else "lm"


def with_current_setting_names(model_settings: Mapping) -> dict:
    """Saved model settings under the names the models take (a setting saved under both names keeps
    both, for the parser to refuse)."""
    renamed = {}
    for key, value in model_settings.items():
        current = FORMER_SETTING_NAMES.get(key, key)
        renamed[key if current in model_settings else current] = value
    return renamed


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", task: str | None = None, allow_unsafe_pickle: bool = False
) -> dict:
    """Load a Lightning checkpoint file safely (see lm_moe.lit.safe_loading), with clear errors for
    a missing, damaged or foreign file, and for one of another task than `task` ("lm" or "vit"; None = either).
    Its model settings under their current names (see `with_current_setting_names`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    # Memory-mapped, the tensors are read only where used: a check of shapes reads none of them.
    checkpoint = load_checkpoint_file(path, map_location, mmap=True, allow_unsafe_pickle=allow_unsafe_pickle)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint of an lm_moe model (no state_dict / hyper_parameters)")
    require_task(checkpoint_task(checkpoint), task, path)
    checkpoint["hyper_parameters"] = with_current_setting_names(checkpoint["hyper_parameters"])
    return checkpoint


def require_task(found: str, wanted: str | None, path: str | Path) -> None:
    """Refuse the weights of another task than `wanted` (None = either)."""
    if wanted is not None and found != wanted:
        raise ValueError(
            f"{str(path)!r} is the checkpoint of {TASK_MODELS[found]} (task: {found}); "
            f"this needs the checkpoint of {TASK_MODELS[wanted]} (task: {wanted})"
        )


# Settings that do not change what is trained or evaluated: how data is read, how predict samples.
_UNJUDGED_SETTINGS = {"num_workers", "cache_dir", "compile", "sampling"}


def setting_differences(saved: Mapping, current: Mapping, section: str) -> list[str]:
    """`<section>.<key>: <saved> in the checkpoint, <current> now` for each setting whose value
    differs, nested ones (model.ffn.init_args.top_k) by their full name. A setting the checkpoint
    does not have was added after it was saved, with a default that keeps what that version did
    (or, like an initial value, that its weights replace): it is not judged."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith("_") or key in _UNJUDGED_SETTINGS:  # _instantiator: Lightning's own
            continue
        if key not in saved:
            continue
        name, old, new = f"{section}.{key}", saved.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differences += setting_differences(old, new, name)
        elif json.dumps(old, default=str) != json.dumps(new, default=str):  # a tuple equals its list
            differences.append(f"{name}: {old!r} in the checkpoint, {new!r} now")
    return differences

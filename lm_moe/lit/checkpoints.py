"""Checkpoint checks: refuse a checkpoint that does not fit the model, and say why; name the
settings it was trained with that differ from the config's."""

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from lm_moe.lit.safe_loading import load_checkpoint_file


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


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", task: str | None = None, allow_unsafe_pickle: bool = False
) -> dict:
    """Load a Lightning checkpoint file safely (see lm_moe.lit.safe_loading), with clear errors for
    a missing, damaged or foreign file, and for one of another task than `task` ("lm" or "vit"; None = either)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    # Memory-mapped, the tensors are read only where used: a check of shapes reads none of them.
    checkpoint = load_checkpoint_file(path, map_location, mmap=True, allow_unsafe_pickle=allow_unsafe_pickle)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint of an lm_moe model (no state_dict / hyper_parameters)")
    require_task(checkpoint_task(checkpoint), task, path)
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
    differs, nested ones (model.ffn.init_args.top_k) by their full name."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith("_") or key in _UNJUDGED_SETTINGS:  # _instantiator: Lightning's own
            continue
        name, old, new = f"{section}.{key}", saved.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differences += setting_differences(old, new, name)
        elif json.dumps(old, default=str) != json.dumps(new, default=str):  # a tuple equals its list
            differences.append(f"{name}: {old!r} in the checkpoint, {new!r} now")
    return differences

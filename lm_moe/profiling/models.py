"""The models the profiling tools measure: built from a config (as `python -m lm_moe fit` would
build it, with random weights) or loaded from a Lightning checkpoint or an export folder (with its trained weights)."""

import contextlib
import io
import itertools
import re
from pathlib import Path

import yaml
from torch import nn

from lm_moe.lit.trained_model import load_trained_module


# How `python -m lm_moe` and `python -m lm_moe.sample` report a bad setting.
_CLI_ERROR_PREFIX = re.compile(r"^python -m [\w.]+: error: ")
# An exception line of a traceback, the parser's `error:` line, or the CLI's own error line.
_ERROR_LINE = re.compile(rf"^({_CLI_ERROR_PREFIX.pattern[1:]}|error:|[\w.]*(Error|Exception):)")


def error_message(output: str) -> str | None:
    """The last error an lm_moe command printed, with the indented lines that continue it (the
    parser writes what it expected there) and without the CLI's `python -m ...: error: ` prefix;
    None if there is none."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if _ERROR_LINE.match(line.strip())]
    if not starts:
        return None
    continued = itertools.takewhile(lambda line: line.startswith((" ", "\t")), lines[starts[-1] + 1 :])
    message = " ".join(line.strip() for line in [lines[starts[-1]], *continued])
    return _CLI_ERROR_PREFIX.sub("", message)


def _cli(config: str | Path, args: list[str]):
    """The CLI on `-c config *args` without running a subcommand (None if it stopped after
    printing, as --print_config does); a config it refuses raises a ValueError naming it."""
    from lm_moe import cli  # the CLI pulls in Lightning's trainer machinery: only when needed

    messages = io.StringIO()
    try:
        # The CLI reports a bad config on stderr and exits: turn that into an error naming the config.
        with contextlib.redirect_stderr(messages):
            return cli.main(["-c", str(config), *args], run=False)
    except SystemExit as stop:
        if stop.code == 0:
            return None
        raise ValueError(f"{config}: {error_message(messages.getvalue()) or 'the CLI refused the config'}") from None


def build_from_config(config: str | Path, overrides: list[str] = (), block_size: int | None = None) -> nn.Module:
    """The network (GPT or ViT) a config builds, in eval mode. `overrides` are CLI flags such as
    `--model.n_layer=2`; `block_size` (language models) sets `data.block_size`, the longest
    context the model takes, after them."""
    args = [*overrides, "--trainer.logger=false"]
    if block_size is not None:
        args.append(f"--data.block_size={block_size}")
    return _cli(config, args).model.model.eval()


def resolved_config(config: str | Path, overrides: list[str] = ()) -> dict:
    """The full config `python -m lm_moe fit -c config *overrides` runs with (defaults filled in),
    read without building anything. `overrides` may hold further `-c` files."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _cli(config, [*overrides, "--print_config"])
    return yaml.safe_load(printed.getvalue())


def refused_configs(configs, overrides: list[str] = ()) -> list[str]:
    """The CLI's error for each config (with `overrides`) it refuses to parse: for the scripts'
    checks before any work."""
    problems = []
    for config in configs:
        try:
            resolved_config(config, overrides)
        except ValueError as error:
            problems.append(str(error))
    return problems


def load_checkpoint(path: str | Path, allow_unsafe_pickle: bool = False) -> nn.Module:
    """The trained network (language model or image classifier) of an lm_moe checkpoint or export
    folder, in eval mode."""
    return load_trained_module(path, allow_unsafe_pickle=allow_unsafe_pickle).model


def variant_names(path: str | Path) -> list[str]:
    """Names for a config or checkpoint file, shortest first: the first one not yet taken names it.

    A checkpoint at runs/<name>/version_<n>/checkpoints/<file>: <name>, then <name>_version_<n>,
    then <name>_version_<n>_<file stem>. Any other file: its stem, then <folder>_<stem>.
    """
    path = Path(path)
    if path.parent.name == "checkpoints" and path.parent.parent.name.startswith("version_"):
        run, version = path.parents[2].name, path.parents[1].name
        return [run, f"{run}_{version}", f"{run}_{version}_{path.stem}"]
    return [path.stem, f"{path.parent.name}_{path.stem}"]

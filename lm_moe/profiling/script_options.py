"""Command-line checks the scripts share, each before any work: the step budget and validation
interval and the seeds of the sweeps (compare_lm.py, sweep_vit.py), the warm-up steps of the
timing benchmarks, a language-model config."""

import argparse
from pathlib import Path

import yaml

from lm_moe.profiling.models import refused_configs


def resolve_steps(parser: argparse.ArgumentParser, args: argparse.Namespace, validations: int) -> None:
    """Fill args.max_steps (default: the --trainer preset's) and args.val_every (default: max_steps /
    `validations`); the parser's error unless val_every divides max_steps, so that the last step is
    validated and checkpointed."""
    if args.max_steps is None:
        args.max_steps = (yaml.safe_load(args.trainer.read_text()) or {}).get("trainer", {}).get("max_steps")
        if args.max_steps is None:
            parser.error(f"{args.trainer} sets no trainer.max_steps: give --max-steps")
    if args.val_every is None:
        args.val_every = max(1, args.max_steps // validations)
    if args.max_steps < 1 or args.val_every < 1 or args.max_steps % args.val_every:
        parser.error(f"--val-every ({args.val_every}) must divide --max-steps ({args.max_steps}), both >= 1, "
                     "so that the last step is validated and checkpointed")


def parse_seeds(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """`1234,1235` -> [1234, 1235]; the parser's error for anything else or a seed named twice."""
    try:
        seeds = [int(seed) for seed in text.split(",")]
    except ValueError:
        parser.error(f"--seeds {text}: give whole numbers, as in 1234,1235,1236")
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds {text} names a seed twice")
    return seeds


def require_warmup_below_steps(parser: argparse.ArgumentParser, steps: int, warmup: int) -> None:
    """The parser's error unless some timed steps are left after the `warmup` ones."""
    if not 0 <= warmup < steps:
        parser.error(f"--warmup must be in [0, --steps), got {warmup} with --steps {steps}")


def require_language_model_config(parser: argparse.ArgumentParser, config: Path) -> None:
    """The parser's error unless `config` is a language-model config the CLI accepts."""
    from lm_moe.cli import configs_not_of_task  # the CLI pulls in Lightning's trainer machinery: only when needed

    if configs_not_of_task([config], "lm"):
        parser.error(f"no language-model config at {config}")
    refused = refused_configs([config])
    if refused:
        parser.error(refused[0])

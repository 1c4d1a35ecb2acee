"""Train every LM variant at matched active FLOPs on the same data, token budget and seed, and compare them.

    python scripts/compare_lm.py --out results/compare                      # every config under configs/lm/
    python scripts/compare_lm.py --configs configs/lm/dense.yaml configs/lm/top2.yaml --max-steps 600 --val-every 100
    python scripts/compare_lm.py --out results/compare --model.n_layer=2     # config overrides, for every variant
    python scripts/compare_lm.py --out results/compare --learning-rate top2=0.0014   # a variant's own learning rate

Each variant trains in its own `python -m lm_moe fit` process (a crash fails that variant only:
the table reports it as FAILED with its error), with --max-steps steps and --seed for all, its
TensorBoard logs and checkpoints in <out>/<variant>/ (`tensorboard --logdir <out>`). Then its
trained checkpoint is measured: total and active parameters, decoding tokens/s (cached, CPU, fp32,
batch --decode-batch) and the leakage checks (--causality-seeds). Validation runs every
--val-every steps, which must divide --max-steps: the last step is then validated and checkpointed.

Run it again on the same --out to resume: finished variants are skipped, an interrupted one
continues from its last checkpoint, a failed one is tried again. The settings must be the same
(the folder's sweep.json records them).

Writes to --out: results.csv, results.json, table.md (also printed), loss_vs_tokens.png and
loss_vs_time.png (validation loss of every variant against training tokens and wall time).
Exit status 1 when a variant failed.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lm_moe.cli import configs_not_of_task
from lm_moe.command_line import ArgumentParser, exit_with_error
from lm_moe.profiling.comparison import (
    EvaluationSettings,
    SweepSettings,
    Variant,
    batches_per_step,
    evaluate,
    require_same_learning_rate,
    require_same_settings,
    train,
)
from lm_moe.profiling.comparison_report import variant_row, write_report

REPO = Path(__file__).resolve().parents[1]
PROG = "compare_lm.py"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The script's own options, and the config overrides (`--model.dim=64`) for every variant."""
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, nargs="+", default=sorted((REPO / "configs/lm").glob("*.yaml")),
                        help="LM configs, one variant each (default: every config under configs/lm/)")
    parser.add_argument("--trainer", type=Path, default=REPO / "configs/trainer/cpu_quick.yaml", help="trainer preset")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="training steps of every variant (default: the preset's)")
    parser.add_argument("--val-every", type=int, default=None,
                        help="validation and checkpoint interval in steps (default: max steps / 10)")
    parser.add_argument(
        "--seed", type=int, default=1234,
        help="seed_everything of every variant: initialisation, dropout, router noise (the data split and batch order follow data.seed, the same for every --seed)",
    )
    parser.add_argument("--decode-batch", type=int, default=4)
    parser.add_argument("--causality-seeds", type=int, default=1, help="random inputs per leakage check (0: skip)")
    parser.add_argument("--learning-rate", metavar="VARIANT=RATE", action="append", default=[],
                        help="a variant's own model.learning_rate (repeat for several variants; the others "
                             "train at the rate of their config, the preset and the overrides)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of every process (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("results/compare"))
    args, overrides = parser.parse_known_args(argv)
    if not args.trainer.is_file():
        parser.error(f"no trainer preset at {args.trainer}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    if args.max_steps is None:
        args.max_steps = (yaml.safe_load(args.trainer.read_text()) or {}).get("trainer", {}).get("max_steps")
        if args.max_steps is None:
            parser.error(f"{args.trainer} sets no trainer.max_steps: give --max-steps")
    if args.val_every is None:
        args.val_every = max(1, args.max_steps // 10)
    if args.max_steps < 1 or args.val_every < 1 or args.max_steps % args.val_every:
        parser.error(f"--val-every ({args.val_every}) must divide --max-steps ({args.max_steps}), both >= 1, "
                     "so that the last step is validated and checkpointed")
    if args.decode_batch < 1 or args.causality_seeds < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--decode-batch and --threads must be >= 1, --causality-seeds >= 0")
    names = [config.stem for config in args.configs]
    if len(set(names)) != len(names):
        parser.error(f"the configs' file names name the variants and must differ, got {names}")
    if missing := [str(config) for config in args.configs if not config.is_file()]:
        parser.error(f"no config file at {', '.join(missing)}")
    if not_lm := configs_not_of_task(args.configs, "lm"):
        parser.error(f"the comparison trains language models; not LM configs: {', '.join(not_lm)}")
    pairs = [parse_learning_rate(parser, text, names) for text in args.learning_rate]
    args.learning_rates = dict(pairs)
    if len(args.learning_rates) != len(pairs):
        parser.error(f"--learning-rate gives one variant two rates: {' '.join(args.learning_rate)}")
    return args, overrides


def parse_learning_rate(parser: argparse.ArgumentParser, text: str, names: list[str]) -> tuple[str, float]:
    """`top2=0.0014` -> ("top2", 0.0014), for a variant of the sweep and a positive finite rate."""
    name, _, rate = text.partition("=")
    if name not in names:
        parser.error(f"--learning-rate {text}: {name!r} is not a variant of this sweep ({', '.join(names)})")
    try:
        value = float(rate)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        parser.error(f"--learning-rate {text}: the rate must be a positive number, as in {name}=0.002")
    return name, value


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    settings = SweepSettings(str(args.trainer.resolve()), args.max_steps, args.val_every, args.seed, tuple(overrides))
    evaluation = EvaluationSettings(args.decode_batch, args.causality_seeds)
    try:
        # A bad config or override is refused here, not after the variants before it have trained.
        variants = [Variant(config.stem, config.resolve(), args.out / config.stem, batches_per_step(config, settings),
                            args.learning_rates.get(config.stem))
                    for config in args.configs]
        require_same_settings(args.out, settings)
        for variant in variants:
            require_same_learning_rate(variant)
    except ValueError as error:
        exit_with_error(PROG, str(error))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console(width=200)

    rows = []
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total} steps"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, refresh_per_second=1) as progress:  # light: fits share the CPU
        task = progress.add_task("sweep", total=len(variants) * args.max_steps)
        for index, variant in enumerate(variants):
            done = index * args.max_steps

            def show(step: int, name: str = variant.name, done: int = done) -> None:
                progress.update(task, completed=done + step, description=f"{name}: training")

            show(0)
            outcome = train(variant, settings, args.threads, show)
            progress.update(task, completed=done + args.max_steps)
            evaluated = None
            if outcome.trained:
                progress.update(task, description=f"{variant.name}: parameters, decoding speed, causality")
                evaluated = evaluate(variant, evaluation)
            rows.append(variant_row(variant, outcome, evaluated, args.max_steps))
            message = f"FAILED: {outcome.reason}" if not outcome.trained else outcome.action
            progress.console.print(f"{variant.name}: {message}")
        progress.update(task, description="sweep done")

    print(write_report(args.out, settings, variants, rows))
    print(f"wrote results.csv, results.json, table.md, loss_vs_tokens.png, loss_vs_time.png to {args.out}")
    return 1 if any(row["status"] == "FAILED" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

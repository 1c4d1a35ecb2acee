"""Train every LM variant at matched active FLOPs on the same data and token budget, for several
seeds, each at its own learning rate, and compare them.

    python scripts/compare_lm.py --out results/compare                      # every config under configs/lm/
    python scripts/compare_lm.py --configs configs/lm/dense.yaml configs/lm/top2.yaml --max-steps 600 --val-every 100
    python scripts/compare_lm.py --out results/compare --seeds 1234,1235,1236         # mean and spread over seeds
    python scripts/compare_lm.py --out results/compare --lr-grid 0.0014,0.002,0.0028  # each variant at its best rate
    python scripts/compare_lm.py --out results/compare --learning-rate top2=0.0014    # a variant's own rate, given
    python scripts/compare_lm.py --out results/compare --model.n_layer=2              # config overrides, for every run

Each run (a variant at a seed) trains in its own `python -m lm_moe fit` process (a crash fails that
run only: the table reports it with its error), for --max-steps steps, its TensorBoard logs and
checkpoints in <out>/<variant>/seed_<seed>/ (`tensorboard --logdir <out>`). Then its trained
checkpoint is measured: total and active parameters, decoding tokens/s (cached, CPU, fp32, batch
--decode-batch) and the leakage checks (--causality-seeds). Validation runs every --val-every steps,
which must divide --max-steps (and --grid-steps): the last step is then validated and checkpointed.

A seed sets the initialisation, dropout and router noise (`seed_everything`) and the order of the
training batches (`data.shuffle_seed`); the validation documents are the same for every run. The
table gives each variant's mean validation loss and its standard deviation over the seeds, and its
gap to the --reference variant seed by seed, with a verdict: lower or higher only when at least 3
seeds agree and the mean gap exceeds its spread, else a tie.

--lr-grid first trains a variant at each rate for --grid-steps steps at the first seed (in
<out>/lr_grid/<variant>/lr_<rate>/) and picks its best by validation loss; its final runs train at
that rate; a best rate at either end of three or more is marked in lr_grid.md and printed (a rate
beyond the grid may do better). A variant given --learning-rate skips the grid. The sweep goes variant by variant (grid,
then seeds) and rewrites its report after each, so a long sweep's finished variants can be read
while the next trains.

Run it again on the same --out to resume: finished runs are skipped, an interrupted one continues
from its last checkpoint, a failed one is tried again; more seeds or rates add runs. The settings
must be the same (the folder's sweep.json records them).

Writes to --out: results.csv (a row per variant), runs.csv (a row per run), results.json, table.md
(also printed), loss_vs_tokens.png and loss_vs_time.png (the mean validation loss of every variant
with a band of one standard deviation), gap_vs_tokens.png (each variant's gap to the reference, seed
by seed, against training tokens), and with --lr-grid: lr_grid.csv, lr_grid.json, lr_grid.md and
lr_grid.png. Exit status 1 when a run failed.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lm_moe.cli import configs_not_of_task
from lm_moe.command_line import ArgumentParser, exit_with_error
from lm_moe.profiling.comparison import (
    EvaluationSettings,
    Run,
    SweepSettings,
    TrainingOutcome,
    batches_per_step,
    evaluate,
    require_same_learning_rate,
    require_same_settings,
    train,
)
from lm_moe.profiling.comparison_report import run_row, write_report
from lm_moe.profiling.learning_rate_grid import edge_note, write_grid_report
from lm_moe.profiling.script_options import parse_seeds, resolve_steps

REPO = Path(__file__).resolve().parents[1]
PROG = "compare_lm.py"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The script's own options, and the config overrides (`--model.dim=64`) for every run."""
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, nargs="+", default=sorted((REPO / "configs/lm").glob("*.yaml")),
                        help="LM configs, one variant each (default: every config under configs/lm/)")
    parser.add_argument("--trainer", type=Path, default=REPO / "configs/trainer/cpu_quick.yaml", help="trainer preset")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="training steps of every final run (default: the preset's)")
    parser.add_argument("--val-every", type=int, default=None,
                        help="validation and checkpoint interval in steps (default: max steps / 10)")
    parser.add_argument("--seeds", "--seed", metavar="SEED[,SEED...]", default="1234",
                        help="the seeds every variant trains at: initialisation, dropout, router noise and the "
                             "order of the training batches (default: 1234)")
    parser.add_argument("--reference", default=None,
                        help="the variant the gaps are measured to (default: dense if it is in the sweep, else none)")
    parser.add_argument("--lr-grid", metavar="RATE[,RATE...]", default=None,
                        help="learning rates to try for each variant (at the first seed) before its final runs")
    parser.add_argument("--grid-steps", type=int, default=None,
                        help="training steps of each grid run (default: half of --max-steps)")
    parser.add_argument("--decode-batch", type=int, default=4)
    parser.add_argument("--causality-seeds", type=int, default=1, help="random inputs per leakage check (0: skip)")
    parser.add_argument("--learning-rate", metavar="VARIANT=RATE", action="append", default=[],
                        help="a variant's own model.learning_rate (repeat for several variants; it skips the grid; "
                             "the others train at their grid's best, or the rate of their config, the preset and "
                             "the overrides)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of every process (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("results/compare"))
    args, overrides = parser.parse_known_args(argv)
    if not args.trainer.is_file():
        parser.error(f"no trainer preset at {args.trainer}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    resolve_steps(parser, args, validations=10)
    args.seeds = parse_seeds(parser, args.seeds)
    args.lr_grid = [] if args.lr_grid is None else parse_rates(parser, args.lr_grid)
    if args.grid_steps is None:
        args.grid_steps = args.max_steps // 2
    if args.lr_grid and (args.grid_steps < 1 or args.grid_steps % args.val_every):
        parser.error(f"--val-every ({args.val_every}) must divide --grid-steps ({args.grid_steps}, >= 1) as well: "
                     "give --grid-steps")
    if args.decode_batch < 1 or args.causality_seeds < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--decode-batch and --threads must be >= 1, --causality-seeds >= 0")
    names = [config.stem for config in args.configs]
    if len(set(names)) != len(names):
        parser.error(f"the configs' file names name the variants and must differ, got {names}")
    if missing := [str(config) for config in args.configs if not config.is_file()]:
        parser.error(f"no config file at {', '.join(missing)}")
    if not_lm := configs_not_of_task(args.configs, "lm"):
        parser.error(f"the comparison trains language models; not LM configs: {', '.join(not_lm)}")
    if args.reference is None:
        args.reference = "dense" if "dense" in names else None
    elif args.reference not in names:
        parser.error(f"--reference {args.reference} is not a variant of this sweep ({', '.join(names)})")
    pairs = [parse_learning_rate(parser, text, names) for text in args.learning_rate]
    args.learning_rates = dict(pairs)
    if len(args.learning_rates) != len(pairs):
        parser.error(f"--learning-rate gives one variant two rates: {' '.join(args.learning_rate)}")
    return args, overrides


def positive_rate(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(text)
    return value


def parse_rates(parser: argparse.ArgumentParser, text: str) -> list[float]:
    """`0.0014,0.002` -> [0.0014, 0.002]; the parser's error for anything but positive numbers."""
    try:
        return [positive_rate(item) for item in text.split(",")]
    except ValueError:
        parser.error(f"--lr-grid {text}: give positive numbers, as in 0.0014,0.002,0.0028")


def parse_learning_rate(parser: argparse.ArgumentParser, text: str, names: list[str]) -> tuple[str, float]:
    """`top2=0.0014` -> ("top2", 0.0014), for a variant of the sweep and a positive finite rate."""
    name, _, rate = text.partition("=")
    if name not in names:
        parser.error(f"--learning-rate {text}: {name!r} is not a variant of this sweep ({', '.join(names)})")
    try:
        return name, positive_rate(rate)
    except ValueError:
        parser.error(f"--learning-rate {text}: the rate must be a positive number, as in {name}=0.002")


class Stages:
    """Trains runs one after another under one progress bar, and says what became of each."""

    def __init__(self, progress: Progress, total_steps: int, threads: int | None, settings: SweepSettings):
        self.progress, self.threads, self.settings = progress, threads, settings
        self.task = progress.add_task("sweep", total=total_steps)
        self.done = 0

    def train(self, run: Run, label: str) -> TrainingOutcome:
        def show(step: int) -> None:
            self.progress.update(self.task, completed=self.done + step, description=f"{label}: training")

        show(0)
        outcome = train(run, self.settings, self.threads, show)
        self.done += run.steps
        self.progress.update(self.task, completed=self.done)
        message = f"FAILED: {outcome.reason}" if not outcome.trained else outcome.action
        self.progress.console.print(f"{label}: {message}")
        return outcome


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    settings = SweepSettings(str(args.trainer.resolve()), args.max_steps, args.val_every, tuple(overrides),
                             args.grid_steps if args.lr_grid else None)
    evaluation = EvaluationSettings(args.decode_batch, args.causality_seeds)
    grid_seed = args.seeds[0]
    try:
        # A bad config or override is refused here, not after the runs before it have trained.
        accumulation = {config.stem: batches_per_step(config, settings) for config in args.configs}
        grids = {config.stem: [Run(config.stem, config.resolve(), args.out / "lr_grid" / config.stem / f"lr_{rate:g}",
                                   grid_seed, args.grid_steps, rate, accumulation[config.stem]) for rate in args.lr_grid]
                 for config in args.configs if config.stem not in args.learning_rates}
        require_same_settings(args.out, settings)
        for run in (run for grid in grids.values() for run in grid):
            require_same_learning_rate(run)
    except ValueError as error:
        exit_with_error(PROG, str(error))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console(width=200)

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total} steps"),
               TimeElapsedColumn()]
    total_steps = sum(map(len, grids.values())) * args.grid_steps + len(args.configs) * len(args.seeds) * args.max_steps
    runs, run_rows, grid_rows = [], [], []
    with Progress(*columns, console=console, refresh_per_second=1) as progress:  # light: fits share the CPU
        stages = Stages(progress, total_steps, args.threads, settings)
        # Variant by variant, the report rewritten after each: a long sweep publishes what it has.
        for config in args.configs:
            name, rate, untrainable = config.stem, args.learning_rates.get(config.stem), None
            if grids.get(name):
                grid_rows += [run_row(run, stages.train(run, f"grid {name} at {run.learning_rate:g}"), None)
                              for run in grids[name]]
                chosen, edges = write_grid_report(args.out, args.grid_steps, grid_seed, grid_rows)
                rate = chosen[name]
                if name in edges:
                    progress.console.print(edge_note({name: edges[name]}))
                if rate is None:
                    untrainable = "no rate of the learning-rate grid trained (lr_grid.md has the errors)"
            for seed in args.seeds:
                run = Run(name, config.resolve(), args.out / name / f"seed_{seed}", seed, args.max_steps, rate,
                          accumulation[name])
                label = f"{name} seed {seed}"
                if untrainable:
                    outcome = TrainingOutcome(False, "failed", untrainable)
                    stages.done += run.steps
                else:
                    try:
                        require_same_learning_rate(run)
                    except ValueError as error:
                        exit_with_error(PROG, str(error))
                    outcome = stages.train(run, label)
                evaluated = None
                if outcome.trained:
                    progress.update(stages.task, description=f"{label}: parameters, decoding speed, causality")
                    evaluated = evaluate(run, evaluation)
                runs.append(run)
                run_rows.append(run_row(run, outcome, evaluated))
            markdown = write_report(args.out, settings, args.seeds, args.reference, runs, run_rows)
        progress.update(stages.task, description="sweep done")

    print(markdown)
    print(f"wrote results.csv, runs.csv, results.json, table.md and the charts to {args.out}")
    return 1 if any(row["status"] == "FAILED" for row in run_rows) else 0


if __name__ == "__main__":
    sys.exit(main())

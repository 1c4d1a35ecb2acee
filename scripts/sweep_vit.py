"""The Soft MoE paper's sweeps on the ViT: validation loss and accuracy against the number of
experts at a fixed total of slots, and against the slots per expert at a fixed number of experts,
over several seeds, with the dense ViT beside them and the training time per step.

    python scripts/sweep_vit.py --out results/vit_sweep                         # 3 seeds, both sweeps
    python scripts/sweep_vit.py --out results/vit_sweep --experts 8 32 --slots-per-expert 1 2 --seeds 1234
    taskset -c 0 python scripts/sweep_vit.py --out results/vit_sweep --threads 1 --max-steps 600 --val-every 200

Every setting keeps the FLOPs of --soft-moe-config (slots x expert width per image): the experts
sweep divides --total-slots among --experts (E experts of --total-slots / E slots each), the slots
sweep gives --fixed-experts experts --slots-per-expert slots each with experts as much narrower.
Each (setting, seed) trains in its own `python -m lm_moe fit` process with the --trainer preset, in
<out>/<setting>/seed_<seed>/; a seed sets the initialisation and the order of the training batches
(`data.shuffle_seed`), the validation images are the same for every run.

Run it again on the same --out to resume: finished runs are skipped, an interrupted one continues
from its last checkpoint, more seeds add runs. The report is rewritten after every setting: table.md
(printed at the end), results.csv, results.json, runs.csv and sweep_vit.png. Config overrides
(`--data.dataset=...`) apply to every run. Exit status 1 when a run failed.
"""

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lm_moe.cli import configs_not_of_task
from lm_moe.command_line import ArgumentParser, exit_with_error
from lm_moe.profiling.comparison import Run, SweepSettings, require_same_settings, train
from lm_moe.profiling.models import build_from_config, resolved_config
from lm_moe.profiling.script_options import parse_seeds, resolve_steps
from lm_moe.profiling.vit_sweep import (EXPERTS, FIXED_EXPERTS, SLOTS_PER_EXPERT, TOTAL_SLOTS, run_row, sweep_settings,
                                        write_sweep_report)

REPO = Path(__file__).resolve().parents[1]
PROG = "sweep_vit.py"


def positive_ints(parser: argparse.ArgumentParser, option: str, values: list[int]) -> list[int]:
    if any(value < 1 for value in values):
        parser.error(f"{option} takes positive whole numbers, got {' '.join(map(str, values))}")
    return values


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soft-moe-config", type=Path, default=REPO / "configs/vit/soft_moe.yaml")
    parser.add_argument("--dense-config", type=Path, default=REPO / "configs/vit/dense.yaml")
    parser.add_argument("--trainer", type=Path, default=REPO / "configs/trainer/cpu_quick_vit.yaml", help="trainer preset")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps of every run (default: the preset's)")
    parser.add_argument("--val-every", type=int, default=None, help="validation interval (default: max steps / 3)")
    parser.add_argument("--seeds", default="1234,1235,1236", help="seeds of every setting (default: 1234,1235,1236)")
    parser.add_argument("--experts", type=int, nargs="*", default=EXPERTS, help="the experts sweep (4 8 16 32)")
    parser.add_argument("--total-slots", type=int, default=TOTAL_SLOTS, help="the experts sweep's slots per layer (32)")
    parser.add_argument("--slots-per-expert", type=int, nargs="*", default=SLOTS_PER_EXPERT, help="the slots sweep (1 2 4)")
    parser.add_argument("--fixed-experts", type=int, default=FIXED_EXPERTS, help="the slots sweep's experts (32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every run (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("results/vit_sweep"))
    args, overrides = parser.parse_known_args(argv)
    for option in ("soft_moe_config", "dense_config", "trainer"):
        if not getattr(args, option).is_file():
            parser.error(f"--{option.replace('_', '-')}: no file at {getattr(args, option)}")
    if not_vit := configs_not_of_task([args.soft_moe_config, args.dense_config], "vit"):
        parser.error(f"the sweep trains ViTs; not ViT configs: {', '.join(not_vit)}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    resolve_steps(parser, args, validations=3)
    args.seeds = parse_seeds(parser, args.seeds)
    for option in ("experts", "slots_per_expert"):
        positive_ints(parser, f"--{option.replace('_', '-')}", getattr(args, option))
    positive_ints(parser, "--total-slots and --fixed-experts", [args.total_slots, args.fixed_experts])
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    settings = SweepSettings(str(args.trainer.resolve()), args.max_steps, args.val_every, tuple(overrides))
    try:
        resolved = resolved_config(args.soft_moe_config, ["-c", settings.trainer, *overrides])
        setting_list = sweep_settings(args.soft_moe_config.resolve(), resolved["model"]["ffn"]["init_args"],
                                      args.dense_config.resolve(), args.experts, args.total_slots,
                                      args.slots_per_expert, args.fixed_experts)
        # Every setting's model is built once before any training: a bad one is refused now.
        params = {setting.name: sum(p.numel() for p in build_from_config(
            setting.config, [*overrides, *setting.overrides]).parameters()) for setting in setting_list}
        require_same_settings(args.out, settings)
    except ValueError as error:
        exit_with_error(PROG, str(error))
    batch_size = resolved["data"]["batch_size"]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    header = (f"# Soft MoE ViT sweeps\n\n{args.max_steps} steps (trainer preset `{args.trainer.name}`), seeds "
              f"{', '.join(map(str, args.seeds))}" + (f", overrides `{' '.join(overrides)}`" if overrides else "")
              + ". Every Soft MoE setting has the FLOPs of `" + args.soft_moe_config.name + "`. val loss and accuracy: "
              "after the last step, mean ± standard deviation over the seeds; gap: seed by seed against dense, "
              "verdict as in scripts/compare_lm.py; ms/step: median of the logged training throughput.\n\n")

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total} steps"),
               TimeElapsedColumn()]
    run_rows = []
    console = Console(width=200)
    with Progress(*columns, console=console, refresh_per_second=1) as progress:
        task = progress.add_task("sweep", total=len(setting_list) * len(args.seeds) * args.max_steps)
        done = 0
        for index, setting in enumerate(setting_list):
            for seed in args.seeds:
                run = Run(setting.name, setting.config, args.out / setting.name / f"seed_{seed}", seed, args.max_steps,
                          overrides=setting.overrides)
                label = f"{setting.name} seed {seed}"

                def show(step: int, label: str = label, done: int = done) -> None:
                    progress.update(task, completed=done + step, description=f"{label}: training")

                outcome = train(run, settings, args.threads, show)
                done += args.max_steps
                progress.console.print(f"{label}: {outcome.action if outcome.trained else 'FAILED: ' + outcome.reason}")
                run_rows.append(run_row(setting, run, outcome, batch_size))
            markdown = write_sweep_report(args.out, header, setting_list[:index + 1], run_rows, params)
        progress.update(task, completed=done, description="sweep done")
    print(markdown)
    print(f"wrote table.md, results.csv, results.json, runs.csv, sweep_vit.png to {args.out}")
    return 1 if any(row["status"] == "FAILED" for row in run_rows) else 0


if __name__ == "__main__":
    sys.exit(main())

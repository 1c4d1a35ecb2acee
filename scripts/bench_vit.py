"""Training images/s of the ViT configs through Lightning, side by side (dense vs Soft MoE at matched FLOPs).

    python scripts/bench_vit.py                                  # every config under configs/vit/
    python scripts/bench_vit.py -c configs/vit/dense.yaml -c configs/vit/soft_moe.yaml --rounds 1
    python scripts/bench_vit.py --soft-moe-sweep                 # the settings of scripts/sweep_vit.py

Every round trains each config from scratch through `Trainer.fit` (TensorBoard logging, MoE stats,
no validation), in turns, so machine noise hits all configs alike. Images/s are timed over the
steps after `--warmup`; the tables report medians over rounds and the ratios to the dense config.
To time another setting (e.g. more experts), give a config file of it with -c; --soft-moe-sweep
times the settings of scripts/sweep_vit.py's default sweeps (experts at fixed slots, slots per
expert at fixed experts, all at soft_moe.yaml's FLOPs) beside dense.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from bench_train import StepTimer, build, parse_timing_options  # the LM benchmark's Lightning helpers (same folder)
from lm_moe.command_line import ArgumentParser
from lm_moe.cpu_allocator import tune_cpu_allocator
from lm_moe.output_files import write_text_atomically
from lm_moe.profiling.models import resolved_config
from lm_moe.profiling.vit_sweep import EXPERTS, FIXED_EXPERTS, SLOTS_PER_EXPERT, TOTAL_SLOTS, sweep_settings

REPO = Path(__file__).resolve().parents[1]

# Target of each config's images/s relative to the dense ViT's (docs/vit.md, with its measurements).
TARGETS = {"soft_moe": 0.8}


def lightning_images_per_sec(config: Path, trainer_config: Path, steps: int, warmup: int, log_dir: str,
                             overrides: tuple[str, ...] = ()) -> float:
    built = build(config, trainer_config, steps, log_dir, overrides)
    timer = StepTimer(warmup)
    built.trainer.callbacks.append(timer)
    built.trainer.fit(built.model, built.datamodule)
    return (steps - warmup) * built.datamodule.batch_size / (timer.end - timer.start)


def sweep_runs(trainer: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """scripts/sweep_vit.py's default settings, dense first: name -> (config, overrides)."""
    soft_moe = REPO / "configs/vit/soft_moe.yaml"
    ffn = resolved_config(soft_moe, ["-c", str(trainer)])["model"]["ffn"]["init_args"]
    settings = sweep_settings(soft_moe, ffn, REPO / "configs/vit/dense.yaml", EXPERTS, TOTAL_SLOTS, SLOTS_PER_EXPERT,
                              FIXED_EXPERTS)
    return {setting.name: (setting.config, setting.overrides) for setting in settings}


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, action="append", default=None,
                        help="ViT config (repeatable; default: every config under configs/vit/); dense.yaml is the reference")
    parser.add_argument("--soft-moe-sweep", action="store_true",
                        help="time the settings of scripts/sweep_vit.py's default sweeps beside dense instead of configs")
    args = parse_timing_options(parser, REPO / "configs/trainer/cpu_quick_vit.yaml", "vit")
    if args.soft_moe_sweep and args.config:
        parser.error("--soft-moe-sweep times the sweep's settings: give it without -c")
    runs = sweep_runs(args.trainer) if args.soft_moe_sweep else {
        path.stem: (path, ()) for path in (args.config or sorted((REPO / "configs/vit").glob("*.yaml")))}
    tune_cpu_allocator()

    rates: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as log_dir:
        for round_index in range(args.rounds):
            for name, (path, overrides) in runs.items():
                rates[name].append(lightning_images_per_sec(path, args.trainer, args.steps, args.warmup, log_dir,
                                                            overrides))
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))

    median = {name: statistics.median(values) for name, values in rates.items()}
    ratios = {}  # "name / dense" -> (median ratio, per-round ratios, target or None)
    if "dense" in median:
        for name in runs:
            if name != "dense":
                per_round = [rate / dense for rate, dense in zip(rates[name], rates["dense"])]
                ratios[f"{name} / dense"] = (median[name] / median["dense"], per_round, TARGETS.get(name))

    console = Console(width=200)
    rate_table = Table(title=f"training images/s, median of {args.rounds} rounds, {torch.get_num_threads()} threads",
                       box=box.MARKDOWN)
    for column in ("config", "images/s", "rounds"):
        rate_table.add_column(column)
    for name, rate in median.items():
        rate_table.add_row(name, f"{rate:.0f}", ", ".join(f"{value:.0f}" for value in rates[name]))
    ratio_table = Table(title="ratios (medians; per round in brackets)", box=box.MARKDOWN)
    for column in ("comparison", "ratio", "target"):
        ratio_table.add_column(column)
    for label, (ratio, per_round, target) in ratios.items():
        verdict = "-" if target is None else f">= {target} ({'ok' if ratio >= target else 'under'})"
        ratio_table.add_row(label, f"{ratio:.2f} ({', '.join(f'{r:.2f}' for r in per_round)})", verdict)
    console.print(rate_table)
    console.print(ratio_table)
    if args.json is not None:
        summary = {"images_per_sec": rates, "median": median,
                   "ratios": {label: ratio for label, (ratio, _, _) in ratios.items()}}
        write_text_atomically(args.json, json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Mixed precision and data parallelism on the CPU, measured side by side through the real CLI.

    python scripts/bench_scaling.py                          # configs/lm/top2.yaml
    python scripts/bench_scaling.py -c configs/lm/dense.yaml --steps 40 --rounds 3
    python scripts/bench_scaling.py -c configs/lm/top2.yaml --expert-parallel --rounds 3

Runs `python -m lm_moe fit` in subprocesses (the launch a user makes) and reads the training
tokens/s each run logged to TensorBoard (median over the steps after `--warmup`):
- precision: 32-true against bf16-mixed, one process using every core;
- data parallel: 2 DDP processes with one thread each (configs/trainer/cpu_ddp.yaml; the global
  batch is 2 x data.batch_size) against one process with 2 threads on the same global batch;
- expert parallel: the same 2 processes holding half of the experts each (configs/trainer/cpu_ep.yaml)
  against DDP (configs that have MoE layers of TopKMoE, ReMoE or the slot layers).
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from lm_moe.command_line import ArgumentParser
from lm_moe.output_files import add_json_option, require_free_output, write_text_atomically
from lm_moe.profiling.fit_runs import fit_tokens_per_sec
from lm_moe.profiling.script_options import require_language_model_config, require_warmup_below_steps

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"bf16-mixed / 32-true": 1.1, "2-process DDP / 1 process": 0.9, "expert parallel / DDP": 0.8}
DDP_RUN, EP_RUN = "2-process DDP, 1 thread each", "2-process expert parallel, 1 thread each"


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=REPO / "configs/lm/top2.yaml",
                        help="LM config (default: configs/lm/top2.yaml)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median (default: 5)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every setting, in turns (default: 2)")
    parser.add_argument("--batch", type=int, default=16, help="per-process batch of the DDP runs (default: 16)")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="also train with the experts split over the 2 processes (configs/trainer/cpu_ep.yaml)")
    add_json_option(parser)
    args = parser.parse_args()
    require_free_output(parser, "--json", args.json, args.overwrite, folder=False)
    require_warmup_below_steps(parser, args.steps, args.warmup)
    if args.rounds < 1 or args.batch < 1:
        parser.error(f"--rounds and --batch must be >= 1, got {args.rounds} and {args.batch}")
    require_language_model_config(parser, args.config)
    args.config = args.config.resolve()  # the fits run in a scratch folder
    quick, ddp = REPO / "configs/trainer/cpu_quick.yaml", REPO / "configs/trainer/cpu_ddp.yaml"
    runs = {
        "32-true": (quick, ["--trainer.precision=32-true"], None),
        "bf16-mixed": (quick, ["--trainer.precision=bf16-mixed"], None),
        # As many threads as the two DDP processes have together, whatever the machine's core count.
        "1 process, 2 threads": (quick, [f"--data.batch_size={2 * args.batch}"], 2),
        DDP_RUN: (ddp, [f"--data.batch_size={args.batch}"], 1),
    }
    if args.expert_parallel:
        runs[EP_RUN] = (REPO / "configs/trainer/cpu_ep.yaml", [f"--data.batch_size={args.batch}"], 1)
    rates = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as directory:
        for round_index in range(args.rounds):
            for name, (trainer, extra, threads) in runs.items():
                rates[name].append(fit_tokens_per_sec(args.config, trainer, extra, args.steps, args.warmup, Path(directory),
                                                      threads))
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    ratios = {
        "bf16-mixed / 32-true": median["bf16-mixed"] / median["32-true"],
        "2-process DDP / 1 process": median[DDP_RUN] / median["1 process, 2 threads"],
    }
    if args.expert_parallel:
        ratios["expert parallel / DDP"] = median[EP_RUN] / median[DDP_RUN]
    table = Table(title=f"{args.config.name}: training tokens/s (median of {args.rounds} rounds)", box=box.MARKDOWN)
    for column in ("run", "tokens/s"):
        table.add_column(column)
    for name, rate in median.items():
        table.add_row(name, f"{rate:.0f}")
    ratio_table = Table(title="ratios", box=box.MARKDOWN)
    for column in ("comparison", "ratio", "target"):
        ratio_table.add_column(column)
    for name, ratio in ratios.items():
        ratio_table.add_row(name, f"{ratio:.2f}", f">= {TARGETS[name]} ({'ok' if ratio >= TARGETS[name] else 'under'})")
    console = Console(width=200)
    console.print(table)
    console.print(ratio_table)
    if args.json is not None:
        write_text_atomically(args.json, json.dumps({"tokens_per_sec": rates, "median": median, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()

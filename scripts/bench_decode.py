"""Decoding speed with the cache against recomputing the full forward, per LM config.

    python scripts/bench_decode.py                                  # every config under configs/lm/
    python scripts/bench_decode.py -c configs/lm/top2.yaml --contexts 64 512 --json results/decode.json

For each config and context length L: the time of one cached decoding step after a prefill of L
tokens (mean over `--steps` steps) and the time of one full forward over L + 1 tokens (what
decoding without a cache would cost per step). A step decodes one token for every row of the
batch: `--batch` rows, rounded up to a whole number of groups where Mixture of Tokens decodes
groups in lock-step. fp32, eval mode, no gradients.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from lm_moe.cli import configs_not_of_task
from lm_moe.command_line import ArgumentParser
from lm_moe.cpu_allocator import tune_cpu_allocator
from lm_moe.layers.batch_groups import required_batch_multiple
from lm_moe.output_files import add_json_option, require_free_output, write_text_atomically
from lm_moe.profiling.inference import round_up
from lm_moe.profiling.models import build_from_config, refused_configs

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def cached_step_seconds(model, ids: torch.Tensor, context: int, steps: int) -> float:
    """Mean seconds of one decoding step after a prefill of `context` tokens."""
    cache = model.new_cache(ids.shape[0])
    model(ids[:, :context], cache=cache)
    start = time.perf_counter()
    for i in range(steps):
        model(ids[:, context + i : context + i + 1], cache=cache)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def full_forward_seconds(model, ids: torch.Tensor, context: int, repeats: int) -> float:
    """Median seconds of one forward over context + 1 tokens."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids[:, : context + 1])
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, action="append", default=None,
                        help="LM config (repeatable; default: every config under configs/lm/)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 128, 256, 512],
                        help="prompt lengths L decoded after (default: 64 128 256 512; the model is built with a context that fits)")
    parser.add_argument("--batch", type=int, default=4, help="rows decoded side by side (default: 4)")
    parser.add_argument("--steps", type=int, default=16, help="cached decoding steps timed per context (default: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed full forwards per context, median (default: 3)")
    add_json_option(parser)
    args = parser.parse_args()
    require_free_output(parser, "--json", args.json, args.overwrite, folder=False)
    if min(args.contexts) <= 0 or args.batch <= 0 or args.steps <= 0 or args.repeats <= 0:
        parser.error("--contexts, --batch, --steps and --repeats must be positive")
    configs = args.config or sorted((REPO / "configs/lm").glob("*.yaml"))
    not_lm = configs_not_of_task(configs, "lm")
    if not_lm:
        parser.error(f"decoding is for language-model configs (task: lm) that exist; not: {not_lm}")
    refused = refused_configs(configs)
    if refused:
        parser.error("; ".join(refused))
    tune_cpu_allocator()
    torch.manual_seed(0)
    block_size = max(args.contexts) + args.steps + 1

    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("decoding", total=len(configs) * len(args.contexts))
        for config in configs:
            model = build_from_config(config, block_size=block_size)
            batch = round_up(args.batch, required_batch_multiple(model))
            ids = torch.randint(0, model.vocab_size, (batch, block_size))
            for context in args.contexts:
                step = cached_step_seconds(model, ids, context, args.steps)
                full = full_forward_seconds(model, ids, context, args.repeats)
                rows.append({"config": config.stem, "batch": batch, "context": context,
                             "cached_ms_per_step": 1e3 * step, "recompute_ms_per_step": 1e3 * full,
                             "speedup": full / step})
                progress.advance(task)

    table = Table(title=f"decoding steps (one token per row), fp32, {torch.get_num_threads()} threads", box=box.MARKDOWN)
    for column in ("config", "batch", "context", "cached ms/step", "recompute ms/step", "cache speed-up"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["config"], str(row["batch"]), str(row["context"]), f"{row['cached_ms_per_step']:.2f}",
                      f"{row['recompute_ms_per_step']:.2f}", f"{row['speedup']:.1f}x")
    Console(width=200).print(table)
    if args.json is not None:
        write_text_atomically(args.json, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

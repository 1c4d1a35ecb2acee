"""Forward+backward time of each MoE layer against its FLOP-matched baseline, side by side.

    python scripts/bench_layers.py            # the sizes of the performance targets
    python scripts/bench_layers.py --quick    # small sizes, a few seconds
    python scripts/bench_layers.py --json results/bench_layers.json

Each comparison runs both layers in turns (warm-up first, then `--repeats` rounds) on the same
input and reports the ratio of median times: lower is better, 1.0 = as fast as the baseline.
"""

import argparse
import json
import statistics
from dataclasses import dataclass
from functools import partial

import torch
from rich import box
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

from lm_moe.command_line import ArgumentParser
from lm_moe.cpu_allocator import tune_cpu_allocator
from lm_moe.layers import DenseFFN, SoftMoE, TopKMoE
from lm_moe.output_files import add_json_option, require_free_output, write_text_atomically
from lm_moe.profiling.timing import time_in_turns


@dataclass
class Comparison:
    name: str
    layer: nn.Module
    baseline_name: str
    baseline: nn.Module
    target: float  # the largest acceptable time ratio layer / baseline


def comparisons(dim: int, scale: int) -> list[Comparison]:
    """The three performance targets; `scale` divides every hidden width and expert count."""
    h = 1024 // scale
    return [
        Comparison(
            f"TopKMoE top-2, 8 x {h}",
            TopKMoE(dim, h, 8, top_k=2),
            f"DenseFFN {2 * h} (same active FLOPs)",
            DenseFFN(dim, 2 * h),
            1.15,
        ),
        Comparison(
            f"SoftMoE 8 experts x {32 // scale} slots, {h}",
            SoftMoE(dim, h, 8, slots_per_expert=32 // scale),
            f"DenseFFN {h}",
            DenseFFN(dim, h),
            1.5,
        ),
        Comparison(
            f"SoftMoE {128 // scale} experts x 1 slot, {h // 4}",
            SoftMoE(dim, h // 4, 128 // scale, slots_per_expert=1),
            f"SoftMoE 8 x {16 // scale} slots, {h // 4} (same FLOPs)",
            SoftMoE(dim, h // 4, 8, slots_per_expert=16 // scale),
            2.0,
        ),
    ]


def training_step(layer: nn.Module, x: torch.Tensor) -> None:
    """One forward+backward as in training: fresh gradients, loss = output + aux loss."""
    for parameter in layer.parameters():
        parameter.grad = None
    inputs = x.detach().requires_grad_()
    y, aux = layer(inputs)
    (y.float().square().mean() + aux.loss).backward()


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default: 8, or 2 with --quick)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (the allocator settles in 3-5)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 20, or 5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="quarter-size layers (and batch 2 unless --batch): a smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--system-allocator",
        action="store_true",
        help="leave the CPU allocator as it is (by default freed memory is kept for reuse, as on GPUs, "
        "and tensors of 2 MB or more get huge pages)",
    )
    add_json_option(parser)
    args = parser.parse_args()
    require_free_output(parser, "--json", args.json, args.overwrite, folder=False)
    for name in ("batch", "seq", "dim", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main() -> None:
    args = parse_args()
    if args.batch is None:
        args.batch = 2 if args.quick else 8
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    allocator = ", ".join([] if args.system_allocator else tune_cpu_allocator()) or "system default"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.dim)
    cases = comparisons(args.dim, scale=4 if args.quick else 1)

    results = []
    with Progress(transient=True) as progress:
        for case in cases:
            task = progress.add_task(case.name, total=args.repeats)
            samples = time_in_turns(
                {"layer": partial(training_step, case.layer, x), "baseline": partial(training_step, case.baseline, x)},
                warmup=args.warmup,
                repeats=args.repeats,
                on_round=partial(progress.advance, task),
            )
            layer_ms = 1e3 * statistics.median(samples["layer"])
            baseline_ms = 1e3 * statistics.median(samples["baseline"])
            results.append(
                {
                    "layer": case.name,
                    "baseline": case.baseline_name,
                    "layer_ms": layer_ms,
                    "baseline_ms": baseline_ms,
                    "ratio": layer_ms / baseline_ms,
                    "target": case.target,
                }
            )

    shape = f"B={args.batch}, T={args.seq}, D={args.dim}"
    table = Table(
        title=f"forward+backward, {shape}, {torch.get_num_threads()} threads, allocator: {allocator}",
        box=box.MARKDOWN,
    )
    for column in ("layer", "baseline", "layer ms", "baseline ms", "ratio", "target"):
        table.add_column(column)
    for row in results:
        # The targets are set for the full sizes; quick sizes are for a smoke run only.
        verdict = "not judged: --quick" if args.quick else ("ok" if row["ratio"] <= row["target"] else "over")
        table.add_row(
            row["layer"],
            row["baseline"],
            f"{row['layer_ms']:.1f}",
            f"{row['baseline_ms']:.1f}",
            f"{row['ratio']:.2f}",
            f"<= {row['target']} ({verdict})",
        )
    Console(width=200).print(table)
    if args.json is not None:
        meta = {"batch": args.batch, "seq": args.seq, "dim": args.dim, "quick": args.quick,
                "threads": torch.get_num_threads(), "allocator": allocator}
        write_text_atomically(args.json, json.dumps({"settings": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()

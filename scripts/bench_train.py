"""Training throughput: the full Lightning loop against a bare PyTorch loop, and top-2 against dense.

    python scripts/bench_train.py                 # configs/lm/dense.yaml and top2.yaml as they are
    python scripts/bench_train.py --steps 10 --rounds 1 --json results/bench_train.json

Every round trains each config from scratch twice, through `Trainer.fit` (TensorBoard logging,
MoE stats, no validation) and through a plain loop doing the same work (forward, fp32
cross-entropy + aux loss, backward, gradient clipping, AdamW, schedule). Tokens/s are timed over
the steps after `--warmup`; the table reports medians over rounds and the ratios.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Table

from lm_moe import cli
from lm_moe.profiling.allocator import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]


class StepTimer(pl.Callback):
    """Wall time from the start of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def build(config: Path, trainer_config: Path, steps: int, log_dir: str) -> cli.LanguageModelCLI:
    """Model, data and trainer of `config`, as `python -m lm_moe fit` would build them."""
    return cli.main(
        [
            "-c", str(config),
            "-c", str(trainer_config),
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.callbacks=[]",
            f"--trainer.logger.init_args.save_dir={log_dir}",
        ],
        run=False,
    )


def lightning_tokens_per_sec(config: Path, trainer_config: Path, steps: int, warmup: int, log_dir: str) -> float:
    built = build(config, trainer_config, steps, log_dir)
    timer = StepTimer(warmup)
    built.trainer.callbacks.append(timer)
    built.trainer.fit(built.model, built.datamodule)
    tokens = (steps - warmup) * built.datamodule.batch_size * built.datamodule.block_size
    return tokens / (timer.end - timer.start)


def bare_tokens_per_sec(config: Path, trainer_config: Path, steps: int, warmup: int, log_dir: str) -> float:
    built = build(config, trainer_config, steps, log_dir)
    module, data = built.model, built.datamodule
    data.prepare_data()
    data.setup("fit")
    clip = built.trainer.gradient_clip_val
    module.trainer = built.trainer  # configure_optimizers reads the total step count from it
    optimizers = module.configure_optimizers()
    optimizer, schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    model = module.model.train()
    batches = iter(data.train_dataloader())
    start = None
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        batch = next(batches)
        output = model(batch["input_ids"])
        loss = F.cross_entropy(output.logits.float().flatten(0, 1), batch["targets"].flatten()) + output.aux_loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    tokens = (steps - warmup) * data.batch_size * data.block_size
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", type=Path, default=REPO / "configs/lm/dense.yaml")
    parser.add_argument("--top2", type=Path, default=REPO / "configs/lm/top2.yaml")
    parser.add_argument("--trainer", type=Path, default=REPO / "configs/trainer/cpu_quick.yaml")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    keep_freed_memory()

    rates = {name: [] for name in ("dense lightning", "dense bare", "top2 lightning", "top2 bare")}
    with tempfile.TemporaryDirectory() as log_dir:
        for round_index in range(args.rounds):
            for name, config in (("dense", args.dense), ("top2", args.top2)):
                for loop, measure in (("lightning", lightning_tokens_per_sec), ("bare", bare_tokens_per_sec)):
                    rate = measure(config, args.trainer, args.steps, args.warmup, log_dir)
                    rates[f"{name} {loop}"].append(rate)
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in rates.items()))

    median = {name: statistics.median(values) for name, values in rates.items()}
    ratios = {
        "dense: Lightning / bare loop": (median["dense lightning"] / median["dense bare"], 0.9),
        "top2: Lightning / bare loop": (median["top2 lightning"] / median["top2 bare"], None),
        "top2 / dense (Lightning)": (median["top2 lightning"] / median["dense lightning"], 0.8),
    }
    table = Table(title=f"training tokens/s, median of {args.rounds} rounds, {torch.get_num_threads()} threads", box=box.MARKDOWN)
    for column in ("comparison", "ratio", "target"):
        table.add_column(column)
    for name, (ratio, target) in ratios.items():
        table.add_row(name, f"{ratio:.2f}", "-" if target is None else f">= {target} ({'ok' if ratio >= target else 'under'})")
    console = Console(width=200)
    console.print(", ".join(f"{name}: {rate:.0f} tok/s" for name, rate in median.items()))
    console.print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tokens_per_sec": rates, "median": median, "ratios": {k: v[0] for k, v in ratios.items()}}, indent=2))


if __name__ == "__main__":
    main()

"""Training throughput of every LM config through Lightning, against a bare PyTorch loop and
against each other (the variants at matched active FLOPs).

    python scripts/bench_train.py                                   # every config under configs/lm/
    python scripts/bench_train.py -c configs/lm/dense.yaml -c configs/lm/top2.yaml --rounds 1

Every round trains each config from scratch through `Trainer.fit` (TensorBoard logging, MoE stats,
no validation) and, for the `--bare` configs, through a plain loop doing the same work (forward in
the preset's precision, fp32 cross-entropy + aux loss, backward, gradient clipping, AdamW,
schedule). Tokens/s are timed over the steps after `--warmup`; the tables report medians over
rounds and the ratios.
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
from lm_moe.command_line import ArgumentParser
from lm_moe.cpu_allocator import tune_cpu_allocator
from lm_moe.output_files import add_json_option, require_free_output, write_text_atomically
from lm_moe.profiling.models import refused_configs
from lm_moe.profiling.script_options import require_warmup_below_steps

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


def build(config: Path, trainer_config: Path, steps: int, log_dir: str, overrides: tuple[str, ...] = ()) -> cli.LanguageModelCLI:
    """Model, data and trainer of `config` (with `overrides`, CLI flags), as `python -m lm_moe fit`
    would build them."""
    return cli.main(
        [
            "-c", str(config),
            "-c", str(trainer_config),
            *overrides,
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.callbacks=[]",
            "--checkpoint.monitor=null",  # no validation to monitor: keep the last weights
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
        with built.trainer.precision_plugin.forward_context():  # autocast under a mixed-precision preset
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


# Target of each config's Lightning tokens/s, relative to another config's (docs/causal_variants.md#measured).
TARGETS = {
    "top2": ("dense", 0.8),
    "cumulative": ("top2", 0.6),
    "lagged_chunk": ("top2", 0.9),
    "mixture_of_tokens": ("top2", 0.9),
    "segment_merged": ("top2", 0.9),
}
BARE_LOOP_TARGET = 0.9  # Lightning / bare loop, for the configs run both ways


def parse_timing_options(parser: argparse.ArgumentParser, trainer: Path, task: str) -> argparse.Namespace:
    """Add the options every training benchmark takes (trainer preset, steps, warm-up steps,
    rounds, --json) to `parser`, and parse the command line; the `-c` configs must be of `task`."""
    parser.add_argument("--trainer", type=Path, default=trainer, help="trainer preset")
    parser.add_argument("--steps", type=int, default=25, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every config, in turns")
    add_json_option(parser)
    args = parser.parse_args()
    require_free_output(parser, "--json", args.json, args.overwrite, folder=False)
    require_warmup_below_steps(parser, args.steps, args.warmup)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if not args.trainer.is_file():
        parser.error(f"no trainer preset at {args.trainer}")
    wrong = cli.configs_not_of_task(args.config or [], task)
    if wrong:
        parser.error(f"this benchmark times configs of task {task} that exist; not: {', '.join(wrong)}")
    refused = refused_configs(args.config or [])
    if refused:
        parser.error("; ".join(refused))
    return args


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, action="append", default=None,
                        help="LM config (repeatable; default: every config under configs/lm/)")
    parser.add_argument("--bare", nargs="*", default=["dense", "top2"],
                        help="config names also timed through the bare PyTorch loop")
    args = parse_timing_options(parser, REPO / "configs/trainer/cpu_quick.yaml", "lm")
    configs = {path.stem: path for path in (args.config or sorted((REPO / "configs/lm").glob("*.yaml")))}
    tune_cpu_allocator()

    runs = [(name, "lightning") for name in configs] + [(name, "bare") for name in configs if name in args.bare]
    rates = {f"{name} {loop}": [] for name, loop in runs}
    measure = {"lightning": lightning_tokens_per_sec, "bare": bare_tokens_per_sec}
    with tempfile.TemporaryDirectory() as log_dir:
        for round_index in range(args.rounds):
            for name, loop in runs:
                rate = measure[loop](configs[name], args.trainer, args.steps, args.warmup, log_dir)
                rates[f"{name} {loop}"].append(rate)
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))

    median = {key: statistics.median(values) for key, values in rates.items()}
    ratios = {}  # label -> (ratio, target or None)
    for name in configs:
        if f"{name} bare" in median:
            ratios[f"{name}: Lightning / bare loop"] = (median[f"{name} lightning"] / median[f"{name} bare"], BARE_LOOP_TARGET)
    for name, (reference, target) in TARGETS.items():
        if name in configs and reference in configs:
            ratios[f"{name} / {reference}"] = (median[f"{name} lightning"] / median[f"{reference} lightning"], target)

    console = Console(width=200)
    rate_table = Table(title=f"training tokens/s, median of {args.rounds} rounds, {torch.get_num_threads()} threads", box=box.MARKDOWN)
    for column in ("config", "loop", "tokens/s"):
        rate_table.add_column(column)
    for key, rate in median.items():
        rate_table.add_row(*key.split(" "), f"{rate:.0f}")
    ratio_table = Table(title="ratios", box=box.MARKDOWN)
    for column in ("comparison", "ratio", "target"):
        ratio_table.add_column(column)
    for label, (ratio, target) in ratios.items():
        ratio_table.add_row(label, f"{ratio:.2f}", f">= {target} ({'ok' if ratio >= target else 'under'})")
    console.print(rate_table)
    console.print(ratio_table)
    if args.json is not None:
        summary = {"tokens_per_sec": rates, "median": median, "ratios": {label: ratio for label, (ratio, _) in ratios.items()}}
        write_text_atomically(args.json, json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

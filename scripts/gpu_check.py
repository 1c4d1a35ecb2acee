"""The GPU check: one script, under 8 minutes on one GPU, for the day a GPU machine is at hand.

    python scripts/gpu_check.py --out results/gpu_check                       # on a GPU machine
    python scripts/gpu_check.py --out results/gpu_check_cpu --accelerator cpu --steps 4 --tiny   # its logic, on a CPU

Three measurements, printed as tables and written to <out>/gpu_check.json:
1. training tokens/s in bf16-mixed of every LM config (`python -m lm_moe fit` with the
   gpu_single preset, median over the steps after --warmup);
2. the layer benchmark in bf16: forward + backward of each config's FFN layer alone on
   [--batch, --seq, dim] under bf16 autocast, in ms, and its ratio to the dense MLP's;
3. one 16-mixed run of top2 (fp16 with loss scaling on a GPU): its tokens/s and final training loss.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from lm_moe.cli import configs_not_of_task
from lm_moe.command_line import ArgumentParser
from lm_moe.output_files import require_free_output, write_text_atomically
from lm_moe.profiling.fit_runs import fit_tokens_per_sec
from lm_moe.profiling.models import build_from_config
from lm_moe.profiling.script_options import require_warmup_below_steps
from lm_moe.profiling.training_curves import curve

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "configs/trainer/gpu_single.yaml"
# --tiny: a model small enough for a CPU to run the whole check in a minute.
TINY = ["--model.n_layer=2", "--model.dim=64", "--model.n_head=2", "--model.dense_hidden_dim=128",
        "--data.max_documents=40", "--data.vocab_size=512", "--data.block_size=32", "--data.batch_size=4",
        "--data.num_workers=0", "--model.ffn.init_args.hidden_dim=64"]


def layer_ms(layer: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median ms of the layer's forward + backward on x under bf16 autocast."""
    device = x.device

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y, aux = layer(x)
        (y.float().square().mean() + aux.loss).backward()

    for _ in range(3):
        step()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


def config_overrides(config: Path, tiny: bool) -> list[str]:
    """--tiny's overrides that this config takes (a dense config has no FFN layer to shrink)."""
    if not tiny:
        return []
    dense = "ffn: null" in config.read_text()
    return [flag for flag in TINY if not (dense and flag.startswith("--model.ffn."))]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, action="append", default=None,
                        help="LM config (repeatable; default: every config under configs/lm/)")
    parser.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu",
                        help="gpu (default), or cpu to check the script's logic on a machine without one")
    parser.add_argument("--steps", type=int, default=60, help="training steps of each fit (default: 60)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the median (default: 10)")
    parser.add_argument("--batch", type=int, default=16, help="the layer benchmark's batch (default: 16)")
    parser.add_argument("--seq", type=int, default=512, help="the layer benchmark's sequence length (default: 512)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds of each layer (default: 20)")
    parser.add_argument("--tiny", action="store_true", help="toy-sized models: for the CPU check of the logic")
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    args = parser.parse_args(argv)
    require_free_output(parser, "--out", args.out, overwrite=False, folder=True)
    require_warmup_below_steps(parser, args.steps, args.warmup)
    for name in ("batch", "seq", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    configs = args.config or sorted((REPO / "configs/lm").glob("*.yaml"))
    if not_lm := configs_not_of_task(configs, "lm"):
        parser.error(f"the check trains language models; not LM configs: {', '.join(not_lm)}")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("no GPU here (torch.cuda.is_available() is False): give --accelerator cpu to check the logic")
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    on_device = [f"--trainer.accelerator={args.accelerator}"]
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "bf16_tokens_per_s": {}, "layer_ms_bf16": {}, "fp16": {}}
    console = Console(width=200)
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        for config in configs:
            extra = [*on_device, *config_overrides(config, args.tiny), "--trainer.precision=bf16-mixed"]
            results["bf16_tokens_per_s"][config.stem] = fit_tokens_per_sec(config.resolve(), TRAINER, extra, args.steps,
                                                                           args.warmup, work)
            model = build_from_config(config, config_overrides(config, args.tiny))
            layer = model.blocks[-1].ffn.to(device).train()
            x = torch.randn(args.batch, args.seq, layer.experts.dim if hasattr(layer, "experts") else layer.expert.dim,
                            device=device, requires_grad=True)
            results["layer_ms_bf16"][config.stem] = layer_ms(layer, x, args.repeats)
            console.print(f"{config.stem}: {results['bf16_tokens_per_s'][config.stem]:.0f} tokens/s, "
                          f"FFN layer {results['layer_ms_bf16'][config.stem]:.2f} ms")
        top2 = REPO / "configs/lm/top2.yaml"
        extra = [*on_device, *config_overrides(top2, args.tiny), "--trainer.precision=16-mixed"]
        results["fp16"]["top2_tokens_per_s"] = fit_tokens_per_sec(top2, TRAINER, extra, args.steps, args.warmup, work)
        losses = curve(max(work.glob("run*"), key=lambda path: int(path.name[3:])), "train/loss")
        results["fp16"]["top2_final_train_loss"] = losses[-1].value if losses else None

    dense_ms = results["layer_ms_bf16"].get("dense")
    table = Table(title=f"GPU check on {results['device']}: bf16-mixed", box=box.MARKDOWN)
    for column in ("config", "training tokens/s", "FFN layer ms (fwd + bwd)", "/ dense layer"):
        table.add_column(column)
    for name, rate in results["bf16_tokens_per_s"].items():
        ms = results["layer_ms_bf16"][name]
        table.add_row(name, f"{rate:.0f}", f"{ms:.2f}", f"{ms / dense_ms:.2f}" if dense_ms else "-")
    console.print(table)
    console.print(f"16-mixed top2: {results['fp16']['top2_tokens_per_s']:.0f} tokens/s, "
                  f"final training loss {results['fp16']['top2_final_train_loss']}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out / "gpu_check.json", json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

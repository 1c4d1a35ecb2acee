"""Where an expert-parallel training step spends its time: the all-to-all's share, on 2 gloo processes.

    python scripts/bench_expert_parallel.py                          # configs/lm/top2.yaml
    python scripts/bench_expert_parallel.py -c configs/lm/remoe.yaml --steps 20 --warmup 5

Each of the 2 processes (one thread each) builds the config's GPT, keeps half of every MoE
layer's experts as ExpertParallelStrategy does (lm_moe.lit.expert_parallel_strategy), and trains
on random token batches of --batch sequences: forward, backward with DDP's all-reduce of the
replicated parameters, the expert shards' gradient average, AdamW. torch.profiler times the steps
after --warmup. Per rank, the table gives the median step time, the time spent in all-to-alls
(the count exchange and the rows' trips out and back, in the forward and the backward pass) and
its share of the step. An all-to-all returns when the other rank's rows have arrived, so its time
includes waiting for the slower rank: the cost of expert parallelism, not of the transport alone.
Tokens/s against DDP come from `python scripts/bench_scaling.py --expert-parallel`.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from lm_moe.command_line import ArgumentParser
from lm_moe.layers.expert_parallel import ExpertShard
from lm_moe.layers.feed_forward_layer import end_of_step, feed_forward_layers
from lm_moe.lit.expert_parallel_strategy import shard_moe_layers, sharded_layers
from lm_moe.output_files import add_json_option, require_free_output, write_text_atomically
from lm_moe.profiling.models import build_from_config
from lm_moe.profiling.script_options import require_language_model_config, require_warmup_below_steps

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no "USDT: ... profiler_start" line at every profiled step
# The profiler's name for the gloo work of an all-to-all: each MoE layer's count exchange and its
# rows' trips out and back, forward and backward, 5 per layer and step. The work runs on gloo's
# thread while the training thread waits for it, so their sum is the time the step spends in them.
ALL_TO_ALL_EVENT = "gloo:all_to_all"


def _train_step(model: DistributedDataParallel, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    output = model(tokens[:, :-1])
    loss = F.cross_entropy(output.logits.flatten(0, 1), tokens[:, 1:].flatten()) + output.aux_loss
    loss.backward()
    end_of_step(model.module)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _on_rank(rank: int, config: str, batch: int, steps: int, warmup: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        network = build_from_config(config).train()
        shard_moe_layers(network, ExpertShard.of_group(dist.group.WORLD, gradient_divisor=WORLD))
        model = DistributedDataParallel(network)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(rank)
        context = network.block_size
        batches = [torch.randint(network.vocab_size, (batch, context + 1), generator=generator)
                   for _ in range(steps)]  # [B, T+1] each
        for tokens in batches[:warmup]:
            _train_step(model, optimizer, tokens)
        step_ms, exchange_ms = [], []
        for tokens in batches[warmup:]:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                start = time.perf_counter()
                _train_step(model, optimizer, tokens)
                step_ms.append((time.perf_counter() - start) * 1e3)
            events = profile.key_averages()
            exchange_ms.append(sum(event.cpu_time_total for event in events if event.key == ALL_TO_ALL_EVENT) / 1e3)
        experts = [layer.experts.num_experts for layer in sharded_layers(network)]
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, {"step_ms": step_ms, "exchange_ms": exchange_ms, "experts_held": experts,
                                          "tokens_per_step": batch * context})
        if rank == 0:
            torch.save(gathered, out_file)
        dist.barrier()  # no rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=REPO / "configs/lm/top2.yaml",
                        help="LM config (default: configs/lm/top2.yaml)")
    parser.add_argument("--steps", type=int, default=15, help="training steps per process (default: 15)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out (default: 5)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per process and step (default: 16)")
    add_json_option(parser)
    args = parser.parse_args()
    require_free_output(parser, "--json", args.json, args.overwrite, folder=False)
    require_warmup_below_steps(parser, args.steps, args.warmup)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    require_language_model_config(parser, args.config)
    if not any(layer.supports_expert_parallelism for layer in feed_forward_layers(build_from_config(args.config))):
        parser.error(f"{args.config}: no MoE layer that supports expert parallelism (TopKMoE, ReMoE, the slot layers)")

    with tempfile.TemporaryDirectory() as directory:
        out_file = Path(directory) / "ranks.pt"
        mp.spawn(_on_rank, args=(str(args.config), args.batch, args.steps, args.warmup, str(Path(directory) / "init"),
                                 str(out_file)), nprocs=WORLD, join=True)
        ranks = torch.load(out_file)

    table = Table(title=f"{args.config.name}: expert parallel on {WORLD} processes, median of "
                        f"{args.steps - args.warmup} steps", box=box.MARKDOWN)
    for column in ("rank", "experts held per layer", "step ms", "all-to-all ms", "all-to-all share"):
        table.add_column(column)
    summary = []
    for rank, measured in enumerate(ranks):
        step, exchange = statistics.median(measured["step_ms"]), statistics.median(measured["exchange_ms"])
        summary.append({"rank": rank, "experts_held": measured["experts_held"], "step_ms": step,
                        "all_to_all_ms": exchange, "all_to_all_share": exchange / step,
                        "tokens_per_step": measured["tokens_per_step"]})
        table.add_row(str(rank), ", ".join(map(str, measured["experts_held"])), f"{step:.0f}", f"{exchange:.1f}",
                      f"{exchange / step:.1%}")
    Console(width=200).print(table)
    if args.json is not None:
        write_text_atomically(args.json, json.dumps({"ranks": summary, "per_step": ranks}, indent=2))


if __name__ == "__main__":
    main()

"""Train a public MoE and its FLOP-matched dense twin on this project's data, beside lm_moe's own
models, all in the same plain PyTorch loop: is lm_moe's sparse baseline as strong as a public one?

    pip install -e '.[reference]'     # Hugging Face transformers, an optional extra
    python scripts/reference_pair.py --out results/reference_pair
    python scripts/reference_pair.py --out results/reference_pair --models hf_mixtral hf_mistral \
        configs/lm/top2.yaml configs/lm/dense.yaml --seeds 1234 1235 1236 --threads 1

Models: `hf_mixtral` (MixtralForCausalLM: 4 layers, width 256, 4 heads, 8 SwiGLU experts of width
512, top-2, its router's balancing loss off as in a fresh MixtralConfig) and `hf_mistral` (its
dense twin: MistralForCausalLM with one SwiGLU MLP of width 1024, the same active FFN FLOPs), both
with rotary positions, RMSNorm and tied embeddings as lm_moe's models; or any LM config of this
project (its `model:` section, the FFN layer's aux losses included).

Every model sees the same batches in the same order (the data module's shuffle, data seed 1234),
in fp32, with the cpu_quick preset's optimisation: AdamW (learning rate --lr, betas 0.9/0.95,
weight decay 0.1 on matrices and expert weights), 30 warmup steps then a cosine to 0.1x over
--max-steps, gradients clipped to norm 1. --seeds seed the model's initialisation. Validation
loss (token-weighted, the first --val-batches validation batches) every --val-every steps.

Writes <out>/<model>_seed<seed>.json (the curve, the settings, the parameter count and the time),
as each run ends: run it again on the same --out and finished runs are skipped. Prints a table of
the final validation losses (mean and spread over seeds).
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from lm_moe.cli import configs_not_of_task
from lm_moe.command_line import ArgumentParser
from lm_moe.data.text import TextDataModule
from lm_moe.lit.optim import build_adamw_with_schedule
from lm_moe.output_files import write_text_atomically
from lm_moe.profiling.models import refused_configs
from lm_moe.profiling.seed_statistics import spread

PROG = "reference_pair.py"
HF_MODELS = ("hf_mixtral", "hf_mistral")
WIDTH, LAYERS, HEADS, EXPERTS, TOP_K, EXPERT_WIDTH, DENSE_WIDTH = 256, 4, 4, 8, 2, 512, 1024
WARMUP_STEPS, MIN_LR_RATIO, WEIGHT_DECAY, BETAS, CLIP_NORM = 30, 0.1, 0.1, (0.9, 0.95), 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(HF_MODELS),
                        help=f"{' or '.join(HF_MODELS)}, or paths of lm_moe LM configs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("results/reference_pair"))
    args = parser.parse_args(argv)
    for name in ("lr", "max_steps", "val_every", "val_batches", "batch_size", "block_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.max_steps % args.val_every:
        parser.error(f"--val-every ({args.val_every}) must divide --max-steps ({args.max_steps})")
    for model in args.models:
        if model not in HF_MODELS and not Path(model).is_file():
            parser.error(f"--models: {model!r} is neither {' nor '.join(HF_MODELS)} nor an LM config file")
    configs = [model for model in args.models if model not in HF_MODELS]
    if not_lm := configs_not_of_task(configs, "lm"):
        parser.error(f"--models: not LM configs: {', '.join(not_lm)}")
    if problems := refused_configs(configs):
        parser.error("; ".join(problems))
    if any(model in HF_MODELS for model in args.models) and importlib.util.find_spec("transformers") is None:
        parser.error("the Hugging Face models need the optional extra: pip install -e '.[reference]'")
    return args


def model_name(model: str) -> str:
    return model if model in HF_MODELS else Path(model).stem


def hf_model(name: str, vocab_size: int, block_size: int) -> torch.nn.Module:
    """The public pair, sized like lm_moe's configs (see the module docstring)."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    shared = dict(vocab_size=vocab_size, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=HEADS, max_position_embeddings=block_size, tie_word_embeddings=True,
                  attn_implementation="sdpa")
    if name == "hf_mixtral":
        config = MixtralConfig(intermediate_size=EXPERT_WIDTH, num_local_experts=EXPERTS,
                               num_experts_per_tok=TOP_K, **shared)
        return MixtralForCausalLM(config)
    return MistralForCausalLM(MistralConfig(intermediate_size=DENSE_WIDTH, **shared))


def project_model(config: Path, vocab_size: int, block_size: int) -> torch.nn.Module:
    """The GPT of an lm_moe LM config, built as the CLI builds it."""
    from pytorch_lightning.cli import instantiate_module

    from lm_moe.lit.language_model import LanguageModel

    settings = (yaml.safe_load(config.read_text()) or {}).get("model", {})
    return instantiate_module(LanguageModel, {**settings, "vocab_size": vocab_size, "block_size": block_size}).model


def next_token_loss(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, the model's auxiliary loss) of one batch, for either kind of model."""
    output = model(input_ids)
    logits = output.logits  # [B, T, V]
    aux = getattr(output, "aux_loss", None)  # lm_moe: the FFN layers' losses; HF: None unless router logits are asked for
    cross_entropy = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return cross_entropy, torch.zeros(()) if aux is None else aux


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list[dict]) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        cross_entropy, _ = next_token_loss(model, batch["input_ids"], batch["targets"])
        total += cross_entropy.item() * batch["targets"].numel()
        tokens += batch["targets"].numel()
    model.train()
    return total / tokens


def train_one(model: torch.nn.Module, data: TextDataModule, args: argparse.Namespace, label: str) -> dict:
    """The loop: every model the same batches, schedule and clipping. Returns the run's record."""
    optimizer = build_adamw_with_schedule(model, args.lr, WEIGHT_DECAY, BETAS, WARMUP_STEPS, args.max_steps, MIN_LR_RATIO)
    adamw, schedule = optimizer["optimizer"], optimizer["lr_scheduler"]["scheduler"]
    val_batches = [batch for _, batch in zip(range(args.val_batches), data.val_dataloader())]
    curve, step, started = {}, 0, time.perf_counter()
    model.train()
    while step < args.max_steps:
        for batch in data.train_dataloader():
            cross_entropy, aux = next_token_loss(model, batch["input_ids"], batch["targets"])
            (cross_entropy + aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            adamw.step()
            adamw.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            if step % args.val_every == 0:
                curve[step] = validation_loss(model, val_batches)
                print(f"{label}: step {step} val loss {curve[step]:.4f}", flush=True)
            if step == args.max_steps:
                break
    return {"curve": curve, "seconds": time.perf_counter() - started,
            "parameters": sum(p.numel() for p in model.parameters())}


def summary_table(out: Path, names: list[str], seeds: list[int]) -> str:
    lines = ["| model | seeds | final val loss (mean ± sd) | each seed |", "|---|---|---|---|"]
    for name in names:
        finals = []
        for seed in seeds:
            path = out / f"{name}_seed{seed}.json"
            if path.exists():
                curve = json.loads(path.read_text())["curve"]
                finals.append(curve[max(curve, key=int)])
        if finals:
            lines.append(f"| {name} | {len(finals)} | {spread(finals)} | {', '.join(f'{v:.3f}' for v in finals)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = TextDataModule(block_size=args.block_size, batch_size=args.batch_size)
    data.prepare_data()
    data.setup("fit")
    vocab_size = data.vocab_size
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        for seed in args.seeds:
            name = model_name(model)
            path = args.out / f"{name}_seed{seed}.json"
            if path.exists():
                print(f"{name} seed {seed}: done earlier, skipped")
                continue
            torch.manual_seed(seed)
            network = (hf_model(model, vocab_size, args.block_size) if model in HF_MODELS
                       else project_model(Path(model), vocab_size, args.block_size))
            record = train_one(network, data, args, f"{name} seed {seed}")
            settings = {key: value for key, value in vars(args).items() if key not in ("models", "seeds", "out")}
            record.update(model=model, seed=seed, settings=settings)
            write_text_atomically(path, json.dumps(record, indent=2) + "\n")
    print(summary_table(args.out, [model_name(model) for model in args.models], args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

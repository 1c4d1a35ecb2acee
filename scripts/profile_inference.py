"""Inference speed of LM and ViT variants: prefill latency, cached decoding tokens/s, images/s, peak memory.

    python scripts/profile_inference.py                   # every config under configs/lm/ and configs/vit/
    python scripts/profile_inference.py -c configs/lm/top2.yaml -c configs/lm/cumulative.yaml \\
        --batch-sizes 1 8 --contexts 128 512 2048 --new-tokens 32 --dtype bf16 --out results/inference
    python scripts/profile_inference.py --ckpt_path runs/top2/version_0/checkpoints/last.ckpt --trace
    python scripts/profile_inference.py -c configs/lm/dense.yaml --model.n_layer=8   # config overrides as in fit

Language models (configs get random weights; checkpoints keep theirs): for every batch size B and
context L, a prefill of L prompt tokens (its latency), then --new-tokens greedy decoding steps with
the cache (tokens/s = B / time per step). A config is built with data.block_size = the largest
context + new tokens; a checkpoint keeps its own and skips the settings that do not fit it.
Mixture of Tokens decodes groups of sequences in lock-step: its batch sizes are rounded up to a
multiple of the group size (the table says so). Image classifiers (ViT configs): images/s of one
forward over batches of random images.

Peak memory: what torch allocated during one prefill + decoding run (one forward for a ViT) above
what was allocated before, so the weights do not count: torch.cuda.max_memory_allocated on CUDA,
the running total of torch's CPU allocations recorded by torch.profiler on the CPU. Cache: the
memory the KV cache and the FFN decode states hold after decoding (KV buffers sized for L + new).

Timing: every measurement repeats --warmup + --repeats times (fresh cache each time) and reports
the medians of the last --repeats; memory comes from one more, untimed run. bf16 runs under
autocast on the CPU or CUDA, the weights staying fp32.

Writes to --out (a new or empty folder; --overwrite replaces what it holds once this run has
written all its files, so a run that fails leaves it as it was): results.csv and results.json (one
row per variant and setting), table.md (the markdown table, also printed) and chart.png (decoding
tokens/s against the context per batch size, one line per variant; images/s against the batch for
ViTs). --trace also writes, for each
language model, trace_<variant>.json: a torch.profiler trace of one decoding step (first batch
size, largest context); open it in chrome://tracing or drag it onto https://ui.perfetto.dev.
"""

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lm_moe.cli import task_of
from lm_moe.command_line import ArgumentParser
from lm_moe.cpu_allocator import tune_cpu_allocator
from lm_moe.layers.batch_groups import required_batch_multiple
from lm_moe.lit.safe_loading import add_escape_option
from lm_moe.lit.trained_model import check_trained_path
from lm_moe.output_files import add_overwrite_option, require_free_output, staged_folder
from lm_moe.profiling.charts import Panel, draw
from lm_moe.profiling.inference import DTYPES, measure_decoding, measure_images, round_up, trace_decoding_step
from lm_moe.profiling.models import build_from_config, load_checkpoint, refused_configs, variant_names
from lm_moe.profiling.tables import Column, markdown_table, write_csv, write_json
from lm_moe.sample import require_usable_device

REPO = Path(__file__).resolve().parents[1]

COLUMNS = [
    Column("variant", "variant"),
    Column("task", "task"),
    Column("batch", "batch"),
    Column("context", "context"),
    Column("new_tokens", "new tokens"),
    Column("prefill_ms", "prefill ms", ".1f"),
    Column("decode_ms_per_step", "decode ms/step", ".2f"),
    Column("decode_tokens_per_s", "decode tokens/s", ".0f"),
    Column("images_per_s", "images/s", ".0f"),
    Column("peak_mb", "peak MiB", ".1f"),
    Column("cache_mb", "cache MiB", ".2f"),
    Column("status", "status"),
    Column("note", "note"),
]
# The CSV has the table's columns and the settings of each row.
CSV_COLUMNS = [*COLUMNS[:2], *(Column(key, key) for key in ("source", "device", "dtype", "threads", "requested_batch")),
               *COLUMNS[2:]]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The script's own options, and the config overrides (`--model.dim=64`) for every config."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", default=[], help="LM or ViT config (repeatable)")
    parser.add_argument("--ckpt_path", action="append", default=[],
                        help="lm_moe checkpoint or export folder (repeatable)")
    add_escape_option(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 128, 256, 512], help="prompt lengths (LMs)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoding steps after each prefill (LMs)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="bf16: autocast, weights stay fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats before the timed ones")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (medians are reported)")
    parser.add_argument("--trace", action="store_true",
                        help="also write trace_<variant>.json, a torch.profiler trace of one decoding step, for "
                             "each language model (a ViT has no decoding step; open the file in chrome://tracing "
                             "or https://ui.perfetto.dev)")
    parser.add_argument("--out", type=Path, default=Path("results/inference"),
                        help="folder for the results (refused if it holds files, unless --overwrite)")
    add_overwrite_option(parser)
    args, overrides = parser.parse_known_args(argv)
    try:
        require_usable_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if overrides and not args.config:
        parser.error(f"config overrides {overrides} need a config (-c)")
    require_free_output(parser, "--out", args.out, args.overwrite, folder=True)
    if min(args.batch_sizes + args.contexts + [args.new_tokens, args.repeats]) < 1 or args.warmup < 0:
        parser.error("--batch-sizes, --contexts, --new-tokens and --repeats must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    for path in args.ckpt_path:
        try:
            check_trained_path(path, args.allow_unsafe_pickle)
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
    refused = refused_configs(args.config, overrides)
    if refused:
        parser.error("; ".join(refused))
    if not args.config and not args.ckpt_path:
        folders = (REPO / "configs/lm", REPO / "configs/vit")
        args.config = [str(path) for folder in folders for path in sorted(folder.glob("*.yaml"))]
    return args, overrides


def variants(args: argparse.Namespace, overrides: list[str]) -> list[tuple[str, str, object]]:
    """(name, source, loader) of every config and checkpoint, named by file (a run for checkpoints;
    see variant_names), then numbered where names still clash."""
    block_size = max(args.contexts) + args.new_tokens
    found = []
    for config in args.config:
        lm = task_of(["-c", config]) == "lm"
        found.append((config, lambda config=config, lm=lm: build_from_config(config, overrides, block_size if lm else None)))
    for path in args.ckpt_path:
        found.append((path, lambda path=path: load_checkpoint(path, args.allow_unsafe_pickle)))
    unique, taken = [], set()
    for source, loader in found:
        # configs/vit/dense.yaml after configs/lm/dense.yaml: vit_dense; runs/top2/version_1/... after
        # runs/top2/version_0/...: top2_version_1; then a number
        names = variant_names(source)
        candidates = names + [f"{names[0]}-{n}" for n in range(2, len(found) + 2)]
        name = next(candidate for candidate in candidates if candidate not in taken)
        taken.add(name)
        unique.append((name, source, loader))
    return unique


def language_model_rows(model, args, device: torch.device, on_setting) -> list[dict]:
    """One row per requested batch size and context. Mixture of Tokens decodes whole groups: its batch
    is rounded up to a multiple of the group size, and batch sizes that round alike share one measurement."""
    multiple = required_batch_multiple(model)
    measured: dict[tuple[int, int], dict] = {}
    rows = []
    for requested in args.batch_sizes:
        batch = round_up(requested, multiple)
        rounded = f"batch rounded up to a multiple of the group size {multiple}" if batch != requested else ""
        for context in args.contexts:
            if (batch, context) not in measured:
                on_setting(f"batch {batch}, context {context}")
                measured[batch, context] = measure_setting(model, batch, context, args, device)
            row = {"task": "lm", "requested_batch": requested, "batch": batch, "context": context,
                   "new_tokens": args.new_tokens, "note": rounded, **measured[batch, context]}
            rows.append(row)
    return rows


def measure_setting(model, batch: int, context: int, args, device: torch.device) -> dict:
    """The measured values and the status of one setting, or why it was skipped or failed."""
    if context + args.new_tokens > model.block_size:
        return {"status": "skipped", "note": f"context + new tokens exceed the model's block_size {model.block_size}"}
    try:
        result = measure_decoding(model, batch, context, args.new_tokens, device, args.dtype, args.warmup, args.repeats)
    except Exception as error:  # e.g. out of memory: this setting fails, the others still run
        return {"status": "FAILED", "note": f"{type(error).__name__}: {error}"}
    return {**vars(result), "status": "ok"}


def image_model_rows(model, args, device: torch.device, on_setting) -> list[dict]:
    rows = []
    for batch in args.batch_sizes:
        on_setting(f"batch {batch}")
        row = {"task": "vit", "requested_batch": batch, "batch": batch, "note": ""}
        try:
            result = measure_images(model, batch, device, args.dtype, args.warmup, args.repeats)
            row.update(vars(result), status="ok")
        except Exception as error:
            row.update(status="FAILED", note=f"{type(error).__name__}: {error}")
        rows.append(row)
    return rows


def trace(model, name: str, args, device: torch.device, folder: Path) -> str | None:
    """Trace one decoding step at the first batch size and the largest context that fits (None if none does)."""
    contexts = [context for context in args.contexts if context + 1 <= model.block_size]
    if not contexts:
        return None
    batch = round_up(args.batch_sizes[0], required_batch_multiple(model))
    path = folder / f"trace_{name}.json"
    trace_decoding_step(model, batch, max(contexts), device, args.dtype, path)
    return path.name


def chart(rows: list[dict], args, title: str, path: Path) -> None:
    """Decoding tokens/s against the context, one panel per batch size; images/s against the batch."""
    panels = []
    lm_rows = [row for row in rows if row.get("task") == "lm" and row["status"] == "ok"]
    for requested in args.batch_sizes:
        series: dict[str, list] = {}
        for row in lm_rows:
            if row["requested_batch"] == requested:
                label = row["variant"] + (f" (batch {row['batch']})" if row["batch"] != requested else "")
                series.setdefault(label, []).append((row["context"], row["decode_tokens_per_s"]))
        if series:
            panels.append(Panel(f"decoding, batch {requested}", "context (tokens)", "tokens/s", series, log_x=True,
                                y_from_zero=True))
    vit_rows = [row for row in rows if row.get("task") == "vit" and row["status"] == "ok"]
    if vit_rows:
        series = {}
        for row in vit_rows:
            series.setdefault(row["variant"], []).append((row["batch"], row["images_per_s"]))
        panels.append(Panel("image classifiers", "batch", "images/s", series, log_x=True, y_from_zero=True))
    draw(panels or [Panel("no successful measurement", "", "", {})], path, title)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        tune_cpu_allocator()
    # Every file goes to a staging folder, which replaces --out once all are written: an
    # interrupted or crashed run leaves --out as it was.
    with staged_folder(args.out) as folder:
        rows, traces, settings = measure_all(args, overrides, device, folder)
        title = f"{settings['device']}, {args.dtype}, {settings['threads']} threads, new tokens {args.new_tokens}"
        table = markdown_table(rows, COLUMNS)
        notes = (f"Inference speed ({title}); medians of {args.repeats} repeats after {args.warmup} warm-up. "
                 "peak MiB: torch's allocations during one prefill + decoding run (one forward for images) above the "
                 "weights; cache MiB: KV cache + FFN decode states after decoding.\n\n")
        (folder / "table.md").write_text(notes + table)
        write_csv(folder / "results.csv", rows, CSV_COLUMNS)
        grid = {"batch_sizes": args.batch_sizes, "contexts": args.contexts, "new_tokens": args.new_tokens,
                "warmup": args.warmup, "repeats": args.repeats, "overrides": overrides}
        write_json(folder / "results.json", {"settings": {**settings, **grid}, "rows": rows})
        chart(rows, args, title, folder / "chart.png")
    print(notes + table)
    print(f"wrote {', '.join(['results.csv', 'results.json', 'table.md', 'chart.png'] + traces)} to {args.out}")
    failed = sorted({row["variant"] for row in rows if row["status"] == "FAILED"})
    if failed:
        print(f"FAILED: {', '.join(failed)} (see the note column)", file=sys.stderr)
    return 1 if failed else 0


def measure_all(args, overrides: list[str], device: torch.device, folder: Path) -> tuple[list[dict], list[str], dict]:
    """The rows of every variant and setting, the trace files written to `folder`, and the settings."""
    console = Console(width=200)
    settings = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads()}
    found = variants(args, overrides)
    rows, traces = [], []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("loading", total=len(found))
        for name, source, loader in found:
            progress.update(task, description=f"{name}: loading")
            common = {"variant": name, "source": source, **settings}
            try:
                model = loader().to(device)
            except Exception as error:  # a broken config or checkpoint is reported, and the others still run
                rows.append({**common, "status": "FAILED", "note": f"{type(error).__name__}: {error}"})
                progress.advance(task)
                continue
            language_model = hasattr(model, "new_cache")  # ViTs have no decoding
            measure = language_model_rows if language_model else image_model_rows
            new_rows = measure(model, args, device, lambda what: progress.update(task, description=f"{name}: {what}"))
            rows += [{**common, **row} for row in new_rows]
            if args.trace and language_model:
                progress.update(task, description=f"{name}: trace of one decoding step")
                written = trace(model, name, args, device, folder)
                traces += [written] if written else []
            progress.advance(task)
            del model
    return rows, traces, settings


if __name__ == "__main__":
    sys.exit(main())

"""The comparison's results: one row per variant (results.csv, results.json, table.md) and the
validation-loss curves against training tokens and wall time (loss_vs_tokens.png, loss_vs_time.png)."""

import math
from pathlib import Path

from lm_moe.output_files import staged_files
from lm_moe.profiling.charts import Panel, draw
from lm_moe.profiling.comparison import SweepSettings, TrainingOutcome, Variant
from lm_moe.profiling.tables import Column, markdown_table, write_csv, write_json
from lm_moe.profiling.training_curves import curve, learning_rate, median_scalar, tokens_per_step, versions


def _count(value: float) -> str:
    """1.23M, 45.6k or 789."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"


COLUMNS = [
    Column("variant", "variant"),
    Column("status", "status"),
    Column("val_loss", "val loss", ".3f"),
    Column("val_ppl", "val ppl", ".1f"),
    Column("learning_rate", "learning rate", "g"),
    Column("tokens", "train tokens", _count),
    Column("params_total", "params total", _count),
    Column("params_active", "params active*", _count),
    Column("ffn_macs_per_token", "FFN MACs/token*", _count),
    Column("train_tokens_per_s", "train tokens/s", ".0f"),
    Column("decode_tokens_per_s", "decode tokens/s", ".0f"),
    Column("causality", "causality"),
]
# The CSV has the table's columns and a few more (the reason of a failure, the config, ...).
CSV_COLUMNS = [*COLUMNS[:2], *(Column(key, key) for key in ("reason", "config", "steps", "fit_runs")), *COLUMNS[2:],
               Column("decode_setting", "decode setting")]

DEFINITIONS = (
    "val loss: validation cross-entropy (nats/token) after the last step; val ppl = exp(val loss). "
    "*params active = parameters outside the FFNs + the FFNs' multiply-adds with parameters per token "
    "(FFN MACs/token): all parameters for dense, router + k experts for top-k, and for the Soft MoE variants, "
    "whose tokens mix every expert's output, the per-token cost as a dense-equivalent size "
    "(each layer's parameter_macs_per_token gives its rule). train tokens/s: median of the throughput "
    "logged per step (validation excluded). decode tokens/s: cached greedy decoding on the CPU in fp32 after a "
    "prompt of half the context (setting in results.csv). causality: the leakage checks of "
    "`python -m lm_moe.causality` on the trained model in float64."
)


def variant_row(variant: Variant, outcome: TrainingOutcome, evaluation: dict | None, steps: int) -> dict:
    """The table row of one variant: FAILED with the reason, or its results after `steps` steps."""
    row = {"variant": variant.name, "config": str(variant.config), "fit_runs": len(versions(variant.run_dir))}
    if not outcome.trained:
        return {**row, "status": "FAILED", "reason": outcome.reason, "output_tail": outcome.output_tail}
    losses = curve(variant.run_dir)
    final_loss = losses[-1].value if losses and losses[-1].step == steps else None  # None: not validated at the end
    row.update(
        status="ok",
        steps=steps,
        tokens=steps * tokens_per_step(versions(variant.run_dir)[-1]),
        val_loss=final_loss,
        val_ppl=None if final_loss is None else math.exp(final_loss),
        learning_rate=learning_rate(versions(variant.run_dir)[-1]),
        train_tokens_per_s=median_scalar(variant.run_dir, "perf/train_tokens_per_sec"),
        **(evaluation or {}),
    )
    return row


def write_report(out: Path, settings: SweepSettings, variants: list[Variant], rows: list[dict]) -> str:
    """Write every result file; returns the markdown (settings, definitions, table)."""
    header = (
        f"# LM variant comparison\n\nEvery variant trained for {settings.max_steps} steps (trainer preset "
        f"`{Path(settings.trainer).name}`, seed {settings.seed}, validation every {settings.val_every} steps"
        + (f", overrides `{' '.join(settings.overrides)}`" if settings.overrides else "")
        + (", each variant's learning rate in its row" if any(variant.learning_rate for variant in variants) else "")
        + f").\n\n{DEFINITIONS}\n\n"
    )
    shown = [{**row, "status": f"FAILED: {row['reason']}"} if row["status"] == "FAILED" else row for row in rows]
    markdown = header + markdown_table(shown, COLUMNS)
    with staged_files(out) as staging:  # the report files replace the last report's once all are written
        (staging / "table.md").write_text(markdown)
        write_csv(staging / "results.csv", rows, CSV_COLUMNS)
        write_json(staging / "results.json", {"settings": vars(settings), "definitions": DEFINITIONS, "variants": rows})
        draw_curves(staging, settings, [variant for variant, row in zip(variants, rows) if row["status"] == "ok"])
    return markdown


def draw_curves(out: Path, settings: SweepSettings, trained: list[Variant]) -> None:
    by_tokens, by_minutes, baseline = {}, {}, {}
    for variant in trained:
        per_step = tokens_per_step(versions(variant.run_dir)[-1])
        points = curve(variant.run_dir)
        by_tokens[variant.name] = [(point.step * per_step, point.value) for point in points]
        by_minutes[variant.name] = [(point.seconds / 60, point.value) for point in points]
        unigram = curve(variant.run_dir, "val/unigram_baseline")
        if unigram and not baseline:  # the same data for every variant
            baseline = {"unigram baseline": unigram[-1].value}
    title = f"{settings.max_steps} steps, seed {settings.seed}"
    draw([Panel("validation loss", "training tokens", "loss (nats/token)", by_tokens, hlines=baseline)],
         out / "loss_vs_tokens.png", title)
    draw([Panel("validation loss", "wall time (minutes)", "loss (nats/token)", by_minutes, hlines=baseline)],
         out / "loss_vs_time.png", title)

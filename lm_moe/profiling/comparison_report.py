"""The comparison's results: one row per run (runs.csv), one per variant over its seeds
(results.csv, results.json, table.md: mean and spread, the gap to a reference variant and whether
the seeds decide it) and the validation-loss curves, mean over seeds with a band of one standard
deviation, against training tokens and wall time (loss_vs_tokens.png, loss_vs_time.png), and the
gap to the reference against training tokens (gap_vs_tokens.png)."""

import math
from pathlib import Path

from lm_moe.output_files import staged_files
from lm_moe.profiling.charts import Panel, draw
from lm_moe.profiling.comparison import Run, SweepSettings, TrainingOutcome
from lm_moe.profiling.seed_statistics import (
    MIN_SEEDS_TO_DECIDE,
    mean_curve,
    median,
    paired_curve_gap,
    paired_gap,
    spread,
)
from lm_moe.profiling.tables import Column, markdown_table, write_csv, write_json
from lm_moe.profiling.training_curves import curve, final_value, learning_rate, median_scalar, tokens_per_step, versions


def _count(value: float) -> str:
    """1.23M, 45.6k or 789."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"


# One row per run.
RUN_COLUMNS = [Column(key, key) for key in (
    "variant", "seed", "status", "reason", "config", "steps", "fit_runs", "val_loss", "val_ppl", "learning_rate",
    "tokens", "params_total", "params_active", "ffn_macs_per_token", "train_tokens_per_s", "decode_tokens_per_s",
    "causality", "decode_setting")]

# One row per variant (table.md; results.csv has the numbers behind the text cells too).
COLUMNS = [
    Column("variant", "variant"),
    Column("status", "status"),
    Column("seeds", "seeds"),
    Column("val_loss_text", "val loss"),
    Column("gap_text", "gap to reference"),
    Column("verdict", "verdict"),
    Column("learning_rate", "learning rate", "g"),
    Column("tokens", "train tokens", _count),
    Column("params_total", "params total", _count),
    Column("params_active", "params active*", _count),
    Column("ffn_macs_per_token", "FFN MACs/token*", _count),
    Column("train_tokens_per_s", "train tokens/s", ".0f"),
    Column("decode_tokens_per_s", "decode tokens/s", ".0f"),
    Column("causality", "causality"),
]
CSV_COLUMNS = [*COLUMNS[:3], *(Column(key, key) for key in (
    "val_loss_mean", "val_loss_std", "gap_mean", "gap_std", "gap_seeds")), *COLUMNS[5:]]

DEFINITIONS = (
    "val loss: validation cross-entropy (nats/token) after the last step, mean ± sample standard deviation over "
    "the seeds that trained (seeds: trained / asked). gap to reference: the variant's loss minus the reference "
    "variant's, seed by seed, mean ± standard deviation over the seeds both trained; verdict: lower or higher "
    f"when at least {MIN_SEEDS_TO_DECIDE} seeds agree in sign and the mean gap exceeds its standard deviation, "
    "otherwise tie (or undecided, with fewer seeds). *params active = parameters outside the FFNs + the FFNs' "
    "multiply-adds with parameters per token (FFN MACs/token): all parameters for dense, router + k experts for "
    "top-k, and for the Soft MoE variants, whose tokens mix every expert's output, the per-token cost as a "
    "dense-equivalent size (each layer's parameter_macs_per_token gives its rule). train tokens/s: median of "
    "the throughput logged per step (validation excluded), median over seeds. decode tokens/s: cached greedy "
    "decoding on the CPU in fp32 after a prompt of half the context (setting in runs.csv), median over seeds. "
    "causality: the leakage checks of `python -m lm_moe.causality` on every seed's trained model in float64."
)


def run_row(run: Run, outcome: TrainingOutcome, evaluation: dict | None) -> dict:
    """The row of one run: FAILED with the reason, or its results after its steps."""
    row = {"variant": run.variant, "seed": run.seed, "config": str(run.config), "fit_runs": len(versions(run.run_dir)),
           "learning_rate": run.learning_rate}
    if not outcome.trained:
        return {**row, "status": "FAILED", "reason": outcome.reason, "output_tail": outcome.output_tail}
    final_loss = final_value(run.run_dir, run.steps)
    row.update(
        status="ok",
        steps=run.steps,
        tokens=run.steps * tokens_per_step(versions(run.run_dir)[-1]),
        val_loss=final_loss,
        val_ppl=None if final_loss is None else math.exp(final_loss),
        learning_rate=learning_rate(versions(run.run_dir)[-1]),
        train_tokens_per_s=median_scalar(run.run_dir, "perf/train_tokens_per_sec"),
        **(evaluation or {}),
    )
    return row


def _losses_by_seed(rows: list[dict]) -> dict[int, float]:
    return {row["seed"]: row["val_loss"] for row in rows if row["status"] == "ok" and row["val_loss"] is not None}


def variant_rows(run_rows: list[dict], reference: str | None) -> list[dict]:
    """One row per variant, in the order of the runs: the seeds' results aggregated, and the gap to
    the `reference` variant's runs. A failed seed is named in the status, never averaged away."""
    by_variant: dict[str, list[dict]] = {}
    for row in run_rows:
        by_variant.setdefault(row["variant"], []).append(row)
    reference_losses = _losses_by_seed(by_variant.get(reference, []))
    rows = []
    for name, runs in by_variant.items():
        trained = [row for row in runs if row["status"] == "ok"]
        failed = [row for row in runs if row["status"] != "ok"]
        losses = _losses_by_seed(runs)
        loss_spread = spread(list(losses.values()))
        row = {"variant": name, "seeds": f"{len(trained)}/{len(runs)}",
               "status": "ok" if not failed else "FAILED: " + "; ".join(
                   f"seed {row['seed']}: {row['reason']}" for row in failed),
               "val_loss_mean": loss_spread and loss_spread.mean, "val_loss_std": loss_spread and loss_spread.std,
               "val_loss_text": str(loss_spread) if loss_spread else None}
        gap = paired_gap(losses, reference_losses) if name != reference else None
        if gap is not None:
            row.update(gap_mean=gap.spread.mean, gap_std=gap.spread.std, gap_seeds=gap.spread.n, gap_text=str(gap),
                       verdict=gap.verdict)
        elif name == reference:
            row.update(gap_text="reference")
        if trained:
            first = trained[0]
            rates = sorted({run["learning_rate"] for run in trained})
            row.update({key: first.get(key) for key in ("tokens", "params_total", "params_active", "ffn_macs_per_token")},
                       learning_rate=rates[0] if len(rates) == 1 else None,
                       train_tokens_per_s=median([run.get("train_tokens_per_s") for run in trained]),
                       decode_tokens_per_s=median([run.get("decode_tokens_per_s") for run in trained]),
                       causality=_causality(trained))
        rows.append(row)
    return rows


def _causality(trained: list[dict]) -> str:
    verdicts = {row["seed"]: row.get("causality", "not checked") for row in trained}
    if len(set(verdicts.values())) == 1:
        return next(iter(verdicts.values()))
    return "; ".join(f"seed {seed}: {verdict}" for seed, verdict in verdicts.items())


def write_report(out: Path, settings: SweepSettings, seeds: list[int], reference: str | None,
                 runs: list[Run], run_rows: list[dict]) -> str:
    """Write every result file; returns the markdown (settings, definitions, table)."""
    rows = variant_rows(run_rows, reference)
    header = (
        f"# LM variant comparison\n\nEvery variant trained for {settings.max_steps} steps (trainer preset "
        f"`{Path(settings.trainer).name}`, seeds {', '.join(map(str, seeds))}, validation every "
        f"{settings.val_every} steps"
        + (f", overrides `{' '.join(settings.overrides)}`" if settings.overrides else "")
        + (f", gaps to {reference}" if reference else "")
        + ", each variant's learning rate in its row).\n\n"
        f"{DEFINITIONS}\n\n"
    )
    markdown = header + markdown_table(rows, COLUMNS)
    with staged_files(out) as staging:  # the report files replace the last report's once all are written
        (staging / "table.md").write_text(markdown)
        write_csv(staging / "results.csv", rows, CSV_COLUMNS)
        write_csv(staging / "runs.csv", run_rows, RUN_COLUMNS)
        write_json(staging / "results.json", {"settings": vars(settings), "seeds": seeds, "reference": reference,
                                              "definitions": DEFINITIONS, "variants": rows, "runs": run_rows})
        trained = [run for run, row in zip(runs, run_rows) if row["status"] == "ok"]
        draw_curves(staging, f"{settings.max_steps} steps, seeds {', '.join(map(str, seeds))}", trained, reference)
    return markdown


def draw_curves(out: Path, title: str, trained: list[Run], reference: str | None) -> None:
    """loss_vs_tokens.png and loss_vs_time.png: each variant's mean curve over its trained seeds,
    with a band of one standard deviation (against time: at the mean time the seeds reached each
    step); with a reference variant, gap_vs_tokens.png: each variant's loss minus the reference's,
    seed by seed at every step both validated, mean and band over the seeds."""
    losses: dict[str, dict[int, list]] = {}  # variant -> seed -> [(step, loss)]
    minutes: dict[str, list] = {}  # variant -> one [(step, minutes)] per seed
    tokens_per: dict[str, int] = {}
    baseline: dict[str, float] = {}
    for run in trained:
        tokens_per[run.variant] = tokens_per_step(versions(run.run_dir)[-1])
        points = curve(run.run_dir)
        losses.setdefault(run.variant, {})[run.seed] = [(point.step, point.value) for point in points]
        minutes.setdefault(run.variant, []).append([(point.step, point.seconds / 60) for point in points])
        unigram = curve(run.run_dir, "val/unigram_baseline")
        if unigram and not baseline:  # the same data for every run
            baseline = {"unigram baseline": unigram[-1].value}
    by_tokens, by_minutes, gaps = {}, {}, {}
    for name, by_seed in losses.items():
        mean_losses = mean_curve(list(by_seed.values()))  # [(step, mean, std)]
        step_minutes = {step: mean for step, mean, _ in mean_curve(minutes[name])}
        by_tokens[name] = [(step * tokens_per[name], mean, std) for step, mean, std in mean_losses]
        by_minutes[name] = [(step_minutes[step], mean, std) for step, mean, std in mean_losses]
        if reference in losses and name != reference:
            gaps[name] = [(step * tokens_per[name], mean, std)
                          for step, mean, std in paired_curve_gap(by_seed, losses[reference])]
    for name, bands, xlabel in (("loss_vs_tokens.png", by_tokens, "training tokens"),
                                ("loss_vs_time.png", by_minutes, "wall time (minutes)")):
        draw([Panel("validation loss", xlabel, "loss (nats/token)", {}, hlines=baseline, bands=bands)], out / name, title)
    if gaps:
        draw([Panel(f"validation loss minus {reference}'s, seed by seed", "training tokens", "loss gap (nats/token)",
                    {}, hlines={reference: 0.0}, bands=gaps)], out / "gap_vs_tokens.png", title)


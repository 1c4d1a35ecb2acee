"""The Soft MoE paper's two sweeps on the ViT, at the FLOPs of the Soft MoE config: the number of
experts at a fixed total of slots (more experts, fewer slots each, the same cost), and the slots per
expert at a fixed number of experts (each expert narrower as its slots multiply, so the cost stays).
The dense ViT beside them is the reference. Each setting is trained for every seed by the
comparison's runs (lm_moe.profiling.comparison) and reported as mean and spread over the seeds.

Files of a sweep folder: table.md, results.csv and results.json (a row per setting), runs.csv (a
row per run) and sweep_vit.png (validation loss against experts and against slots per expert, and
training time per step against experts)."""

from dataclasses import dataclass
from pathlib import Path

from lm_moe.output_files import staged_files
from lm_moe.profiling.charts import Panel, draw
from lm_moe.profiling.comparison import Run, TrainingOutcome
from lm_moe.profiling.seed_statistics import median, paired_gap, spread
from lm_moe.profiling.tables import Column, markdown_table, write_csv, write_json
from lm_moe.profiling.training_curves import final_value, median_scalar, versions

EXPERTS_SWEEP, SLOTS_SWEEP = "experts at fixed slots", "slots per expert at fixed experts"
DENSE = "dense"
# The default sweeps: experts at a fixed total of slots, and slots per expert at fixed experts.
EXPERTS, TOTAL_SLOTS, SLOTS_PER_EXPERT, FIXED_EXPERTS = [4, 8, 16, 32], 32, [1, 2, 4], 32


@dataclass(frozen=True)
class Setting:
    name: str  # "dense" or "E<experts>_P<slots per expert>"
    config: Path
    experts: int | None = None
    slots_per_expert: int | None = None
    hidden_dim: int | None = None  # of each expert
    sweeps: tuple[str, ...] = ()

    @property
    def overrides(self) -> tuple[str, ...]:
        if self.experts is None:
            return ()
        return (f"--model.ffn.init_args.num_experts={self.experts}",
                f"--model.ffn.init_args.slots_per_expert={self.slots_per_expert}",
                f"--model.ffn.init_args.hidden_dim={self.hidden_dim}")


def sweep_settings(soft_moe: Path, soft_moe_ffn: dict, dense: Path, experts: list[int], total_slots: int,
                   slots_per_expert: list[int], fixed_experts: int) -> list[Setting]:
    """The dense reference, then the experts sweep and the slots sweep (a setting both share is
    listed once). Every expert's width keeps the config's expert units per image, slots x width;
    a setting that cannot (a width that is not whole) raises a ValueError naming it."""
    units = soft_moe_ffn["num_experts"] * soft_moe_ffn.get("slots_per_expert", 1) * soft_moe_ffn["hidden_dim"]

    def setting(E: int, P: int, sweep: str) -> Setting:
        if units % (E * P):
            raise ValueError(f"{E} experts x {P} slots = {E * P} slots do not divide the config's {units} expert "
                             "units per image (slots x hidden_dim): no whole expert width keeps its FLOPs")
        return Setting(f"E{E}_P{P}", soft_moe, E, P, units // (E * P), (sweep,))

    found: dict[str, Setting] = {DENSE: Setting(DENSE, dense)}
    wanted = []
    for E in experts:
        if total_slots % E:
            raise ValueError(f"--experts {E} does not divide --total-slots {total_slots}")
        wanted.append(setting(E, total_slots // E, EXPERTS_SWEEP))
    wanted += [setting(fixed_experts, P, SLOTS_SWEEP) for P in slots_per_expert]
    for item in wanted:
        known = found.get(item.name)
        found[item.name] = item if known is None else Setting(
            item.name, item.config, item.experts, item.slots_per_expert, item.hidden_dim, known.sweeps + item.sweeps)
    return list(found.values())


def run_row(setting: Setting, run: Run, outcome: TrainingOutcome, batch_size: int) -> dict:
    """One run's final validation loss and accuracy and its training time per step, or its error."""
    row = {"setting": setting.name, "seed": run.seed}
    if not outcome.trained:
        return {**row, "status": "FAILED", "reason": outcome.reason}
    images_per_s = median_scalar(run.run_dir, "perf/train_images_per_sec")
    return {**row, "status": "ok", "fit_runs": len(versions(run.run_dir)),
            "val_loss": final_value(run.run_dir, run.steps),
            "val_acc": final_value(run.run_dir, run.steps, "val/acc_top1"),
            "ms_per_step": None if not images_per_s else 1e3 * batch_size / images_per_s}


RUN_COLUMNS = [Column(key, key) for key in ("setting", "seed", "status", "reason", "val_loss", "val_acc",
                                            "ms_per_step", "fit_runs")]
COLUMNS = [
    Column("setting", "setting"),
    Column("experts", "experts"),
    Column("slots_per_expert", "slots per expert"),
    Column("slots", "slots"),
    Column("hidden_dim", "expert width"),
    Column("params", "params", lambda value: f"{value / 1e6:.2f}M"),
    Column("seeds", "seeds"),
    Column("val_loss_text", "val loss"),
    Column("val_acc_text", "val accuracy %"),
    Column("gap_text", "loss gap to dense"),
    Column("verdict", "verdict"),
    Column("ms_per_step", "ms/step", ".0f"),
    Column("time_ratio", "time / dense", ".2f"),
    Column("status", "status"),
]
CSV_COLUMNS = [*COLUMNS[:7], *(Column(key, key) for key in (
    "val_loss_mean", "val_loss_std", "val_acc_mean", "val_acc_std", "gap_mean", "gap_std")), *COLUMNS[10:]]


def setting_rows(settings: list[Setting], run_rows: list[dict], params: dict[str, int]) -> list[dict]:
    """A row per setting over its seeds: mean ± std of loss and accuracy, the paired gap to dense
    (with the verdict of lm_moe.profiling.seed_statistics), the median time per step."""
    def by_seed(name: str, key: str) -> dict[int, float]:
        return {row["seed"]: row[key] for row in run_rows
                if row["setting"] == name and row["status"] == "ok" and row.get(key) is not None}

    dense_losses = by_seed(DENSE, "val_loss")
    rows = []
    for setting in settings:
        runs = [row for row in run_rows if row["setting"] == setting.name]
        failed = [row for row in runs if row["status"] != "ok"]
        losses, accuracies = spread(list(by_seed(setting.name, "val_loss").values())), \
            spread([100 * value for value in by_seed(setting.name, "val_acc").values()])
        row = {"setting": setting.name, "experts": setting.experts, "slots_per_expert": setting.slots_per_expert,
               "slots": None if setting.experts is None else setting.experts * setting.slots_per_expert,
               "hidden_dim": setting.hidden_dim, "params": params.get(setting.name),
               "seeds": f"{len(runs) - len(failed)}/{len(runs)}",
               "status": "ok" if not failed else "FAILED: " + "; ".join(f"seed {r['seed']}: {r['reason']}" for r in failed),
               "val_loss_mean": losses and losses.mean, "val_loss_std": losses and losses.std,
               "val_loss_text": losses and str(losses),
               "val_acc_mean": accuracies and accuracies.mean, "val_acc_std": accuracies and accuracies.std,
               "val_acc_text": accuracies and accuracies.text(decimals=1),
               "ms_per_step": median([r.get("ms_per_step") for r in runs if r["status"] == "ok"])}
        gap = paired_gap(by_seed(setting.name, "val_loss"), dense_losses) if setting.name != DENSE else None
        if gap is not None:
            row.update(gap_mean=gap.spread.mean, gap_std=gap.spread.std, gap_text=str(gap), verdict=gap.verdict)
        elif setting.name == DENSE:
            row["gap_text"] = "reference"
        rows.append(row)
    dense_time = next((row["ms_per_step"] for row in rows if row["setting"] == DENSE), None)
    for row in rows:
        if dense_time and row["ms_per_step"]:
            row["time_ratio"] = row["ms_per_step"] / dense_time
    return rows


def write_sweep_report(out: Path, header: str, settings: list[Setting], run_rows: list[dict],
                       params: dict[str, int]) -> str:
    """Write every result file; returns the markdown (header and table)."""
    rows = setting_rows(settings, run_rows, params)
    markdown = header + markdown_table(rows, COLUMNS)
    with staged_files(out) as staging:
        (staging / "table.md").write_text(markdown)
        write_csv(staging / "results.csv", rows, CSV_COLUMNS)
        write_csv(staging / "runs.csv", run_rows, RUN_COLUMNS)
        write_json(staging / "results.json", {"settings": rows, "runs": run_rows})
        draw_sweeps(staging / "sweep_vit.png", settings, rows)
    return markdown


def draw_sweeps(path: Path, settings: list[Setting], rows: list[dict]) -> None:
    by_name = {row["setting"]: row for row in rows}
    dense = by_name.get(DENSE, {})
    reference = {"dense": dense["val_loss_mean"]} if dense.get("val_loss_mean") is not None else {}

    def band(sweep: str, x_of, mean_key: str, std_key: str | None) -> list[tuple[float, float, float]]:
        points = []
        for setting in settings:
            row = by_name[setting.name]
            if sweep in setting.sweeps and row.get(mean_key) is not None:
                points.append((x_of(setting), row[mean_key], (std_key and row.get(std_key)) or 0.0))
        return points

    def experts(setting: Setting) -> int:
        return setting.experts

    def slots(setting: Setting) -> int:
        return setting.slots_per_expert

    time_reference = {"dense": dense["ms_per_step"]} if dense.get("ms_per_step") else {}
    draw([
        Panel("val loss: experts at fixed slots", "experts", "loss", {}, log_x=True, hlines=reference,
              bands={"soft MoE": band(EXPERTS_SWEEP, experts, "val_loss_mean", "val_loss_std")}),
        Panel("val loss: slots per expert at fixed experts", "slots per expert", "loss", {}, log_x=True,
              hlines=reference, bands={"soft MoE": band(SLOTS_SWEEP, slots, "val_loss_mean", "val_loss_std")}),
        Panel("training time per step", "experts", "ms/step", {}, log_x=True, y_from_zero=True,
              hlines=time_reference, bands={"soft MoE": band(EXPERTS_SWEEP, experts, "ms_per_step", None)}),
    ], path, "Soft MoE ViT sweeps (mean of the seeds, band: one standard deviation)")

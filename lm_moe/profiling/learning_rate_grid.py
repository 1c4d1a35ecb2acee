"""The comparison's learning-rate grid: every variant trained at each rate of the grid for a short
budget at one seed; each variant's best rate (lowest final validation loss) is the one its final
runs train at. A best rate at either end of three or more rates tried is marked: the variant's
best may lie beyond the grid. Files: lr_grid.csv, lr_grid.json, lr_grid.md and lr_grid.png
(validation loss against rate, a line per variant) in the sweep folder."""

from pathlib import Path

from lm_moe.output_files import staged_files
from lm_moe.profiling.charts import Panel, draw
from lm_moe.profiling.tables import Column, markdown_table, write_csv, write_json

GRID_COLUMNS = [
    Column("variant", "variant"),
    Column("learning_rate", "learning rate", "g"),
    Column("status", "status"),
    Column("val_loss", "val loss", ".3f"),
    Column("chosen", "chosen", lambda chosen: "yes" if chosen else ""),
    Column("at_edge", "at the grid's edge"),
    Column("reason", "reason"),
]


def best_rates(rows: list[dict]) -> dict[str, float | None]:
    """Each variant's rate of lowest final validation loss among its grid runs that trained
    (None: none did)."""
    best: dict[str, float | None] = {}
    losses: dict[str, float] = {}
    for row in rows:
        best.setdefault(row["variant"], None)
        loss = row.get("val_loss")
        if row["status"] == "ok" and loss is not None and loss < losses.get(row["variant"], float("inf")):
            best[row["variant"]], losses[row["variant"]] = row["learning_rate"], loss
    return best


def rates_at_edge(rows: list[dict], chosen: dict[str, float | None]) -> dict[str, str]:
    """Variant -> "lowest" or "highest": its chosen rate is that end of the three or more rates it
    trained at, so a rate beyond the grid may do better (two rates have no inside)."""
    trained: dict[str, list[float]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get("val_loss") is not None:
            trained.setdefault(row["variant"], []).append(row["learning_rate"])
    edges = {}
    for variant, rates in trained.items():
        if len(rates) >= 3 and chosen.get(variant) in (min(rates), max(rates)):
            edges[variant] = "lowest" if chosen[variant] == min(rates) else "highest"
    return edges


def edge_note(edges: dict[str, str]) -> str:
    """The line that names the variants chosen at the grid's edge."""
    named = ", ".join(f"{variant} (its {edge} rate)" for variant, edge in edges.items())
    return f"Chosen at the grid's edge, so a rate beyond the grid may do better: {named}."


def write_grid_report(out: Path, steps: int, seed: int, rows: list[dict]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Mark each variant's best rate in `rows` and write the grid's files; returns the best rates
    and the `rates_at_edge`."""
    chosen = best_rates(rows)
    edges = rates_at_edge(rows, chosen)
    for row in rows:
        row["chosen"] = row["status"] == "ok" and chosen[row["variant"]] == row["learning_rate"]
        row["at_edge"] = edges.get(row["variant"], "") if row["chosen"] else ""
    title = f"learning-rate grid: {steps} steps, seed {seed}"
    markdown = f"# {title}\n\nEach variant's final runs train at the rate marked chosen.\n\n" + markdown_table(rows, GRID_COLUMNS)
    if edges:
        markdown += f"\n{edge_note(edges)}\n"
    with staged_files(out) as staging:
        (staging / "lr_grid.md").write_text(markdown)
        write_csv(staging / "lr_grid.csv", rows, GRID_COLUMNS)
        write_json(staging / "lr_grid.json", {"steps": steps, "seed": seed, "chosen": chosen, "at_edge": edges,
                                               "runs": rows})
        series: dict[str, list] = {}
        for row in rows:
            if row["status"] == "ok" and row.get("val_loss") is not None:
                series.setdefault(row["variant"], []).append((row["learning_rate"], row["val_loss"]))
        draw([Panel("validation loss after the grid's steps", "learning rate", "loss (nats/token)", series, log_x=True)],
             staging / "lr_grid.png", title)
    return chosen, edges

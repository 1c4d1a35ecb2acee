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


def trained_points(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Each variant's (rate, final validation loss) of the grid runs that trained, in row order."""
    points: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get("val_loss") is not None:
            points.setdefault(row["variant"], []).append((row["learning_rate"], row["val_loss"]))
    return points


def best_rates(rows: list[dict], points: dict[str, list[tuple[float, float]]]) -> dict[str, float | None]:
    """Each variant of `rows` -> its rate of lowest final validation loss among its `trained_points`
    (None: no grid run of it trained)."""
    return {row["variant"]: min(points[row["variant"]], key=lambda point: point[1])[0]
            if row["variant"] in points else None for row in rows}


def rates_at_edge(points: dict[str, list[tuple[float, float]]], chosen: dict[str, float | None]) -> dict[str, str]:
    """Variant -> "lowest" or "highest": its chosen rate is that end of the three or more rates it
    trained at (its `trained_points`), so a rate beyond the grid may do better (two rates have no inside)."""
    edges = {}
    for variant, trained in points.items():
        rates = [rate for rate, _ in trained]
        if len(rates) < 3:
            continue
        if chosen[variant] == min(rates):
            edges[variant] = "lowest"
        elif chosen[variant] == max(rates):
            edges[variant] = "highest"
    return edges


def edge_note(edges: dict[str, str]) -> str:
    """The line that names the variants chosen at the grid's edge."""
    named = ", ".join(f"{variant} (its {edge} rate)" for variant, edge in edges.items())
    return f"Chosen at the grid's edge, so a rate beyond the grid may do better: {named}."


def write_grid_report(out: Path, steps: int, seed: int, rows: list[dict]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Mark each variant's best rate in `rows` and write the grid's files; returns the best rates
    and the `rates_at_edge`."""
    points = trained_points(rows)
    chosen = best_rates(rows, points)
    edges = rates_at_edge(points, chosen)
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
        draw([Panel("validation loss after the grid's steps", "learning rate", "loss (nats/token)", points, log_x=True)],
             staging / "lr_grid.png", title)
    return chosen, edges

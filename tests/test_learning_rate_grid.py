"""The learning-rate grid's report on hand-made grid rows: each variant's best rate, a best rate at
the grid's edge marked, failed rates left out. The grid end to end is in test_compare_lm.py."""

import csv
import json

from lm_moe.profiling.learning_rate_grid import write_grid_report


def _row(variant, rate, loss, status="ok"):
    return {"variant": variant, "learning_rate": rate, "status": status, "val_loss": loss, "reason": ""}


def test_a_best_rate_at_either_end_of_three_is_marked_and_one_inside_is_not(tmp_path):
    rows = [_row("inside", 1e-3, 4.2), _row("inside", 2e-3, 4.1), _row("inside", 4e-3, 4.3),
            _row("highest", 1e-3, 4.5), _row("highest", 2e-3, 4.4), _row("highest", 4e-3, 4.3),
            _row("lowest", 1e-3, 4.0), _row("lowest", 2e-3, 4.1), _row("lowest", 4e-3, 4.2),
            _row("two_rates", 1e-3, 4.0), _row("two_rates", 2e-3, 4.1)]
    chosen, edges = write_grid_report(tmp_path, 300, 1234, rows)

    assert chosen == {"inside": 2e-3, "highest": 4e-3, "lowest": 1e-3, "two_rates": 1e-3}
    assert edges == {"highest": "highest", "lowest": "lowest"}  # two rates have no inside
    table = list(csv.DictReader((tmp_path / "lr_grid.csv").open()))
    assert [(row["variant"], row["learning_rate"]) for row in table if row["at_edge"]] == [
        ("highest", "0.004"), ("lowest", "0.001")]
    assert json.loads((tmp_path / "lr_grid.json").read_text())["at_edge"] == edges
    assert ("Chosen at the grid's edge, so a rate beyond the grid may do better: highest (its highest rate), "
            "lowest (its lowest rate).") in (tmp_path / "lr_grid.md").read_text()


def test_a_failed_rate_is_neither_chosen_nor_an_end_of_the_grid(tmp_path):
    rows = [_row("v", 1e-3, 4.3), _row("v", 2e-3, 4.1), _row("v", 4e-3, None, status="failed"),
            _row("w", 1e-3, 4.3), _row("w", 2e-3, 4.2), _row("w", 4e-3, None, status="failed"), _row("w", 8e-3, 4.25)]
    chosen, edges = write_grid_report(tmp_path, 300, 1234, rows)

    assert chosen == {"v": 2e-3, "w": 2e-3}
    assert edges == {}  # v trained at two rates only; w's best is inside its three
    assert "grid's edge, so" not in (tmp_path / "lr_grid.md").read_text()

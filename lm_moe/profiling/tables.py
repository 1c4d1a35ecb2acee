"""Result rows (dicts) written as CSV, JSON and a markdown table, the same columns in each."""

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Column:
    key: str  # the row's key (CSV header, JSON key)
    title: str  # the markdown table's header
    format: str | Callable[[object], str] = ""  # a format spec (".2f") or a function; None shows as "-"

    def cell(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None:
            return "-"
        text = self.format(value) if callable(self.format) else format(value, self.format)
        return text.replace("|", "\\|").replace("\n", " ")


def write_csv(path: Path, rows: list[dict], columns: list[Column]) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=[column.key for column in columns], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, content: object) -> None:
    path.write_text(json.dumps(content, indent=2, default=str) + "\n")


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    lines = ["| " + " | ".join(column.title for column in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(column.cell(row) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"

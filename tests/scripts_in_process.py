"""Running a script of scripts/ in the test process, as `python scripts/<name>.py ...` from the
repository root runs it: a subprocess would spend most of its time importing."""

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_script_in_process(script: str, args: list[str], monkeypatch) -> None:
    """Run `script` (scripts/<name>.py) with `args` as its command line, from the repository root."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # a script imports its neighbours, as python puts its folder first
    runpy.run_path(str(REPO / script), run_name="__main__")

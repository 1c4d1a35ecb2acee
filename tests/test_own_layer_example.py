"""The "add your own layer" example of docs/layers.md runs as the page says: the layer keeps the
contract, trains through the CLI with its folder on PYTHONPATH, passes the causality report, and
loads from Python once its module is imported. The page shows the example's files as they are."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_moe.causality import report
from lm_moe.layers import FeedForwardLayer
from lm_moe.lit.trained_model import load_trained_module

from .lit.lm_runs import scalars, tiny_args

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = "docs/examples"  # as the page's commands name it, from the repository root
CONFIG = f"{EXAMPLES}/my_layer.yaml"
SHRINK = [*tiny_args(Path("cache"), steps=4), "--model.ffn.init_args.hidden_dim=128"]  # the cache lives in the work folder


@pytest.fixture
def my_layer(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / EXAMPLES))
    return importlib.import_module("my_layer")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """The page's `PYTHONPATH=docs/examples python -m lm_moe fit -c docs/examples/my_layer.yaml`, shrunk
    to 4 steps of a tiny model, in a work folder that sees the repository's docs/: its run folder."""
    work = tmp_path_factory.mktemp("work")
    (work / "docs").symlink_to(REPO / "docs")
    subprocess.run(
        [sys.executable, "-m", "lm_moe", "fit", "-c", CONFIG, *SHRINK],
        cwd=work, env={**os.environ, "PYTHONPATH": EXAMPLES}, check=True, capture_output=True, timeout=300,
    )
    return work / "runs/my_layer/version_0"


def test_the_layer_keeps_the_contract(my_layer):
    layer = my_layer.GatedMLP(dim=16, hidden_dim=32)
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    y, aux = layer(x, mask)
    assert isinstance(layer, FeedForwardLayer) and layer.is_causal
    assert y.shape == x.shape and y[1, 3:].eq(0).all() and y[0].ne(0).any()
    assert aux.loss.shape == () and aux.stats["gate_mean"].shape == ()
    with pytest.raises(ValueError, match="dim=16"):
        layer(torch.randn(2, 5, 8))


def test_it_trains_through_the_cli_and_logs_its_stats(trained_run):
    assert (trained_run / "checkpoints/last.ckpt").is_file()
    assert "moe/block_0/gate_mean" in scalars(trained_run)


def test_the_causality_report_passes_it_trained(trained_run, my_layer, monkeypatch, capsys):
    monkeypatch.chdir(trained_run.parents[2])  # the work folder, where the run's relative paths lead
    args = ["-c", str(REPO / CONFIG), *SHRINK, "--ckpt_path", str(trained_run / "checkpoints/last.ckpt")]
    assert report.main(args) == report.NO_LEAK
    out = capsys.readouterr().out
    assert "PASS" in out and "LEAK" not in out and "no leak found" in out


def test_it_loads_from_python_once_its_module_is_imported(trained_run, my_layer):
    model = load_trained_module(trained_run / "checkpoints/last.ckpt").model
    assert isinstance(model.blocks[0].ffn, my_layer.GatedMLP)


@pytest.mark.parametrize("name", ["my_layer.py", "my_layer.yaml"])
def test_the_page_shows_the_example_files_as_they_are(name):
    assert (REPO / EXAMPLES / name).read_text() in (REPO / "docs/layers.md").read_text()

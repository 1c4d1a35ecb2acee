"""What a run shows and leaves: the progress bar counts optimizer steps (also after a resume), the
seed is 0 unless a config sets one, and a run refused before its first batch leaves no run folder."""

import pytest
import yaml

from lm_moe import cli
from lm_moe.lit.progress_bar import StepProgressBar

from . import lm_runs
from .lm_runs import REPO, TOP2


def train_bar(run) -> tuple[float, float]:
    bar = next(callback for callback in run.trainer.callbacks if isinstance(callback, StepProgressBar))
    task = bar.progress.tasks[bar.train_progress_bar_id]
    return task.completed, task.total


def test_the_progress_bar_counts_optimizer_steps_towards_max_steps_also_after_a_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = lm_runs.fit(TOP2, tmp_path / "cache", "--trainer.enable_progress_bar=true")
    assert train_bar(first) == (4, 4)
    resumed = lm_runs.fit(TOP2, tmp_path / "cache", "--trainer.enable_progress_bar=true", "--ckpt_path=last", steps=6)
    assert train_bar(resumed) == (6, 6)  # Lightning's own bar shows the epoch's batch index against what is left


def test_the_seed_is_0_unless_the_config_sets_one(capsys):
    for config, seed in ((TOP2, 0), (REPO / "configs/vit/soft_moe.yaml", 1234)):
        with pytest.raises(SystemExit):
            cli.main(["fit", "-c", str(config), "--print_config"])
        assert yaml.safe_load(capsys.readouterr().out)["seed_everything"] == seed


def test_a_run_refused_before_its_first_batch_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(ValueError, match="needs at least 2"):
        cli.main(["fit", "-c", str(TOP2), f"--data.data_files={tmp_path / 'one.txt'}", "--trainer.max_steps=2"])
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "top2" / "version_0").mkdir(parents=True)  # an earlier run's folder stays
    with pytest.raises(ValueError, match="needs at least 2"):
        cli.main(["fit", "-c", str(TOP2), f"--data.data_files={tmp_path / 'one.txt'}", "--trainer.max_steps=2"])
    assert [path.name for path in (tmp_path / "runs" / "top2").iterdir()] == ["version_0"]

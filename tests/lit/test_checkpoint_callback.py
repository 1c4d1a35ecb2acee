"""last.ckpt always holds the newest step a run reached: at every validation and at the end."""

from pathlib import Path

import pytest

from lm_moe import cli
from lm_moe.lit.checkpoints import read_checkpoint

from .test_language_model_cli import REPO, tiny_args
from .tiny_runs import LastCheckpointSteps

RECORD_LAST = "--trainer.callbacks+=tests.lit.tiny_runs.LastCheckpointSteps"


def fit_top2(cache: Path, steps: int, *extra: str):
    args = ["fit", "-c", str(REPO / "configs/lm/top2.yaml"), *tiny_args(cache, steps),
            "--trainer.check_val_every_n_epoch=null", RECORD_LAST, *extra]
    result = cli.main(args)
    checkpoints = Path(result.trainer.checkpoint_callback.dirpath)
    recorder = next(callback for callback in result.trainer.callbacks if isinstance(callback, LastCheckpointSteps))
    return checkpoints, recorder.steps


def step_of(path: Path) -> int:
    return read_checkpoint(path)["global_step"]


def test_last_ckpt_follows_every_validation_even_when_the_best_does_not_move(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # mode=max on a falling validation loss: only the first validation (step 2) is ever the best.
    checkpoints, seen = fit_top2(tmp_path / "cache", 6, "--checkpoint.mode=max")
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best-2.ckpt", "last.ckpt"]
    assert step_of(checkpoints / "best-2.ckpt") == 2
    assert seen == [None, None, 2, 2, 4, 4]  # what a run killed as each step starts resumes from
    assert step_of(checkpoints / "last.ckpt") == 6


def test_last_ckpt_holds_the_final_step_when_training_ends_between_validations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoints, _ = fit_top2(tmp_path / "cache", 5)
    assert step_of(checkpoints / "last.ckpt") == 5


@pytest.mark.parametrize("save_last", ["link", "true"])
def test_last_ckpt_is_a_file_of_the_newest_step_and_the_best_stays_as_it_was(tmp_path, monkeypatch, save_last):
    monkeypatch.chdir(tmp_path)
    checkpoints, _ = fit_top2(tmp_path / "cache", 5, "--checkpoint.mode=max", f"--checkpoint.save_last={save_last}")
    assert step_of(checkpoints / "best-2.ckpt") == 2 and step_of(checkpoints / "last.ckpt") == 5

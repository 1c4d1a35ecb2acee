"""last.ckpt always holds the newest step a run reached: at every validation and at the end."""

from pathlib import Path

import pytest
import torch
import yaml

from lm_moe import cli
from lm_moe.lit.checkpoints import newest_last_checkpoint, read_checkpoint

from .lm_runs import REPO, tiny_args
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


def test_ckpt_path_best_is_the_best_score_over_every_version_of_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # mode=max on a falling loss: step 2 of version 0 is the best; version 1, resumed, still
    # writes its own first validation (step 6) as its best.
    fit_top2(tmp_path / "cache", 4, "--checkpoint.mode=max")
    resumed, _ = fit_top2(tmp_path / "cache", 8, "--checkpoint.mode=max", "--ckpt_path=last")
    assert [path.name for path in resumed.glob("best-*.ckpt")] == ["best-6.ckpt"]
    config = str(resumed.parent / "config.yaml")
    # The resumed run's config does not name the checkpoint it resumed from: -c config.yaml would load it.
    assert yaml.safe_load(Path(config).read_text())["ckpt_path"] is None
    result = cli.main(["validate", "-c", config, "--ckpt_path=best"])
    assert Path(result.trainer.ckpt_path).resolve() == (tmp_path / "runs/top2/version_0/checkpoints/best-2.ckpt").resolve()
    assert torch.isfinite(result.trainer.callback_metrics["val/loss"])
    # A damaged checkpoint among them is skipped, with a warning, not a failure.
    (resumed / "best-7.ckpt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="--ckpt_path best: skipping .*best-7.ckpt' is not a readable PyTorch checkpoint"):
        result = cli.main(["validate", "-c", config, "--ckpt_path=best"])
    assert Path(result.trainer.ckpt_path).name == "best-2.ckpt"
    # Without a checkpoint, validate says that it evaluates untrained weights.
    with pytest.warns(UserWarning, match="validate without --ckpt_path evaluates the model as the config builds it"):
        cli.main(["validate", "-c", str(tmp_path / "runs/top2/version_0/config.yaml")])


def test_ckpt_path_best_without_a_scored_checkpoint_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--ckpt_path best: no checkpoint with a monitored score"):
        cli.main(["validate", "-c", str(REPO / "configs/lm/top2.yaml"), "--ckpt_path=best"])


def test_ckpt_path_last_takes_the_newest_last_checkpoint_of_a_version_folder_run_into_twice(tmp_path, monkeypatch):
    # A second fresh run into a named version folder finds the first run's last.ckpt there, and
    # Lightning writes its own as last-v1.ckpt.
    monkeypatch.chdir(tmp_path)
    named = "--trainer.logger.init_args.version=exp"
    fit_top2(tmp_path / "cache", 4, named)
    checkpoints, _ = fit_top2(tmp_path / "cache", 2, named)
    assert step_of(checkpoints / "last.ckpt") == 4 and step_of(checkpoints / "last-v1.ckpt") == 2
    assert newest_last_checkpoint(Path("runs/top2")) == checkpoints / "last-v1.ckpt"

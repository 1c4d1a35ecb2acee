"""Language-model checkpoints through the CLI: resuming from the last or best, evaluating one, and
refusing one that is damaged, of another architecture or of the other task, before any data work."""

import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from lm_moe import cli, sample
from lm_moe.causality import report as causality_report
from lm_moe.lit.checkpoints import read_checkpoint

from .lm_runs import REPO, TOP2, fit, tiny_args


def test_resume_from_last_continues_step_count_and_optimizer(trained_top2, tmp_path, monkeypatch):
    work, cache = trained_top2
    shutil.copytree(work / "runs/top2/version_0", tmp_path / "runs/top2/version_0")  # the shared run stays as it is
    monkeypatch.chdir(tmp_path)
    first = read_checkpoint(tmp_path / "runs/top2/version_0/checkpoints/last.ckpt")
    assert first["global_step"] == 4

    resumed = fit(TOP2, cache, "--ckpt_path=last", steps=6)
    assert resumed.trainer.global_step == 6
    assert Path(resumed.trainer.logger.log_dir).name == "version_1"  # the first run's logs stay
    adam_steps = {float(state["step"]) for state in resumed.trainer.optimizers[0].state.values()}
    assert adam_steps == {6.0}  # Adam's moments continued from step 4, not from scratch


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_help_describes_ckpt_path_as_resolved_here(subcommand, capsys):
    with pytest.raises(SystemExit):
        cli.main([subcommand, "-c", str(TOP2), "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "the checkpoint with the best monitored score over every version of this run" in help_text
    assert "previous `trainer.fit` call" not in help_text  # Lightning's own description


def test_ckpt_path_last_finds_a_version_folder_the_logger_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit(REPO / "configs/lm/dense.yaml", tmp_path / "cache", "--trainer.logger.init_args.version=first", steps=2)
    resumed = fit(REPO / "configs/lm/dense.yaml", tmp_path / "cache", "--trainer.logger.init_args.version=second",
                  "--ckpt_path=last")
    assert Path(resumed.trainer.ckpt_path).parts[-3:] == ("first", "checkpoints", "last.ckpt")
    assert resumed.trainer.global_step == 4


def test_ckpt_path_last_without_a_run_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no last.ckpt"):
        fit(TOP2, tmp_path / "cache", "--ckpt_path=last")


def test_a_checkpoint_trained_with_other_settings_of_the_same_shapes_is_named_in_a_warning(trained_top2, tmp_path, monkeypatch):
    work, cache = trained_top2
    monkeypatch.chdir(tmp_path)
    checkpoint = work / "runs/top2/version_0/checkpoints/last.ckpt"
    validate = ["validate", "-c", str(TOP2), *tiny_args(cache), f"--ckpt_path={checkpoint}",
                "--trainer.logger=false"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=r"(?!the checkpoint was trained with other settings)")
        cli.main(validate)  # the settings it was trained with: no warning
    message = (r"the checkpoint was trained with other settings than this validate uses \(the config's apply\): "
               r"model.ffn.init_args.top_k: 2 in the checkpoint, 1 now; data.seed: 1234 in the checkpoint, 7 now")
    with pytest.warns(UserWarning, match=message):
        cli.main([*validate, "--data.seed=7", "--model.ffn.init_args.top_k=1"])


def test_checkpoint_of_another_architecture_is_refused_before_any_data_work(trained_top2, tmp_path, monkeypatch):
    work, _ = trained_top2
    monkeypatch.chdir(tmp_path)
    checkpoint = work / "runs/top2/version_0/checkpoints/last.ckpt"
    with pytest.raises(ValueError, match="different architecture"):
        fit(REPO / "configs/lm/dense.yaml", tmp_path / "cache", f"--ckpt_path={checkpoint}")
    assert list(tmp_path.iterdir()) == []  # no data prepared, no run folder


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_checkpoint_is_refused_before_any_data_work(trained_top2, tmp_path, monkeypatch, damage):
    work, _ = trained_top2
    monkeypatch.chdir(tmp_path)
    intact = (work / "runs/top2/version_0/checkpoints/last.ckpt").read_bytes()
    damaged = tmp_path / "damaged" / "last.ckpt"
    damaged.parent.mkdir()
    damaged.write_bytes(bytes(range(256)) * 8 if damage == "garbage" else intact[: len(intact) // 2])
    for subcommand in ("fit", "validate"):
        with pytest.raises(ValueError, match="damaged/last.ckpt' is not a readable PyTorch checkpoint"):
            cli.main([subcommand, "-c", str(TOP2), *tiny_args(tmp_path / "cache"), f"--ckpt_path={damaged}"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["damaged"]


@pytest.mark.parametrize("subcommand, key", [("validate", "val/loss"), ("test", "test/loss")])
def test_validate_and_test_a_checkpoint(trained_top2, tmp_path, monkeypatch, subcommand, key):
    work, _ = trained_top2
    monkeypatch.chdir(tmp_path)  # the run's config.yaml logs to runs/ here
    run_dir = work / "runs/top2/version_0"
    result = cli.main([subcommand, "-c", str(run_dir / "config.yaml"), f"--ckpt_path={run_dir}/checkpoints/last.ckpt"])
    loss = result.trainer.callback_metrics[key]
    assert torch.isfinite(loss) and result.trainer.callback_metrics[key.replace("loss", "ppl")] == pytest.approx(torch.exp(loss).item(), rel=1e-5)


def test_the_language_model_commands_refuse_an_image_classifier_s_checkpoint(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "vit.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"num_classes": 10, "image_size": 28}}, checkpoint)
    message = r"vit.ckpt' is the checkpoint of an image classifier \(task: vit\); this needs the checkpoint of a language model"
    with pytest.raises(ValueError, match=message):
        sample.sample(str(checkpoint))
    assert causality_report.main(["--ckpt_path", str(checkpoint)]) == causality_report.BAD_INPUT
    assert re.fullmatch(f"python -m lm_moe.causality: error: .*{message}.*\n", capsys.readouterr().err)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):  # named as the other task's, not as another architecture
        fit(TOP2, tmp_path / "cache", f"--ckpt_path={checkpoint}")

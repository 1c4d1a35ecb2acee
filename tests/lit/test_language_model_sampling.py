"""Text from a trained language model: `python -m lm_moe.sample` and the `predict` subcommand."""

import json
from pathlib import Path

import pytest
import torch

from lm_moe import cli, sample
from lm_moe.data.text import TextDataModule
from lm_moe.lit.language_model import SamplingSettings


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"prompt_tokens": 0}, "sampling.prompt_tokens must be a positive integer, got 0"),
        ({"new_tokens": -1}, "sampling.new_tokens must be an integer >= 0, got -1"),
        ({"temperature": -0.5}, "sampling.temperature must be a number >= 0, got -0.5"),
        ({"top_k": 0}, "sampling.top_k must be a positive integer, got 0"),
        ({"top_p": 0.0}, r"sampling.top_p must be a number in \(0, 1\] or None, got 0.0"),
    ],
)
def test_bad_sampling_settings_are_refused_by_name(setting, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**setting)


def test_sample_prints_a_continuation_of_the_prompt(trained_top2, capsys):
    work, _ = trained_top2
    checkpoint = str(work / "runs/top2/version_0/checkpoints/last.ckpt")
    texts = sample.sample(checkpoint, prompt="def ", max_new_tokens=5, num_samples=2)
    assert len(texts) == 2 and all(text.startswith("def ") for text in texts)
    assert "--- sample 1 ---" in capsys.readouterr().out
    with pytest.raises(ValueError, match="block_size 32"):
        sample.sample(checkpoint, prompt="x " * 40, max_new_tokens=5)


def test_sample_fills_the_rest_of_the_context_by_default(trained_top2, monkeypatch, capsys):
    work, _ = trained_top2
    checkpoint = str(work / "runs/top2/version_0/checkpoints/last.ckpt")
    asked = []  # (prompt length, max_new_tokens) of each generate call
    generate = sample.generate

    def recording_generate(model, input_ids, max_new_tokens, **kwargs):
        asked.append((input_ids.shape[1], max_new_tokens))
        return generate(model, input_ids, max_new_tokens, **kwargs)

    monkeypatch.setattr(sample, "generate", recording_generate)
    sample.main([checkpoint])
    sample.main([checkpoint, "--prompt", "def main():", "--top_k", "null"])
    assert asked[0] == (1, 31)  # end-of-text alone, then the rest of block_size 32
    assert asked[1][0] > 1 and sum(asked[1]) == 32
    assert capsys.readouterr().out.count("--- sample 0 ---") == 2
    with pytest.raises(ValueError, match=r"prompt length \d+ \(end-of-text included\) leaves no room for new tokens in the model's block_size 32"):
        sample.sample(checkpoint, prompt="x " * 40)


def test_sample_command_reports_user_errors_in_one_line(trained_top2, tmp_path, capsys):
    work, _ = trained_top2
    checkpoint = str(work / "runs/top2/version_0/checkpoints/last.ckpt")
    vit = tmp_path / "vit.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"num_classes": 10, "image_size": 28}}, vit)
    cases = [
        ([checkpoint, "--max_new_tokens", "40"], "prompt length 1 + max_new_tokens 40 exceeds the model's block_size 32"),
        ([checkpoint, "--prompt", "x " * 40], "(end-of-text included) leaves no room for new tokens"),
        ([checkpoint, "--num_samples", "0"], "num_samples must be a positive integer, got 0"),
        ([checkpoint, "--seed", str(2**64)], f"seed must be an integer in [0, 2**64), got {2**64}"),
        ([str(tmp_path / "missing.ckpt")], "checkpoint not found"),
        ([str(vit)], "is the checkpoint of an image classifier"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            sample.main(args)
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("python -m lm_moe.sample: error: ") and message in captured.err
        assert captured.err.count("\n") == 1 and not captured.out


def test_sample_help_names_the_value_that_means_all_tokens(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert help_text.count("None = all; null on the command line") == 2  # top_k and top_p


@pytest.mark.parametrize("bad_file", ["missing.ckpt", "config.yaml"])
def test_sample_refuses_what_is_not_a_checkpoint(tmp_path, bad_file):
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises((FileNotFoundError, ValueError), match=bad_file):
        sample.sample(str(tmp_path / bad_file))


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"num_samples": 0}, "num_samples must be a positive integer, got 0"),
        ({"max_new_tokens": -5}, "max_new_tokens must be an integer >= 0, got -5"),
        ({"top_p": 2.0}, r"top_p must be a number in \(0, 1\] or None, got 2.0"),
        ({"device": "cude"}, "device 'cude' is not usable here"),
    ],
)
def test_sample_checks_its_settings_before_reading_the_checkpoint(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        sample.sample(str(tmp_path / "missing.ckpt"), **setting)


def test_predict_writes_continuations_of_validation_prompts(trained_top2, tmp_path, monkeypatch):
    work, _ = trained_top2
    monkeypatch.chdir(tmp_path)  # the run's config.yaml logs to runs/ here
    run_dir = work / "runs/top2/version_0"
    args = ["predict", "-c", str(run_dir / "config.yaml"), f"--ckpt_path={run_dir}/checkpoints/last.ckpt",
            "--trainer.limit_predict_batches=1", "--model.sampling.prompt_tokens=8", "--model.sampling.new_tokens=4"]
    result = cli.main(args)
    written = Path(result.trainer.log_dir) / "predictions.jsonl"
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert len(records) == 4  # one batch of data.batch_size prompts
    assert all(record["prompt"] and "generated" in record for record in records)

    # Refused before any data work: setting the data up would fail the test another way.
    monkeypatch.setattr(TextDataModule, "setup", lambda self, stage=None: pytest.fail("the data was set up"))
    with pytest.raises(ValueError, match="exceed the model's block_size 32"):
        cli.main(args[:-1] + ["--model.sampling.new_tokens=40"])


def test_predict_run_twice_into_one_folder_keeps_only_the_second_run(trained_top2, tmp_path, monkeypatch):
    work, _ = trained_top2
    monkeypatch.chdir(tmp_path)
    run_dir = work / "runs/top2/version_0"
    # Without a logger, the log dir is default_root_dir: the same folder for both runs.
    args = ["predict", "-c", str(run_dir / "config.yaml"), f"--ckpt_path={run_dir}/checkpoints/last.ckpt",
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--model.sampling.prompt_tokens=8",
            "--model.sampling.new_tokens=4"]
    cli.main([*args, "--trainer.limit_predict_batches=2"])
    written = tmp_path / "predictions.jsonl"
    assert len(written.read_text().splitlines()) == 8  # two batches of 4
    cli.main([*args, "--trainer.limit_predict_batches=1"])
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert len(records) == 4  # the second run's one batch, nothing left of the first
    assert all(record["prompt"] and "generated" in record for record in records)

"""What the language model's command line takes and refuses: a bad setting or config in one line,
before anything is written; the layers the FFN setting lists; the help and the printed config."""

import subprocess
import sys

import pytest

from lm_moe import cli, sample

from .lm_runs import LM_CONFIGS, REPO, TOP2, fit, tiny_args


def test_a_batch_size_that_splits_mixture_of_tokens_groups_is_refused_before_any_data_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="data.batch_size=6 must be a multiple of 4: the model's Mixture of Tokens"):
        fit(REPO / "configs/lm/mixture_of_tokens.yaml", tmp_path / "cache", "--data.batch_size=6")
    assert list(tmp_path.iterdir()) == []  # no data prepared, no run folder


def test_the_command_reports_a_bad_setting_in_one_line_with_status_2(tmp_path):
    command = [sys.executable, "-m", "lm_moe", "fit", "-c", str(TOP2), "--data.batch_size=0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "python -m lm_moe: error: batch_size must be a positive integer, got 0"


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed\n", "is not readable YAML"),
    ("- model\n- data\n", r"must be a mapping of sections \(model:, data:, trainer:\), got a list"),
])
def test_a_config_that_is_not_a_yaml_mapping_is_refused_by_name(tmp_path, text, message):
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=f"config '{config}' {message}"):
        cli.main(["fit", "-c", str(config)])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.learning_rate=-1", "learning_rate must be a positive number, got -1.0"),
        ("--model.min_lr_ratio=2", r"min_lr_ratio must be a number in \[0, 1\], got 2"),
        ("--model.sampling.top_p=1.5", r"sampling.top_p must be a number in \(0, 1\] or None, got 1.5"),
        ("--data.val_fraction=0", r"val_fraction must be a number in \(0, 1\), got 0"),
        ("--trainer.gradient_clip_val=-1", r"trainer.gradient_clip_val must be a number >= 0, got -1"),
    ],
)
def test_bad_settings_fail_before_anything_is_written(tmp_path, monkeypatch, override, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        fit(TOP2, tmp_path / "cache", override)
    assert list(tmp_path.iterdir()) == []  # no run folder, no data cache


@pytest.mark.parametrize("config, setting", [("configs/lm/top2.yaml", "--model.ffn"), ("configs/vit/soft_moe.yaml", "--model.ffn")])
def test_the_ffn_setting_lists_the_layers_and_refuses_other_modules(config, setting, capsys):
    with pytest.raises(SystemExit):
        cli.main(["fit", "-c", str(REPO / config), "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # unwrapped
    listed = help_text.split(f"{setting} ")[-1].split("--model.moe_blocks")[0]
    assert "lm_moe.layers.TopKMoE" in listed and "lm_moe.layers.CumulativeSoftMoE" in listed
    assert "torch.nn" not in listed  # not every torch module there is
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "-c", str(REPO / config), setting, "torch.nn.Linear"])
    assert exit_info.value.code == 2
    assert "Expected 'torch.nn.Linear' to be a subclass of <class 'FeedForwardLayer'>" in capsys.readouterr().err


@pytest.mark.parametrize("main, command", [(cli.main, "python -m lm_moe"), (sample.main, "python -m lm_moe.sample")])
def test_help_names_the_command_to_type(capsys, main, command):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {command} ")


def test_print_config_shows_the_linked_and_ffn_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "-c", str(TOP2), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lm_moe.layers.TopKMoE" in printed and "block_size: 128" in printed


def test_the_cli_called_from_code_ignores_the_callers_own_argv_without_warning(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr("sys.argv", ["some_script.py", "--its-own-flag"])
    built = cli.main(["-c", str(LM_CONFIGS[0]), *tiny_args(tmp_path)], run=False)
    assert built.model.model is not None
    assert not [w for w in recwarn if "LightningCLI's args parameter" in str(w.message)]

"""The language-model job end to end through the Lightning CLI, at toy sizes, offline."""

import json
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_moe import cli, sample
from lm_moe.causality import report as causality_report
from lm_moe.data.text import TextDataModule
from lm_moe.data.tokenizer import load_encoding
from lm_moe.layers import TopKMoE
from lm_moe.lit.checkpoints import read_checkpoint
from lm_moe.lit.interruption import CheckpointOnInterrupt
from lm_moe.lit.language_model import SamplingSettings

from .tiny_runs import tiny_run_args

REPO = Path(__file__).resolve().parents[2]
LM_CONFIGS = sorted((REPO / "configs" / "lm").glob("*.yaml"))


def tiny_args(cache_dir: Path, steps: int = 4) -> list[str]:
    """Overrides that shrink any LM config to a seconds-long run on the offline default corpus."""
    return [
        "--model.n_layer=2",
        "--model.dim=64",
        "--model.n_head=2",
        "--model.dense_hidden_dim=128",
        "--model.warmup_steps=2",
        "--data.max_documents=40",
        "--data.vocab_size=512",
        "--data.block_size=32",
        "--data.batch_size=4",
        "--data.val_fraction=0.2",
        *tiny_run_args(cache_dir, steps),
    ]


def fit(config: Path, cache_dir: Path, *extra: str, steps: int = 4):
    return cli.main(["fit", "-c", str(config), *tiny_args(cache_dir, steps), *extra])


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def trained_top2(tmp_path_factory):
    """One short top-2 run shared by the tests that need a checkpoint: (work dir, cache dir)."""
    work = tmp_path_factory.mktemp("work")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        fit(REPO / "configs/lm/top2.yaml", cache)
    return work, cache


def test_configs_exist():
    assert {path.stem for path in LM_CONFIGS} >= {"dense", "top2"}


@pytest.mark.parametrize("config", LM_CONFIGS, ids=[path.stem for path in LM_CONFIGS])
def test_every_lm_config_fits_a_few_steps(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fit(config, tmp_path / "cache")
    assert run.trainer.global_step == 4
    run_dir = Path(run.trainer.logger.log_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    logged = scalars(run_dir)
    assert all(torch.isfinite(torch.tensor(logged["val/loss"])))
    assert logged["val/ppl"][-1] == pytest.approx(torch.exp(torch.tensor(logged["val/loss"][-1])).item(), rel=1e-4)


def test_tensorboard_holds_loss_perplexity_and_expert_load(trained_top2):
    work, _ = trained_top2
    run_dir = work / "runs" / "top2" / "version_0"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/cross_entropy", "train/aux_loss", "val/loss", "val/ppl", "val/unigram_baseline",
                "perf/train_tokens_per_sec", "hp_metric"):
        assert tag in tags["scalars"], tag
    for block in ("block_0", "block_1"):
        for stat in ("tokens_per_expert_max_min_ratio", "tokens_per_expert_idle_fraction", "dropped_fraction",
                     "router_entropy", "load_balance_loss", "router_z_loss"):
            assert f"moe/{block}/{stat}" in tags["scalars"]
        assert f"moe/{block}/tokens_per_expert" in tags["histograms"]


def test_moe_stats_are_computed_only_on_the_steps_that_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    computed = []
    compute = TopKMoE._stats
    monkeypatch.setattr(TopKMoE, "_stats", lambda self, *args: computed.append(1) or compute(self, *args))
    run = fit(REPO / "configs/lm/top2.yaml", tmp_path / "cache", "--trainer.log_every_n_steps=2", steps=6)
    events = EventAccumulator(run.trainer.logger.log_dir, size_guidance={"histograms": 0})  # keep them all
    events.Reload()
    loss_steps = [event.step for event in events.Scalars("train/loss")]
    assert len(loss_steps) == 3  # every second step of six writes logs
    assert [event.step for event in events.Scalars("moe/block_1/router_entropy")] == loss_steps
    assert [event.step for event in events.Histograms("moe/block_1/tokens_per_expert")] == loss_steps
    assert len(computed) == 3 * 2  # two MoE blocks; validation and the other steps never compute them


def test_resume_from_last_continues_step_count_and_optimizer(trained_top2, monkeypatch):
    work, cache = trained_top2
    monkeypatch.chdir(work)
    first = read_checkpoint(work / "runs/top2/version_0/checkpoints/last.ckpt")
    assert first["global_step"] == 4

    resumed = fit(REPO / "configs/lm/top2.yaml", cache, "--ckpt_path=last", steps=6)
    assert resumed.trainer.global_step == 6
    assert Path(resumed.trainer.logger.log_dir).name == "version_1"  # the first run's logs stay
    adam_steps = {float(state["step"]) for state in resumed.trainer.optimizers[0].state.values()}
    assert adam_steps == {6.0}  # Adam's moments continued from step 4, not from scratch


EXIT_STATUS = {signal.SIGINT: 1, signal.SIGTERM: 128 + signal.SIGTERM}  # not success


def interrupted_fit(tmp_path: Path, signum: int, *overrides: str, in_validation: bool = False) -> int:
    """Fit top2 for up to 8 steps with `signum` sent as step 2 starts (or during the validation
    after it); the exit status it stopped with."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as stopped:
            fit(REPO / "configs/lm/top2.yaml", tmp_path / "cache", *overrides,
                "--trainer.callbacks+=tests.lit.tiny_runs.SignalAtStep", "--trainer.callbacks.step=2",
                f"--trainer.callbacks.signum={int(signum)}", f"--trainer.callbacks.in_validation={in_validation}",
                steps=8)
    finally:  # Lightning ignores Ctrl-C once it has stopped on one
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return stopped.value.code


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_writes_last_ckpt_at_the_step_it_reached_and_resumes_there(tmp_path, monkeypatch, signum):
    # No validation, so no checkpoint before the interruption: without one, the run would restart at 0.
    monkeypatch.chdir(tmp_path)
    no_validation = "--trainer.limit_val_batches=0"
    assert interrupted_fit(tmp_path, signum, no_validation) == EXIT_STATUS[signum]
    saved = read_checkpoint(tmp_path / "runs/top2/version_0/checkpoints/last.ckpt")
    assert saved["global_step"] == 3  # the step under way when the signal came was finished

    resumed = fit(REPO / "configs/lm/top2.yaml", tmp_path / "cache", no_validation, "--ckpt_path=last", steps=5)
    assert resumed.trainer.global_step == 5
    assert {float(state["step"]) for state in resumed.trainer.optimizers[0].state.values()} == {5.0}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_validation_lets_it_finish_then_stops_at_that_step(tmp_path, monkeypatch, signum):
    monkeypatch.chdir(tmp_path)
    assert interrupted_fit(tmp_path, signum, "--trainer.limit_val_batches=3", in_validation=True) == EXIT_STATUS[signum]
    checkpoints = tmp_path / "runs/top2/version_0/checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best-2.ckpt", "last.ckpt"]  # scored
    saved = read_checkpoint(checkpoints / "last.ckpt")
    assert saved["global_step"] == 2  # no step after the validation
    # All 3 validation batches ran (Lightning alone stopped after the signal's batch, and the
    # resumed run skipped the rest).
    assert saved["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]["completed"] == 3


def test_with_gradient_accumulation_an_interruption_stops_after_an_optimizer_step(tmp_path, monkeypatch):
    # The signal comes as the first of step 3's two batches starts: stopping after it would lose its gradients.
    monkeypatch.chdir(tmp_path)
    interrupted_fit(tmp_path, signal.SIGTERM, "--trainer.accumulate_grad_batches=2", "--trainer.limit_val_batches=0")
    saved = read_checkpoint(tmp_path / "runs/top2/version_0/checkpoints/last.ckpt")
    assert saved["global_step"] == 3
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 6  # both of step 3's


def test_with_last_as_a_link_an_interruption_writes_its_own_last_ckpt_and_keeps_the_best(tmp_path, monkeypatch):
    # save_last="link" makes last.ckpt a link to the best checkpoint: writing through it would overwrite the best.
    monkeypatch.chdir(tmp_path)
    interrupted_fit(tmp_path, signal.SIGINT, "--checkpoint.save_last=link")
    checkpoints = tmp_path / "runs/top2/version_0/checkpoints"
    last = checkpoints / "last.ckpt"
    assert last.is_file() and not last.is_symlink()
    assert read_checkpoint(last)["global_step"] == 3
    assert read_checkpoint(checkpoints / "best-2.ckpt")["global_step"] == 2  # validated at step 2


def test_a_second_ctrl_c_stops_at_once():
    callback = CheckpointOnInterrupt()
    callback._on_ctrl_c(signal.SIGINT, None)  # the first asks for a stop after the step
    with pytest.raises(KeyboardInterrupt):
        callback._on_ctrl_c(signal.SIGINT, None)


def test_vocab_size_null_keeps_the_whole_encoding(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fit(REPO / "configs/lm/dense.yaml", tmp_path / "cache", "--data.vocab_size=null", "--model.n_layer=1", steps=1)
    assert run.model.model.vocab_size == run.datamodule.vocab_size == load_encoding("cl100k_base").vocab_size
    # The checkpoint rebuilds the whole encoding for sampling.
    texts = sample.sample(str(tmp_path / "runs/dense/version_0/checkpoints/last.ckpt"), prompt="x", max_new_tokens=2)
    assert len(texts) == 1 and texts[0].startswith("x")


def test_a_batch_size_that_splits_mixture_of_tokens_groups_is_refused_before_any_data_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="data.batch_size=6 must be a multiple of 4: the model's Mixture of Tokens"):
        fit(REPO / "configs/lm/mixture_of_tokens.yaml", tmp_path / "cache", "--data.batch_size=6")
    assert list(tmp_path.iterdir()) == []  # no data prepared, no run folder


def test_the_command_reports_a_bad_setting_in_one_line_with_status_2(tmp_path):
    command = [sys.executable, "-m", "lm_moe", "fit", "-c", str(REPO / "configs/lm/top2.yaml"), "--data.batch_size=0"]
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


def test_a_run_without_a_logger_trains_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit(REPO / "configs/lm/dense.yaml", tmp_path / "cache", "--trainer.logger=false", "--model.n_layer=1", steps=2)
    assert sorted(path.name for path in (tmp_path / "runs/checkpoints").iterdir()) == ["best-2.ckpt", "last.ckpt"]


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_help_describes_ckpt_path_as_resolved_here(subcommand, capsys):
    with pytest.raises(SystemExit):
        cli.main([subcommand, "-c", str(REPO / "configs/lm/top2.yaml"), "--help"])
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
        fit(REPO / "configs/lm/top2.yaml", tmp_path / "cache", "--ckpt_path=last")


def test_a_checkpoint_trained_with_other_settings_of_the_same_shapes_is_named_in_a_warning(trained_top2, monkeypatch):
    work, cache = trained_top2
    monkeypatch.chdir(work)
    checkpoint = work / "runs/top2/version_0/checkpoints/last.ckpt"
    validate = ["validate", "-c", str(REPO / "configs/lm/top2.yaml"), *tiny_args(cache), f"--ckpt_path={checkpoint}",
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
            cli.main([subcommand, "-c", str(REPO / "configs/lm/top2.yaml"), *tiny_args(tmp_path / "cache"), f"--ckpt_path={damaged}"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["damaged"]


def test_loss_goes_down_on_a_tiny_fixed_corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    run = fit(
        REPO / "configs/lm/dense.yaml",
        tmp_path / "cache",
        f"--data.data_files={corpus}/*.txt",
        "--data.vocab_size=300",
        "--model.learning_rate=0.01",
        steps=50,
    )
    losses = scalars(Path(run.trainer.logger.log_dir))["train/loss"]
    assert losses[-1] < 0.5 * losses[0]


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
        fit(REPO / "configs/lm/top2.yaml", tmp_path / "cache", override)
    assert list(tmp_path.iterdir()) == []  # no run folder, no data cache


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


@pytest.mark.parametrize("config, setting", [("configs/lm/top2.yaml", "--model.ffn"), ("configs/vit/soft_moe.yaml", "--model.mlp")])
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
        fit(REPO / "configs/lm/top2.yaml", tmp_path / "cache", f"--ckpt_path={checkpoint}")


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


@pytest.mark.parametrize("main, command", [(cli.main, "python -m lm_moe"), (sample.main, "python -m lm_moe.sample")])
def test_help_names_the_command_to_type(capsys, main, command):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {command} ")


def test_print_config_shows_the_linked_and_ffn_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "-c", str(REPO / "configs/lm/top2.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lm_moe.layers.TopKMoE" in printed and "block_size: 128" in printed


def test_predict_writes_continuations_of_validation_prompts(trained_top2, monkeypatch):
    work, cache = trained_top2
    monkeypatch.chdir(work)
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
    monkeypatch.chdir(work)
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


@pytest.mark.parametrize("subcommand, key", [("validate", "val/loss"), ("test", "test/loss")])
def test_validate_and_test_a_checkpoint(trained_top2, monkeypatch, subcommand, key):
    work, _ = trained_top2
    monkeypatch.chdir(work)
    run_dir = work / "runs/top2/version_0"
    result = cli.main([subcommand, "-c", str(run_dir / "config.yaml"), f"--ckpt_path={run_dir}/checkpoints/last.ckpt"])
    loss = result.trainer.callback_metrics[key]
    assert torch.isfinite(loss) and result.trainer.callback_metrics[key.replace("loss", "ppl")] == pytest.approx(torch.exp(loss).item(), rel=1e-5)


def test_the_cli_called_from_code_ignores_the_callers_own_argv_without_warning(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr("sys.argv", ["some_script.py", "--its-own-flag"])
    built = cli.main(["-c", str(LM_CONFIGS[0]), *tiny_args(tmp_path)], run=False)
    assert built.model.model is not None
    assert not [w for w in recwarn if "LightningCLI's args parameter" in str(w.message)]


def test_mixture_of_tokens_evaluates_and_predicts_a_short_last_batch(tmp_path, monkeypatch):
    # Groups of 4 sequences: a last validation batch of 1-3 blocks fills its group with repeated
    # rows, whose outputs are dropped, instead of failing the run at its first validation.
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs/lm/mixture_of_tokens.yaml"
    run = fit(config, tmp_path / "cache", "--trainer.limit_val_batches=1.0", "--data.val_fraction=0.3", steps=2)
    blocks = len(run.datamodule.val_set)
    assert blocks % 4 != 0  # the case under test: a short last batch
    assert all(torch.isfinite(torch.tensor(scalars(Path(run.trainer.logger.log_dir))["val/loss"])))
    run_dir = Path(run.trainer.logger.log_dir)
    predicted = cli.main(["predict", "-c", str(run_dir / "config.yaml"), f"--ckpt_path={run_dir}/checkpoints/last.ckpt",
                          "--model.sampling.prompt_tokens=4", "--model.sampling.new_tokens=2"])
    records = (Path(predicted.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()
    assert len(records) == blocks


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"warmup_steps=2 is not shorter than the run's 2 steps.*never reaches"):
        fit(REPO / "configs/lm/dense.yaml", tmp_path / "cache", steps=2)


def test_unigram_baseline_is_measured_on_the_batches_val_loss_covers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fit(REPO / "configs/lm/dense.yaml", tmp_path / "cache", steps=2)  # validation: the first 2 batches of 4
    data = run.datamodule
    counts = torch.bincount(data.train_set.blocks[:, 1:].flatten().long(), minlength=data.vocab_size).double() + 1
    targets = data.val_set.blocks[:8, 1:].flatten().long()  # what val/loss was computed on
    expected = -torch.log(counts / counts.sum())[targets].mean().item()
    assert len(data.val_set) > 8  # the whole split would give another number
    logged = scalars(Path(run.trainer.logger.log_dir))["val/unigram_baseline"]
    assert logged == [pytest.approx(expected, rel=1e-6)]

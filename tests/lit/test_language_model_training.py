"""Language-model training through the CLI: every config fits, logs what TensorBoard should hold
(on the logging steps only), checkpoints, and learns."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_moe import cli, sample
from lm_moe.data.tokenizer import load_encoding
from lm_moe.layers import TopKMoE

from .lm_runs import LM_CONFIGS, REPO, TOP2, fit, scalars


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
    run = fit(TOP2, tmp_path / "cache", "--trainer.log_every_n_steps=2", steps=6)
    events = EventAccumulator(run.trainer.logger.log_dir, size_guidance={"histograms": 0})  # keep them all
    events.Reload()
    loss_steps = [event.step for event in events.Scalars("train/loss")]
    assert len(loss_steps) == 3  # every second step of six writes logs
    assert [event.step for event in events.Scalars("moe/block_1/router_entropy")] == loss_steps
    assert [event.step for event in events.Histograms("moe/block_1/tokens_per_expert")] == loss_steps
    assert len(computed) == 3 * 2  # two MoE blocks; validation and the other steps never compute them


def test_vocab_size_null_keeps_the_whole_encoding(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fit(REPO / "configs/lm/dense.yaml", tmp_path / "cache", "--data.vocab_size=null", "--model.n_layer=1", steps=1)
    assert run.model.model.vocab_size == run.datamodule.vocab_size == load_encoding("cl100k_base").vocab_size
    # The checkpoint rebuilds the whole encoding for sampling.
    texts = sample.sample(str(tmp_path / "runs/dense/version_0/checkpoints/last.ckpt"), prompt="x", max_new_tokens=2)
    assert len(texts) == 1 and texts[0].startswith("x")


def test_a_run_without_a_logger_trains_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit(REPO / "configs/lm/dense.yaml", tmp_path / "cache", "--trainer.logger=false", "--model.n_layer=1", steps=2)
    assert sorted(path.name for path in (tmp_path / "runs/checkpoints").iterdir()) == ["best-2.ckpt", "last.ckpt"]


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


def test_the_loss_free_bias_moves_once_per_optimizer_step_and_is_checkpointed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fit(REPO / "configs/lm/top2_loss_free.yaml", tmp_path / "cache", "--trainer.accumulate_grad_batches=2",
              "--model.ffn.init_args.bias_update_rate=0.01")
    assert run.trainer.global_step == 4  # 4 optimizer steps of 2 micro-batches each
    run_dir = Path(run.trainer.logger.log_dir)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    biases = torch.stack([state[f"model.blocks.{block}.ffn.expert_bias"] for block in (0, 1)])  # [2, E]
    steps = biases / 0.01  # each update moves an expert by +-0.01 (0 on a tie with the mean)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert steps.abs().max() <= 4 and steps.abs().sum() > 0  # at most one update per optimizer step
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert "moe/block_0/expert_bias_range" in events.Tags()["scalars"]
    assert "moe/block_0/expert_bias" in events.Tags()["histograms"]


def test_a_resumed_run_continues_the_loss_free_bias_it_saved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs/lm/top2_loss_free.yaml"
    rate = "--model.ffn.init_args.bias_update_rate=0.01"

    def biases(run) -> torch.Tensor:
        return torch.stack([block.ffn.expert_bias.clone() for block in run.model.model.blocks])  # [blocks, E]

    first = fit(config, tmp_path / "cache", rate, steps=8)
    saved = biases(first)
    checkpoint = Path(first.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    resumed = biases(fit(config, tmp_path / "cache", rate, "--ckpt_path", str(checkpoint), steps=9))
    # One more step moves each bias by at most 0.01 from the saved one; a bias started again from 0
    # would be 0.02 or more away from a saved 0.03.
    assert saved.abs().max() >= 0.03 - 1e-6
    assert (resumed - saved).abs().max() <= 0.01 + 1e-6

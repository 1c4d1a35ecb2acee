"""The ViT job end to end through the Lightning CLI, at toy sizes, offline on the default data."""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_moe import cli
from lm_moe.layers import SoftMoE

from .tiny_runs import REPO
from .vit_runs import QUICK_TRAINER, fit, tiny_args

VIT_CONFIGS = sorted((REPO / "configs" / "vit").glob("*.yaml"))


def build(config: Path, cache_dir: Path, *extra: str):
    """Model, data and trainer of a config, as `fit` would build them, without training."""
    return cli.main(["-c", str(config), *tiny_args(cache_dir), *extra], run=False)


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Path]:
    """Every ViT config trained for 4 steps once, in one work folder: config name -> run folder."""
    work = tmp_path_factory.mktemp("work")
    cache = tmp_path_factory.mktemp("cache")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        for config in VIT_CONFIGS:
            run = fit(config, cache)
            assert run.trainer.global_step == 4
            runs[config.stem] = Path(run.trainer.logger.log_dir).resolve()
    return runs


def test_configs_exist_and_name_the_vit_task():
    assert {path.stem for path in VIT_CONFIGS} == {"dense", "expert_choice", "soft_moe", "top2"}
    assert all(cli.task_of(["-c", str(path)]) == "vit" for path in VIT_CONFIGS)


@pytest.mark.parametrize("name", [path.stem for path in VIT_CONFIGS])
def test_every_vit_config_fits_a_few_steps_and_logs_to_tensorboard(fitted, name):
    run_dir = fitted[name]
    # runs/vit_<config name>/version_<n>: apart from the language model of the same config name
    assert run_dir.parent.name == f"vit_{name}"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    logged = events(run_dir)
    tags = logged.Tags()
    for tag in ("train/loss", "train/cross_entropy", "train/aux_loss", "train/acc_top1", "val/loss", "val/acc_top1",
                "val/acc_top5", "hp_metric", "perf/train_images_per_sec"):
        assert tag in tags["scalars"], tag
    accuracy = [event.value for event in logged.Scalars("val/acc_top1")]
    assert all(0.0 <= value <= 1.0 for value in accuracy)
    assert [event.value for event in logged.Scalars("hp_metric")][1:] == accuracy  # after Lightning's -1 placeholder
    assert "val/predictions" in tags["images"]  # the figure of predicted and true labels


def test_soft_moe_logs_dispatch_and_combine_entropy_and_slot_usage_per_layer(fitted):
    tags = events(fitted["soft_moe"]).Tags()
    for stat in ("dispatch_entropy", "combine_entropy", "slot_usage_max_min_ratio", "slot_usage_spread"):
        assert f"moe/block_1/{stat}" in tags["scalars"]
    assert "moe/block_1/slot_usage" in tags["histograms"]
    assert not any(tag.startswith("moe/block_0/") for tag in tags["scalars"])  # the first half stays dense


def test_top2_logs_tokens_per_expert_and_dropped_fraction(fitted):
    tags = events(fitted["top2"]).Tags()
    assert {"moe/block_1/dropped_fraction", "moe/block_1/tokens_per_expert_max_min_ratio"} <= set(tags["scalars"])
    assert "moe/block_1/tokens_per_expert" in tags["histograms"]


def test_test_subcommand_reports_loss_and_accuracy_of_a_checkpoint(fitted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = fitted["soft_moe"]
    result = cli.main(["test", "-c", str(run_dir / "config.yaml"), f"--ckpt_path={run_dir}/checkpoints/last.ckpt"])
    metrics = result.trainer.callback_metrics
    assert torch.isfinite(metrics["test/loss"]) and 0 <= metrics["test/acc_top1"] <= metrics["test/acc_top5"] <= 1


def test_predict_classifies_the_test_images_into_predictions_jsonl(fitted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = fitted["soft_moe"]
    result = cli.main(["predict", "-c", str(run_dir / "config.yaml"), f"--ckpt_path={run_dir}/checkpoints/last.ckpt",
                       "--trainer.limit_predict_batches=2"])
    data, classifier = result.datamodule, result.model.eval()
    records = [json.loads(line) for line in (Path(result.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    assert [record["index"] for record in records] == list(range(2 * data.batch_size))  # the first two batches
    images = torch.stack([data.test_set[i]["images"] for i in range(len(records))])  # [n, C, S, S]
    with torch.no_grad():
        probabilities = classifier(images).logits.float().softmax(dim=-1)  # [n, K]
    for record, image_probabilities, label in zip(records, probabilities, data.test_set.labels):
        assert record["true"] == data.class_names[label]
        top = image_probabilities.topk(5)
        assert [name for name, _ in record["top_classes"]] == [data.class_names[c] for c in top.indices]
        assert [p for _, p in record["top_classes"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert record["predicted"] == record["top_classes"][0][0]


def test_checkpoint_of_another_architecture_is_refused(fitted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = fitted["dense"] / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="different architecture"):
        cli.main(["validate", "-c", str(REPO / "configs/vit/soft_moe.yaml"), *tiny_args(tmp_path / "cache"), f"--ckpt_path={checkpoint}"])


def test_data_links_classes_size_and_channels_into_the_model(tmp_path):
    built = build(REPO / "configs/vit/soft_moe.yaml", tmp_path)
    model = built.model.model
    assert (model.num_classes, model.image_size, model.channels) == (10, 28, 1)
    assert model.moe_indices == {1}  # second half of 2 blocks


def test_without_a_trainer_preset_a_vit_config_trains_30_epochs_and_a_preset_caps_the_steps(tmp_path):
    config = REPO / "configs/vit/soft_moe.yaml"
    bare = cli.main(["-c", str(config), f"--data.cache_dir={tmp_path}"], run=False).trainer
    assert (bare.max_epochs, bare.max_steps) == (30, -1)
    with_preset = cli.main(["-c", str(config), "-c", str(QUICK_TRAINER), f"--data.cache_dir={tmp_path}"], run=False).trainer
    assert with_preset.max_steps == 600


def test_experts_and_slots_sweep_from_the_command_line(tmp_path):
    built = build(REPO / "configs/vit/soft_moe.yaml", tmp_path,
                  "--model.ffn.init_args.num_experts=16", "--model.ffn.init_args.slots_per_expert=2")
    layer = built.model.model.blocks[1].mlp
    assert isinstance(layer, SoftMoE) and (layer.num_experts, layer.slots_per_expert) == (16, 2)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["--data.image_size=30"], ValueError, "image_size 30 is not divisible by patch_size 7"),
        (["--model.ffn.init_args.num_experts=0"], ValueError, "num_experts must be a positive integer, got 0"),
        (["--model.ffn.init_args.slots_per_expert=0"], ValueError, "slots_per_expert must be a positive integer, got 0"),
        (["--data.channels=3"], ValueError, "is grayscale .* but channels=3"),
        (["--data.label_column=digit"], ValueError, "label_column 'digit' is not in"),
        (["--model.label_smoothing=1.0"], ValueError, r"label_smoothing must be a number in \[0, 1\), got 1.0"),
        (["--data.dataset=no-such/dataset"], FileNotFoundError, "could not load dataset 'no-such/dataset'"),
    ],
)
def test_bad_settings_fail_before_training_with_a_clear_error(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        build(REPO / "configs/vit/soft_moe.yaml", tmp_path, *overrides)


def test_accuracy_on_the_offline_default_rises_well_above_chance(tmp_path, monkeypatch):
    """100 steps of a toy ViT (a Soft MoE of 8 experts in its second block) on the real digits.
    Augmentation is off: it slows a run this short (measured: 73% after 100 steps)."""
    monkeypatch.chdir(tmp_path)
    run = fit(REPO / "configs/vit/soft_moe.yaml", tmp_path / "cache", "--data.batch_size=64", "--data.crop_padding=0",
              "--model.ffn.init_args.num_experts=8", "--model.ffn.init_args.hidden_dim=64", "--model.learning_rate=0.003",
              "--model.warmup_steps=10", "--trainer.val_check_interval=100", "--trainer.limit_val_batches=null", steps=100)
    accuracy = run.trainer.callback_metrics["val/acc_top1"].item()
    assert accuracy > 0.5, accuracy  # chance: 0.1

"""A ViT's checkpoint, export folder and run config.yaml that name its FFN setting `mlp` (as lm_moe
wrote them while the ViT's setting had that name) load as the current ones, the setting read as `ffn`.

vit_saved_with_mlp/ holds such files from a 2-step run of that lm_moe (the paths in them made neutral):
    python -m lm_moe fit -c configs/vit/soft_moe.yaml --model.depth=2 --model.dim=8 --model.n_head=2
        --model.patch_size=7 --model.dense_hidden_dim=16 --model.mlp.init_args.num_experts=2
        --model.mlp.init_args.hidden_dim=8 --model.warmup_steps=1 --data.batch_size=8 --trainer.max_steps=2
        --trainer.limit_val_batches=1 --trainer.val_check_interval=2 --trainer.logger.init_args.name=old_vit
    python -m lm_moe.export runs/old_vit/version_0/checkpoints/last.ckpt export
"""

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lm_moe import cli, export
from lm_moe.lit.checkpoints import read_checkpoint, setting_differences, with_current_setting_names
from lm_moe.lit.trained_model import load_trained_module, read_trained

SAVED = Path(__file__).parent / "vit_saved_with_mlp"
CHECKPOINT = SAVED / "last.ckpt"


def test_former_names_are_read_as_the_current_ones_and_others_left_alone():
    assert list(with_current_setting_names({"dim": 8, "mlp": None, "pool": "mean"})) == ["dim", "ffn", "pool"]
    assert with_current_setting_names({"mlp": 1, "ffn": 2}) == {"mlp": 1, "ffn": 2}  # for the parser to refuse
    assert with_current_setting_names({"ffn": None, "n_layer": 2}) == {"ffn": None, "n_layer": 2}


def test_the_checkpoint_and_its_export_give_the_same_model_with_the_setting_named_ffn():
    assert "mlp" in torch.load(CHECKPOINT, weights_only=True)["hyper_parameters"]  # what the file holds
    settings = read_checkpoint(CHECKPOINT)["hyper_parameters"]
    assert "mlp" not in settings and settings["ffn"]["class_path"] == "lm_moe.layers.SoftMoE"
    assert read_trained(SAVED / "export").model_settings["ffn"] == settings["ffn"]
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        logits = [load_trained_module(path).model(images).logits for path in (CHECKPOINT, SAVED / "export")]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_exporting_the_checkpoint_writes_the_current_name(tmp_path):
    export.main([str(CHECKPOINT), str(tmp_path / "export")])
    model = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())["model"]
    assert "mlp" not in model and model["ffn"]["init_args"]["num_experts"] == 2


def test_the_cli_evaluates_the_checkpoint_with_its_run_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["validate", "-c", str(SAVED / "config.yaml"), f"--ckpt_path={CHECKPOINT}", f"--data.cache_dir={tmp_path}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the checkpoint was trained with other settings")
        result = cli.main(args)
    assert result.model.hparams["ffn"]["class_path"] == "lm_moe.layers.SoftMoE" and "mlp" not in result.model.hparams
    assert torch.isfinite(result.trainer.callback_metrics["val/loss"])


def test_a_language_model_config_has_no_former_name_to_read(tmp_path):
    config = tmp_path / "lm.yaml"
    config.write_text("model:\n  mlp: null\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code == 2


def test_a_setting_added_after_the_checkpoint_was_saved_is_not_judged():
    saved = {"ffn": {"init_args": {"hidden_dim": 784}}, "dim": 128}
    current = {"ffn": {"init_args": {"hidden_dim": 784, "expert_dropout": 0.0, "logit_scale_init": None}}, "dim": 128}
    assert setting_differences(saved, current, "model") == []
    current["ffn"]["init_args"]["hidden_dim"] = 392
    assert setting_differences(saved, current, "model") == ["model.ffn.init_args.hidden_dim: 784 in the checkpoint, 392 now"]
    assert setting_differences({"dim": 128, "pool": "cls"}, {"dim": 128}, "model") == [
        "model.pool: 'cls' in the checkpoint, None now"]  # a setting gone since is still named

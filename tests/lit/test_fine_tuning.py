"""Fine-tuning: a new run from trained weights (model.init_from), parts frozen (model.freeze) or at
their own learning rate (model.lr_scale), and the errors before any data work."""

import re
import shutil

import pytest
import torch

from lm_moe import cli
from lm_moe.lit.checkpoints import read_checkpoint
from lm_moe.lit.fine_tuning import PART_NAMES, learning_rate_scales, parameter_parts
from lm_moe.lit.optim import adamw_param_groups
from lm_moe.profiling.models import build_from_config

from .lm_runs import REPO, TOP2, fit, tiny_args
from .tiny_runs import WeightsAtStart

DENSE = REPO / "configs/lm/dense.yaml"


@pytest.mark.parametrize("config, parts", [
    ("lm/dense", {"dense_ffn", "attention", "embeddings", "norms"}),
    ("lm/top2", {"experts", "router", "attention", "embeddings", "norms"}),
    ("lm/fine_grained", {"experts", "router", "shared_experts", "attention", "embeddings", "norms"}),
    ("lm/lagged_chunk", {"experts", "router", "shared_experts", "attention", "embeddings", "norms"}),
    ("vit/soft_moe", {"experts", "router", "dense_ffn", "attention", "embeddings", "norms", "head"}),
])
def test_every_parameter_belongs_to_one_named_part(config, parts):
    model = build_from_config(REPO / f"configs/{config}.yaml")
    found = parameter_parts(model)
    assert set(found) == {name for name, _ in model.named_parameters()}
    assert set(found.values()) == parts
    if config == "lm/top2":
        assert found["blocks.0.ffn.experts.w_in"] == "experts" and found["blocks.0.ffn.router.weight"] == "router"
        assert found["blocks.0.attn.qkv.weight"] == "attention" and found["wte.weight"] == "embeddings"
    if config == "vit/soft_moe":
        assert found["blocks.5.mlp.slot_embeddings"] == "router" and found["head.weight"] == "head"
        assert found["patch_embed.weight"] == "embeddings" and found["blocks.0.mlp.expert.w_in"] == "dense_ffn"


def test_lr_scale_groups_the_scaled_parts_at_their_rate():
    model = build_from_config(TOP2)
    scales = learning_rate_scales(model, {"experts": 2.0, "attention": 0.5})
    groups = {group["name"]: group for group in adamw_param_groups(model, 0.1, 1e-3, scales)}
    assert set(groups) == {"decay", "no_decay", "decay_lr_x2", "decay_lr_x0.5"}
    assert groups["decay_lr_x2"]["lr"] == pytest.approx(2e-3) and groups["decay_lr_x0.5"]["lr"] == pytest.approx(5e-4)
    experts = {id(p) for name, p in model.named_parameters() if ".experts." in name}
    assert {id(p) for p in groups["decay_lr_x2"]["params"]} == experts
    with pytest.raises(ValueError, match="'non_moe' and 'attention' both cover blocks.0.attn"):
        learning_rate_scales(model, {"non_moe": 2.0, "attention": 0.5})


@pytest.mark.parametrize("flags, error, message", [
    (["--model.freeze=[expert]"], ValueError, "freeze: unknown part 'expert'; the parts are " + ", ".join(PART_NAMES)),
    (["--model.freeze=[router]"], ValueError, "freeze: this model has no router parameters"),
    (["--model.freeze=[non_moe]"], ValueError, "freeze: non_moe covers every parameter: nothing would train"),
    (["--model.lr_scale={experts: 2}"], ValueError, "lr_scale: this model has no experts parameters"),
    (["--model.lr_scale={attention: -1}"], ValueError, "lr_scale: attention: the scale must be a positive number, got -1"),
    (["--model.init_from=nowhere.ckpt"], FileNotFoundError, "nowhere.ckpt"),
    (["--model.upcycle_noise=-0.5"], ValueError, "upcycle_noise must be a number >= 0, got -0.5"),
])
def test_bad_fine_tuning_settings_are_refused_before_any_data_work(flags, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=re.escape(message)):
        cli.main(["fit", "-c", str(DENSE), *tiny_args(tmp_path / "cache"), *flags])
    assert not (tmp_path / "cache").exists()  # no data prepared


def test_init_from_starts_a_new_run_from_the_weights_and_freezes_parts(trained_top2, tmp_path, monkeypatch):
    work, cache = trained_top2
    source = work / "runs/top2/version_0/checkpoints/last.ckpt"
    trained = read_checkpoint(source)
    assert trained["global_step"] == 4
    monkeypatch.chdir(tmp_path)
    run = fit(TOP2, cache, f"--model.init_from={source}", "--model.freeze=[experts]", "--model.lr_scale={router: 2}",
              "--model.ffn.init_args.load_balance_weight=0", "--trainer.callbacks+=tests.lit.tiny_runs.WeightsAtStart",
              steps=3)
    (start,) = [callback for callback in run.trainer.callbacks if isinstance(callback, WeightsAtStart)]
    # Bit-exact weights, a fresh step count and optimizer.
    for name, tensor in start.weights.items():
        assert torch.equal(tensor, trained["state_dict"][f"model.{name}"]), name
    assert start.step == 0 and start.optimizer_entries == 0
    assert run.trainer.global_step == 3
    # The frozen experts did not move and hold no optimizer state; everything else trained.
    final = run.model.model.state_dict()
    for name, tensor in final.items():
        moved = not torch.equal(tensor, start.weights[name])
        assert moved == (".experts." not in name and "expert_bias" not in name), name
    optimizer = run.trainer.optimizers[0]
    with_state = {id(p) for p in optimizer.state}
    assert not with_state & {id(p) for name, p in run.model.model.named_parameters() if ".experts." in name}
    rates = {group["name"]: group["initial_lr"] for group in optimizer.param_groups}
    assert rates["decay_lr_x2"] == pytest.approx(2 * rates["decay"])
    assert run.model.hparams.ffn["init_args"]["load_balance_weight"] == 0  # the new run's switch applies


def test_init_from_refuses_a_checkpoint_of_another_shape_listing_the_tensors(trained_top2, tmp_path, monkeypatch):
    work, cache = trained_top2
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"model.init_from .*last.ckpt: .*missing: blocks.0.ffn.expert.w_in"):
        fit(DENSE, cache, f"--model.init_from={work / 'runs/top2/version_0/checkpoints/last.ckpt'}")
    assert not (tmp_path / "runs").exists()


def test_ckpt_path_resumes_a_fine_tuning_run_without_reloading_init_from(trained_top2, tmp_path, monkeypatch):
    work, cache = trained_top2
    source = tmp_path / "source.ckpt"
    shutil.copy(work / "runs/top2/version_0/checkpoints/last.ckpt", source)
    monkeypatch.chdir(tmp_path)
    fit(TOP2, cache, f"--model.init_from={source}", steps=2)
    source.unlink()  # resuming does not need it
    resumed = fit(TOP2, cache, f"--model.init_from={source}", "--ckpt_path=last", steps=4)
    assert resumed.trainer.global_step == 4


def test_a_vit_fine_tuned_on_other_classes_keeps_its_body_and_starts_a_new_head(tmp_path, monkeypatch):
    from tests.test_image_data import make_image_folder

    from .vit_runs import fit as fit_vit

    monkeypatch.chdir(tmp_path)
    config = REPO / "configs/vit/soft_moe.yaml"
    fit_vit(config, tmp_path / "cache", steps=2)
    source = tmp_path / "runs/vit_soft_moe/version_0/checkpoints/last.ckpt"
    trained = read_checkpoint(source)["state_dict"]
    folder = make_image_folder(tmp_path / "images", classes=("cat", "dog", "owl"), mode="L", sizes=((28, 28),))
    with pytest.warns(UserWarning, match=r"classifies 10 classes, this run 3: the classifier head .* starts afresh"):
        run = fit_vit(config, tmp_path / "cache", f"--model.init_from={source}", f"--data.data_dir={folder}",
                      "--data.batch_size=4", "--data.val_fraction=0.25", "--model.freeze=[non_moe]",
                      "--trainer.callbacks+=tests.lit.tiny_runs.WeightsAtStart", steps=1)
    (start,) = [callback for callback in run.trainer.callbacks if isinstance(callback, WeightsAtStart)]
    assert start.weights["head.weight"].shape == (3, 32)
    for name, tensor in start.weights.items():
        if not name.startswith("head."):
            assert torch.equal(tensor, trained[f"model.{name}"]), name

    # An image classifier's weights are refused by a language model, before any data work.
    with pytest.raises(ValueError, match=r"an image classifier.*language model|language model.*image classifier"):
        fit(DENSE, tmp_path / "lm_cache", f"--model.init_from={source}")
    assert not (tmp_path / "lm_cache").exists()

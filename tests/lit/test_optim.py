"""The optimizer: fused AdamW where no GradScaler steps it, and gradient clipping with it."""

from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from lm_moe.layers import CumulativeSoftMoE, LaggedChunkSoftMoE, MixtureOfTokens, SoftMoE
from lm_moe.lit.image_classifier import ImageClassifier
from lm_moe.lit.language_model import LanguageModel
from lm_moe.lit.optim import adamw_param_groups, build_adamw_with_schedule, check_adamw_settings, uses_grad_scaler

# warmup_steps=1: the schedule starts at the full learning rate, as the reference runs.
SETTINGS = dict(learning_rate=1e-2, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=1, total_steps=10, min_lr_ratio=0.1)


def model_with_gradients(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    return model


def test_fused_adamw_steps_like_the_reference_adamw():
    fused_model, reference_model = model_with_gradients(), model_with_gradients()
    fused = build_adamw_with_schedule(fused_model, **SETTINGS)["optimizer"]
    reference = torch.optim.AdamW(adamw_param_groups(reference_model, 0.1, 1e-2), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        fused.step()
        reference.step()
    for ours, theirs in zip(fused_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_bf16_mixed_precision_clips_the_fused_optimizer_s_gradients():
    # Lightning refuses to clip for optimizers that unscale inside their step; on GPUs, where the
    # fused kernel always ran, every bf16 preset with gradient clipping stopped at the first step.
    model = model_with_gradients()
    optimizer = build_adamw_with_schedule(model, **SETTINGS)["optimizer"]
    MixedPrecision("bf16-mixed", "cpu").clip_gradients(optimizer, clip_val=1.0)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm.item() == pytest.approx(1.0, rel=1e-5)


def test_under_a_grad_scaler_the_foreach_path_runs():
    optimizer = build_adamw_with_schedule(model_with_gradients(), **SETTINGS, grad_scaler=True)["optimizer"]
    assert not optimizer.defaults["fused"]
    assert not getattr(optimizer, "_step_supports_amp_scaling", False)  # Lightning unscales before clipping


def test_uses_grad_scaler_reads_the_precision_plugin():
    scaled = MixedPrecision("16-mixed", "cuda", scaler=torch.amp.GradScaler("cpu"))
    assert uses_grad_scaler(SimpleNamespace(precision_plugin=scaled))
    assert not uses_grad_scaler(SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu")))


GOOD_SETTINGS = dict(learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=100, min_lr_ratio=0.1)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"learning_rate": 0.0}, "learning_rate must be a positive number, got 0.0"),
        ({"learning_rate": float("nan")}, r"learning_rate must be a finite number \(a positive number\), got nan"),
        ({"learning_rate": float("inf")}, r"learning_rate must be a finite number \(a positive number\), got inf"),
        ({"weight_decay": float("inf")}, r"weight_decay must be a finite number \(a number >= 0\), got inf"),
        ({"weight_decay": -0.1}, "weight_decay must be a number >= 0, got -0.1"),
        ({"betas": (1.0, 0.95)}, r"betas\[0\] must be a number in \[0, 1\), got 1.0"),
        ({"betas": (0.9, -0.5)}, r"betas\[1\] must be a number in \[0, 1\), got -0.5"),
        ({"betas": (0.9,)}, r"betas must be a pair of numbers in \[0, 1\), got \(0.9,\)"),
        ({"betas": "0.9"}, "betas must be a pair"),
        ({"warmup_steps": -3}, "warmup_steps must be an integer >= 0, got -3"),
        ({"warmup_steps": 2.5}, "warmup_steps must be an integer >= 0, got 2.5"),
        ({"min_lr_ratio": 2}, r"min_lr_ratio must be a number in \[0, 1\], got 2"),
        ({"min_lr_ratio": -0.1}, r"min_lr_ratio must be a number in \[0, 1\], got -0.1"),
    ],
)
def test_bad_optimizer_settings_are_refused_by_name(setting, message):
    with pytest.raises(ValueError, match=message):
        check_adamw_settings(**{**GOOD_SETTINGS, **setting})


def test_the_ends_of_the_allowed_ranges_are_accepted():
    check_adamw_settings(learning_rate=1e-3, weight_decay=0.0, betas=[0.0, 0.0], warmup_steps=0, min_lr_ratio=1.0)
    check_adamw_settings(learning_rate=1e-3, weight_decay=0.0, betas=(0.9, 0.999), warmup_steps=0, min_lr_ratio=0.0)


@pytest.mark.parametrize(
    "module",
    [
        lambda **bad: LanguageModel(vocab_size=64, block_size=8, n_layer=1, n_head=1, dim=8, **bad),
        lambda **bad: ImageClassifier(num_classes=3, image_size=8, channels=1, patch_size=4, depth=1, n_head=1, dim=8, **bad),
    ],
    ids=["LanguageModel", "ImageClassifier"],
)
def test_both_lightning_modules_check_their_optimizer_settings_when_built(module):
    module()  # the same small module with good settings builds
    with pytest.raises(ValueError, match=r"min_lr_ratio must be a number in \[0, 1\], got 2"):
        module(min_lr_ratio=2)


def test_weight_decay_groups_are_named_and_spare_norms_biases_and_embeddings():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    decay, no_decay = adamw_param_groups(model, 0.1, 1e-3)
    assert (decay["name"], decay["weight_decay"], no_decay["name"], no_decay["weight_decay"]) == ("decay", 0.1, "no_decay", 0.0)
    assert [p.shape for p in decay["params"]] == [(8, 8)]  # the linear weight alone
    assert sorted(p.numel() for p in no_decay["params"]) == [8, 8, 8, 80]  # bias, norm weight and bias, embedding


def test_soft_moe_slot_embeddings_and_null_outputs_are_not_decayed():
    layers = nn.ModuleList([
        SoftMoE(8, 16, 2),
        CumulativeSoftMoE(8, 16, 2),
        LaggedChunkSoftMoE(8, 16, 2, chunk_size=4),
        MixtureOfTokens(8, 16, 2, group_size=2),
    ])
    decay, no_decay = adamw_param_groups(layers, 0.1, 1e-3)
    exempt = {id(layer.slot_embeddings) for layer in layers} | {id(layers[2].null_outputs)}
    assert exempt <= {id(p) for p in no_decay["params"]}
    # Everything else of two or more dimensions is decayed: the stacked expert (and shared expert) weights.
    experts = {id(p) for name, p in layers.named_parameters() if name.endswith(("w_in", "w_out"))}
    assert {id(p) for p in decay["params"]} == experts

"""The optimizer: fused AdamW where no GradScaler steps it, and gradient clipping with it."""

from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from lm_moe.lit.optim import adamw_param_groups, build_adamw_with_schedule, uses_grad_scaler

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
    reference = torch.optim.AdamW(adamw_param_groups(reference_model, 0.1), lr=1e-2, betas=(0.9, 0.95), foreach=False)
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

"""Every MoE layer defers its logging stats to their first read, and they do not change after it."""

import pytest
import torch

from lm_moe.layers.layer_output import DeferredStats, deferred_stats

from .layer_registry import DIM, LAYERS, variant_params

WITH_STATS = variant_params(lambda layer: hasattr(layer, "_stats"))  # every variant of the MoE layers


def test_computed_once_on_first_read_without_gradients():
    calls = []

    def compute(x):
        calls.append(torch.is_grad_enabled())
        return {"mean": x.mean()}

    x = torch.randn(4, requires_grad=True)
    stats = deferred_stats(compute, x)
    assert isinstance(stats, DeferredStats) and bool(stats) and calls == []  # asking for bool does not compute
    assert stats["mean"].item() == pytest.approx(x.mean().item())
    assert dict(stats) == {"mean": stats["mean"]} and len(stats) == 1
    assert calls == [False]  # once, under no_grad
    assert not stats["mean"].requires_grad


@pytest.mark.parametrize("name, overrides", WITH_STATS)
def test_layer_stats_are_deferred(name, overrides, monkeypatch):
    torch.manual_seed(0)
    layer = LAYERS[name].build(torch.float32, **overrides)
    calls = []
    compute = layer._stats
    monkeypatch.setattr(layer, "_stats", lambda *args: calls.append(1) or compute(*args))
    y, aux = layer(torch.randn(2, 8, DIM))
    (y.square().mean() + aux.loss).backward()
    assert calls == []  # a training step that does not log pays nothing for the stats
    assert all(torch.isfinite(value).all() and not value.requires_grad for value in aux.stats.values())
    assert calls == [1]


@pytest.mark.parametrize("name, overrides", WITH_STATS)
def test_stats_read_after_an_optimizer_step_describe_the_forward(name, overrides):
    torch.manual_seed(0)
    layer = LAYERS[name].build(torch.float32, **overrides)
    x = torch.randn(2, 8, DIM)
    _, read_at_once = layer(x)
    read_at_once = {key: value.clone() for key, value in read_at_once.stats.items()}

    y, aux = layer(x)
    (y.square().mean() + aux.loss).backward()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(1.0)  # a large optimizer step, scales included
    for key, value in read_at_once.items():
        torch.testing.assert_close(aux.stats[key], value, msg=key)

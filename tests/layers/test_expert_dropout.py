"""expert_dropout: every MoE layer drops its experts' hidden activations in training, and only then."""

import pytest
import torch

from .layer_registry import LAYERS

MOE_LAYERS = [name for name in LAYERS if name != "dense"]


def inputs(name: str) -> torch.Tensor:
    entry = LAYERS[name]
    return torch.randn(2 * entry.batch_multiple, entry.length, entry.arguments["dim"], dtype=torch.float64)


@pytest.mark.parametrize("name", MOE_LAYERS)
def test_expert_dropout_acts_in_training_only(name):
    torch.manual_seed(0)
    plain = LAYERS[name].build()
    torch.manual_seed(0)
    dropping = LAYERS[name].build(expert_dropout=0.5)
    x = inputs(name)
    dropping.eval()
    plain.eval()
    torch.testing.assert_close(dropping(x)[0], plain(x)[0], rtol=0, atol=0)
    dropping.train()
    plain.train()
    assert not torch.allclose(dropping(x)[0], plain(x)[0])
    assert not torch.allclose(dropping(x)[0], dropping(x)[0])  # a new draw each call


@pytest.mark.parametrize("name", MOE_LAYERS)
def test_expert_dropout_must_be_a_fraction(name):
    with pytest.raises(ValueError, match=r"expert_dropout must be a number in \[0, 1\), got 1.0"):
        LAYERS[name].build(expert_dropout=1.0)

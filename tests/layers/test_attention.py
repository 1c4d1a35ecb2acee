"""Both attention layers refuse a dropout outside [0, 1) themselves, not only through the models."""

import pytest

from lm_moe.layers.attention import CausalSelfAttention
from lm_moe.layers.encoder_attention import EncoderSelfAttention


@pytest.mark.parametrize("attention", [CausalSelfAttention, EncoderSelfAttention])
@pytest.mark.parametrize("dropout", [1.0, -0.1, True, "0.1"])
def test_dropout_outside_the_unit_interval_names_the_argument(attention, dropout):
    with pytest.raises(ValueError, match=rf"dropout must be a number in \[0, 1\), got {dropout!r}"):
        attention(8, 2, dropout=dropout)


@pytest.mark.parametrize("attention", [CausalSelfAttention, EncoderSelfAttention])
def test_dropout_in_the_unit_interval_is_kept(attention):
    assert attention(8, 2, dropout=0.25).dropout == 0.25

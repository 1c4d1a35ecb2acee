"""Every built-in layer (layer_registry.py) keeps the layer contract of `FeedForwardLayer`: it
refuses bad arguments and bad input by name, outputs 0 at padding that takes no part in the real
outputs, ignores its batch-mates where it declares so, decodes in any pieces as its forward pass
computes, runs under bf16 autocast close to fp32, and declares its structure, counts and cost."""

import pytest
import torch

from lm_moe import layers
from lm_moe.causality import LayerSubject

from .layer_checks import decode_in_pieces
from .layer_registry import DIM, LAYERS, variant_params


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_is_a_feed_forward_layer(name):
    assert isinstance(LAYERS[name].build(), layers.FeedForwardLayer)


@pytest.mark.parametrize("name", LAYERS)
def test_every_parameter_of_every_layer_is_in_one_part(name):
    layer = LAYERS[name].build()
    parts = layer.parameter_parts()
    assert set(parts) == {parameter_name for parameter_name, _ in layer.named_parameters()}
    expected = {"dense_ffn"} if isinstance(layer, layers.DenseFFN) else {"experts", "router", "shared_experts"}
    assert set(parts.values()) <= expected
    if not isinstance(layer, layers.DenseFFN):
        assert "experts" in parts.values()


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        pytest.param(name, overrides, message, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in overrides.items())}")
        for name, entry in LAYERS.items()
        for overrides, message in entry.bad_arguments
    ],
)
def test_bad_arguments_name_the_argument(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        LAYERS[name].build(**overrides)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize(
    "shape, mask, message",
    [
        ((2, 5), None, rf"x must be \[batch, tokens, dim\] with dim={DIM}, got shape \(2, 5\)"),
        ((2, 5, 6), None, rf"with dim={DIM}, got shape \(2, 5, 6\)"),
        ((2, 0, DIM), None, rf"x must hold at least one sequence of at least one token, got shape \(2, 0, {DIM}\)"),
        ((0, 5, DIM), None, rf"at least one sequence .*got shape \(0, 5, {DIM}\)"),
        ((2, 5, DIM), torch.ones(2, 5), r"mask must be a bool tensor of shape .* = \(2, 5\).*got torch.float32 of shape \(2, 5\)"),
        ((2, 5, DIM), torch.ones(2, 4, dtype=torch.bool), r"got torch.bool of shape \(2, 4\)"),
    ],
)
def test_bad_input_or_mask_is_refused_by_shape_and_dtype(name, shape, mask, message):
    with pytest.raises(ValueError, match=message):
        LAYERS[name].build(torch.float32)(torch.randn(*shape), mask)


@pytest.mark.parametrize("name, overrides", variant_params())
def test_padding_outputs_zero_and_takes_no_part_in_the_real_outputs(name, overrides):
    """Row 0 is real up to the entry's valid length, the last row all padding (a fully padded row
    must not give NaN), the rows between real; whole groups of rows for a layer that mixes them."""
    entry = LAYERS[name]
    layer = entry.build(**overrides)
    group = layer.batch_multiple
    x = randn(3 * group, entry.length, DIM)
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    mask[0, entry.valid_length :] = False
    mask[-1] = False
    y, aux = layer(x, mask)
    assert y[~mask].abs().max() == 0
    assert (y[:-1].abs().amax(dim=(1, 2)) > 0).all()  # not vacuous: every row with real tokens has outputs
    assert all(torch.isfinite(value).all() for value in aux.stats.values())
    # Row 0's real outputs are those of its real tokens alone (beside its group, cut as short).
    short, _ = layer(x[:group, : entry.valid_length])
    torch.testing.assert_close(y[0, : entry.valid_length], short[0], rtol=0, atol=1e-12)
    # Whatever the padding holds, no output changes.
    garbage = torch.where(mask.unsqueeze(-1), x, 100 * randn(*x.shape))
    torch.testing.assert_close(layer(garbage, mask)[0], y, rtol=0, atol=1e-12)
    if layer.is_causal and layer.per_example_deterministic:
        # Padding at the end of a row is its future: the real outputs are those without the mask.
        # (A layer that mixes rows gives the batch-mates other outputs there: the padding leaves their mix.)
        unmasked, _ = layer(x)
        torch.testing.assert_close(y[mask], unmasked[mask], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, overrides", variant_params(lambda layer: layer.per_example_deterministic))
def test_a_row_ignores_its_batch_mates(name, overrides):
    """Every row gives the output it gives alone, and again beside loud strangers."""
    layer = LAYERS[name].build(**overrides)
    x = randn(4, LAYERS[name].length, DIM)
    in_batch, _ = layer(x)
    for row in range(x.shape[0]):
        alone, _ = layer(x[row : row + 1])
        torch.testing.assert_close(in_batch[row : row + 1], alone, rtol=0, atol=1e-13)
    beside_strangers, _ = layer(torch.cat([10 * torch.randn_like(x), x]))
    torch.testing.assert_close(beside_strangers[x.shape[0] :], in_batch, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "name, overrides, pieces",
    [
        pytest.param(*case.values, list(pieces), id=f"{case.id}-{'_'.join(map(str, pieces)) or 'token_by_token'}")
        for case in variant_params(lambda layer: layer.is_causal)
        for pieces in LAYERS[case.values[0]].decode_pieces
    ],
)
def test_decoding_in_pieces_equals_the_full_forward(name, overrides, pieces):
    layer = LAYERS[name].build(**overrides)
    x = randn(2 * layer.batch_multiple, LAYERS[name].length, DIM)
    full, _ = layer(x)
    decoded, _ = decode_in_pieces(layer, x, pieces)
    torch.testing.assert_close(decoded, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name, overrides", variant_params())
def test_bf16_autocast_trains_close_to_fp32(name, overrides):
    """Forward and backward under CPU bf16 autocast: the output is bf16 and close to fp32's, the
    aux loss fp32, the gradients finite and those of the (fp32) parameters fp32."""
    layer = LAYERS[name].build(torch.float32, **overrides)
    x = torch.randn(2 * layer.batch_multiple, LAYERS[name].length, DIM, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
        y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16 and aux.loss.dtype == torch.float32
    assert torch.isfinite(x.grad).all()
    grads = [parameter.grad for parameter in layer.parameters() if parameter.grad is not None]
    assert grads and all(grad.dtype == torch.float32 and torch.isfinite(grad).all() for grad in grads)
    y32, _ = layer(x)
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", LAYERS)
def test_layers_declare_their_structure_and_batch_multiple(name):
    entry = LAYERS[name]
    layer = entry.build()
    assert layer.structure_lengths == entry.structure_lengths and layer.batch_multiple == entry.batch_multiple
    subject = LayerSubject(layer, DIM)  # what the leakage suite probes
    assert subject.boundaries == set(entry.structure_lengths) and subject.batch_multiple == entry.batch_multiple


@pytest.mark.parametrize("name", LAYERS)
def test_layers_declare_their_counts_by_an_integer_dtype(name):
    entry = LAYERS[name]
    _, aux = entry.build()(randn(entry.batch_multiple, 6, DIM))
    assert {key for key, value in aux.stats.items() if not value.is_floating_point()} == entry.count_stats


@pytest.mark.parametrize("name", LAYERS)
def test_layers_declare_their_cost(name):
    entry = LAYERS[name]
    layer = entry.build()
    if entry.parameter_macs is None:
        with pytest.raises(NotImplementedError):
            layer.parameter_macs_per_token()
    else:
        assert layer.parameter_macs_per_token() == pytest.approx(entry.parameter_macs)

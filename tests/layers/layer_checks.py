"""Checks that the tests of several layers share: agreement with a reference, decoding in pieces,
batch-mates and padding. Layers run in float64, so the tolerances are tight."""

import torch


def assert_matches_reference(y: torch.Tensor, expected: torch.Tensor, params: list[torch.Tensor], atol: float):
    """The layer's output y and the reference's `expected` agree, and so do their gradients with
    respect to `params` through a loss that weighs every element differently. A parameter that one
    side never reaches must get a zero gradient from the other."""
    torch.testing.assert_close(y, expected, rtol=0, atol=atol)
    grads = torch.autograd.grad((y * torch.sin(y)).sum(), params, materialize_grads=True)
    ref_grads = torch.autograd.grad((expected * torch.sin(expected)).sum(), params, materialize_grads=True)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def decode_in_pieces(layer, x: torch.Tensor, pieces: list[int]) -> tuple[torch.Tensor, list]:
    """Decode x [B, T, D] in pieces of the given lengths, then one token at a time up to T.
    Returns the outputs joined [B, T, D] and the decoding state after each call."""
    outputs, states, state, start = [], [], None, 0
    with torch.inference_mode():
        for length in pieces + [1] * (x.shape[1] - sum(pieces)):
            y, state = layer.decode(x[:, start : start + length], state)
            outputs.append(y)
            states.append(state)
            start += length
    return torch.cat(outputs, dim=1), states


def assert_ignores_batch_mates(layer, x: torch.Tensor) -> None:
    """Every row of x [B, T, D] gives the output it gives alone, and again beside loud strangers."""
    in_batch, _ = layer(x)
    for row in range(x.shape[0]):
        alone, _ = layer(x[row : row + 1])
        torch.testing.assert_close(in_batch[row : row + 1], alone, rtol=0, atol=1e-13)
    beside_strangers, _ = layer(torch.cat([10 * torch.randn_like(x), x]))
    torch.testing.assert_close(beside_strangers[x.shape[0] :], in_batch, rtol=0, atol=1e-13)


def assert_padding_left_out(layer, x: torch.Tensor, valid_length: int) -> None:
    """Mask x [B, T, D] (B >= 2): row 0 is real up to `valid_length`, the last row all padding.

    Row 0's real outputs are those of its real tokens alone, every padded output is 0 and every
    statistic finite (a fully padded row must not give NaN); a causal layer's real outputs are
    also those it gives without the mask.
    """
    B, T, _ = x.shape
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, valid_length:] = False
    mask[-1] = False
    y, aux = layer(x, mask)
    short, _ = layer(x[:1, :valid_length])
    torch.testing.assert_close(y[:1, :valid_length], short, rtol=0, atol=1e-12)
    if layer.is_causal:
        unmasked, _ = layer(x)
        torch.testing.assert_close(y[mask], unmasked[mask], rtol=0, atol=1e-12)
    assert y[~mask].abs().max() == 0
    assert all(torch.isfinite(value).all() for value in aux.stats.values())

"""Checks that the tests of several layers share: agreement with a reference and decoding in
pieces. Layers run in float64, so the tolerances are tight."""

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

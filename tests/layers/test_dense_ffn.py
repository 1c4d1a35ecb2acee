import pytest
import torch

from lm_moe.layers import DenseFFN, ExpertWeights

from .reference import expert_mlp


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_dense_ffn_matches_reference_with_gradients(activation):
    ffn = DenseFFN(8, 16, activation).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    y, aux = ffn(x)
    expected = expert_mlp(ffn.expert, 0, x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    assert aux.loss.item() == 0 and aux.stats == {}

    grads = torch.autograd.grad(y.square().sum(), [x, ffn.expert.w_in, ffn.expert.w_out])
    ref_grads = torch.autograd.grad(expected.square().sum(), [x, ffn.expert.w_in, ffn.expert.w_out])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_swiglu_stacks_gate_and_up_projections():
    experts = ExpertWeights(3, 8, 16, "swiglu")
    assert experts.w_in.shape == (3, 8, 32)
    assert experts.w_out.shape == (3, 16, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_experts_equal_per_expert_loop_including_an_idle_expert(dtype):
    # float32 takes the grouped-matmul kernel, float64 the per-expert fallback: both must agree.
    experts = ExpertWeights(4, 8, 16).to(dtype)
    rows_per_expert = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 8, dtype=dtype)
    y = experts.forward_grouped(x, rows_per_expert)
    pieces = x.split(rows_per_expert.tolist())
    expected = torch.cat([expert_mlp(experts, e, piece) for e, piece in enumerate(pieces)])
    torch.testing.assert_close(y, expected)


def test_every_expert_weight_gets_a_gradient_tensor():
    # Stacked weights: even an expert with no rows has a (zero) gradient, so DDP never waits for it.
    experts = ExpertWeights(3, 4, 8)
    experts.forward_grouped(torch.randn(4, 4), torch.tensor([4, 0, 0])).sum().backward()
    assert experts.w_in.grad is not None and experts.w_in.grad[1:].abs().sum() == 0
    assert experts.w_in.grad[0].abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(dim=0, hidden_dim=4), "dim"),
        (dict(dim=4, hidden_dim=-1), "hidden_dim"),
        (dict(dim=4, hidden_dim=4, activation="relu"), "activation"),
        (dict(dim=4.5, hidden_dim=4), "dim"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DenseFFN(**kwargs)

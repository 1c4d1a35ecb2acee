import pytest
import torch

from lm_moe.layers import DenseFFN, ExpertWeights
from lm_moe.layers import ffn as ffn_module

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


def test_low_precision_cpu_groups_are_padded_to_a_row_multiple_and_match_the_unpadded_groups(monkeypatch):
    # oneDNN builds a kernel per matmul shape: every group the grouped matmul sees is padded to
    # a multiple of CPU_LOW_PRECISION_ROW_MULTIPLE rows, and the result is that of the rows alone.
    torch.manual_seed(0)
    experts = ExpertWeights(4, 16, 24)
    rows_per_expert = torch.tensor([5, 0, 70, 1])
    x = torch.randn(76, 16)
    grad = torch.randn(76, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = experts._grouped(x.bfloat16(), rows_per_expert)
    (expected.float() * grad).sum().backward()
    expected_grads = [experts.w_in.grad.clone(), experts.w_out.grad.clone()]
    experts.zero_grad()

    group_sizes = []
    grouped_mm = torch.nn.functional.grouped_mm

    def recording(a, b, offs):
        group_sizes.extend(torch.diff(offs, prepend=offs.new_zeros(1)).tolist())
        return grouped_mm(a, b, offs=offs)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts.forward_grouped(x, rows_per_expert)
    (y.float() * grad).sum().backward()
    assert group_sizes and all(size % ffn_module.CPU_LOW_PRECISION_ROW_MULTIPLE == 0 for size in group_sizes)
    assert y.dtype == torch.bfloat16 and y.shape == (76, 16)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)  # every row computed as without padding
    for padded, unpadded in zip([experts.w_in.grad, experts.w_out.grad], expected_grads):
        torch.testing.assert_close(padded, unpadded, rtol=1e-2, atol=1e-3)  # bf16 sums over other blockings


def test_every_expert_weight_gets_a_gradient_tensor():
    # Stacked weights: even an expert with no rows has a (zero) gradient, so DDP never waits for it.
    experts = ExpertWeights(3, 4, 8)
    experts.forward_grouped(torch.randn(4, 4), torch.tensor([4, 0, 0])).sum().backward()
    assert experts.w_in.grad is not None and experts.w_in.grad[1:].abs().sum() == 0
    assert experts.w_in.grad[0].abs().sum() > 0

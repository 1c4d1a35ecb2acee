"""ReMoE: ReLU gates pick a varying number of experts (against a float64 loop), the load-weighted L1
penalty, and its coefficient adapted once per optimizer step toward the target sparsity."""

import pytest
import torch
from torch import nn

from lm_moe.layers.feed_forward_layer import end_of_step

from . import reference
from .layer_checks import assert_matches_reference
from .layer_registry import LAYERS


def make_remoe(**kwargs):
    return LAYERS["remoe"].build(**kwargs)  # D = 8, E = 4, k = 2


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_output_and_gradients_match_the_loop_reference(activation):
    layer = make_remoe(activation=activation)
    with torch.no_grad():
        layer.router.normal_(0, 0.5)
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    active = aux.stats["active_experts"].item()
    assert 0 < active < 4, "the case must switch some experts off and keep others on"
    params = [x, layer.experts.w_in, layer.experts.w_out, layer.router]
    assert_matches_reference(y, reference.remoe(layer, x), params, atol=1e-12)


def test_a_token_whose_gates_are_all_off_outputs_zero():
    layer = make_remoe()
    with torch.no_grad():
        layer.router.zero_()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y, aux = layer(x)
    assert y.eq(0).all() and aux.stats["active_experts"].item() == 0 and aux.stats["sparsity"].item() == 1
    assert aux.stats["tokens_per_expert"].eq(0).all()


def test_the_penalty_weights_each_experts_mean_gate_by_its_load():
    layer = make_remoe(l1_init=0.5)
    with torch.no_grad():
        layer.router.normal_(0, 0.5)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    gates = torch.relu(x[mask] @ layer.router.T)  # [9 real tokens, E]
    load = (gates > 0).sum(0).double() * 4 / (2 * 9)
    expected = 0.5 * (load * gates.mean(0)).sum()
    torch.testing.assert_close(layer(x, mask)[1].loss, expected, rtol=0, atol=1e-12)


def test_the_coefficient_moves_once_per_step_toward_the_target_sparsity():
    layer = make_remoe(l1_init=1e-3, l1_adapt=2.0).train()
    with torch.no_grad():
        layer.router.normal_(0, 0.5)
        layer.router[0].abs_()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    sparsity = 1 - layer(x)[1].stats["active_experts"].item() / 4
    layer(x)  # a second micro-batch of the same step
    assert layer.l1_coefficient.item() == pytest.approx(1e-3)
    layer.before_optimizer_step()
    expected = 2e-3 if sparsity < 0.5 else 5e-4  # target 1 - 2/4
    assert layer.l1_coefficient.item() == pytest.approx(expected)
    layer.before_optimizer_step()  # a step without forwards leaves it
    assert layer.l1_coefficient.item() == pytest.approx(expected)
    layer.eval()
    layer(x)
    layer.before_optimizer_step()  # evaluation counts nothing
    assert layer.l1_coefficient.item() == pytest.approx(expected)


def _one_dense_and_one_sparse_layer(scope: str) -> nn.ModuleList:
    """Two layers (E = 4, target sparsity 1/2) after one training forward: the first with 3 gates of
    4 on for every token, the second with none, so their joint sparsity is 5/8."""
    layers = nn.ModuleList([make_remoe(l1_init=1e-3, l1_adapt=2.0, l1_scope=scope) for _ in range(2)]).train()
    x = torch.rand(2, 6, 8, dtype=torch.float64)  # positive inputs: a gate's sign is its weights'
    with torch.no_grad():
        layers[0].router.copy_(torch.tensor([1.0, 1.0, 1.0, -1.0]).unsqueeze(-1).expand(4, 8))
        layers[1].router.fill_(-1.0)
    for layer, active in zip(layers, [3.0, 0.0]):
        assert layer(x)[1].stats["active_experts"].item() == active
    return layers


def test_with_model_scope_the_layers_joint_sparsity_moves_one_shared_coefficient():
    layers = _one_dense_and_one_sparse_layer("model")
    end_of_step(layers)
    assert [layer.l1_coefficient.item() for layer in layers] == pytest.approx([5e-4, 5e-4])  # sparser than 1/2: down


def test_with_layer_scope_each_layer_follows_its_own_sparsity():
    layers = _one_dense_and_one_sparse_layer("layer")
    end_of_step(layers)
    assert [layer.l1_coefficient.item() for layer in layers] == pytest.approx([2e-3, 5e-4])


def test_model_scope_refuses_layers_with_different_targets():
    layers = nn.ModuleList([make_remoe(), make_remoe(target_active=1)]).train()
    for layer in layers:
        layer(torch.randn(1, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"same target.*0\.5.*0\.75"):
        end_of_step(layers)


def test_an_unknown_scope_is_refused():
    with pytest.raises(ValueError, match=r"l1_scope must be one of \['layer', 'model'\], got 'block'"):
        make_remoe(l1_scope="block")


def test_training_reaches_the_target_sparsity_on_a_toy():
    torch.manual_seed(0)
    layer = LAYERS["remoe"].layer_class(dim=8, hidden_dim=16, num_experts=8, target_active=2, l1_init=1e-4)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(300):
        x = torch.randn(4, 16, 8) + 1  # not centred: a gate w . x can then be off for most tokens
        y, aux = layer(x)
        loss = (y - teacher(x).detach()).square().mean() + aux.loss
        optimizer.zero_grad()
        loss.backward()
        layer.before_optimizer_step()
        optimizer.step()
    active = layer(torch.randn(16, 16, 8) + 1)[1].stats["active_experts"].item()
    assert active == pytest.approx(2.0, abs=0.5)  # from about 4 of 8 at the start

import math

import pytest
import torch

from lm_moe.layers import TopKMoE
from lm_moe.layers.numerics import entropy, softmax_entropy
from lm_moe.layers.routing import (
    TopKRouting,
    gshard_keep,
    prefix_capacity,
    load_balancing_loss,
    position_priority_keep,
    router_entropy,
    router_z_loss,
)

from . import reference
from .layer_checks import assert_matches_reference, decode_in_pieces
from .layer_registry import LAYERS


def make_moe(**kwargs) -> TopKMoE:
    return LAYERS["top2"].build(**kwargs)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("top_k, renormalize, route_scale", [(1, True, 1.0), (2, True, 1.0), (2, False, 1.0), (3, True, 1.0),
                                                             (2, True, 2.0), (2, False, 0.5)])
def test_dropless_output_and_gradients_match_reference(activation, top_k, renormalize, route_scale):
    moe = make_moe(top_k=top_k, renormalize=renormalize, activation=activation, route_scale=route_scale)
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    y, _ = moe(x)
    params = [x, moe.experts.w_in, moe.experts.w_out, moe.router.weight]
    assert_matches_reference(y, reference.topk_moe(moe, x), params, atol=1e-12)


@pytest.mark.parametrize("options", [
    dict(score_function="sigmoid"),
    dict(score_function="sigmoid", renormalize=False),
    dict(score_function="sigmoid", route_scale=2.5),
    dict(shared_hidden_dim=6),
    dict(shared_hidden_dim=6, shared_gate=True),
    dict(score_function="sigmoid", shared_hidden_dim=5, shared_gate=True, capacity_factor=0.5),
], ids=str)
def test_sigmoid_scores_and_shared_experts_match_reference(options):
    moe = make_moe(**options)
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    y, _ = moe(x)
    params = [x, moe.experts.w_in, moe.experts.w_out, moe.router.weight]
    if moe.shared is not None:
        params += [moe.shared.w_in, moe.shared.w_out]
    if moe.shared_gate is not None:
        params.append(moe.shared_gate.weight)
    assert_matches_reference(y, reference.topk_moe(moe, x), params, atol=1e-12)


def test_sigmoid_scores_balance_and_entropy_read_the_normalised_scores():
    moe = make_moe(score_function="sigmoid")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    probs, index, _ = reference.topk_choices(moe, x)
    routing = moe.router(x.reshape(-1, 8))
    torch.testing.assert_close(routing.probs, probs.reshape(-1, 4), rtol=0, atol=1e-12)
    assert torch.equal(routing.expert_index, index.reshape(-1, 2))
    share = torch.bincount(index.reshape(-1), minlength=4).double() / index.numel()
    expected = 4 * (share * probs.reshape(-1, 4).mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(routing), expected, rtol=0, atol=1e-12)
    assert moe.z_loss_weight == 0 and make_moe().z_loss_weight == 0.001  # z-loss: softmax routers only, unless set


def test_the_shared_expert_leaves_the_routing_draws_unchanged():
    torch.manual_seed(0)
    plain = make_moe()
    torch.manual_seed(0)
    shared = make_moe(shared_hidden_dim=6, shared_gate=True)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, shared.state_dict()[name]), name
    assert shared.parameter_macs_per_token() == plain.parameter_macs_per_token() + 2 * 8 * 6 + 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim, hidden_dim, activation", [(30, 32, "gelu"), (32, 33, "gelu"), (36, 20, "swiglu")])
def test_widths_the_grouped_kernel_cannot_stride_run_expert_by_expert(dtype, dim, hidden_dim, activation):
    # The grouped matmul wants rows of a multiple of 16 bytes: 4 fp32 or 8 bf16 values.
    moe = TopKMoE(dim, hidden_dim, num_experts=4, activation=activation)
    x = torch.randn(2, 9, dim, requires_grad=True)
    y, _ = moe.to(dtype)(x.to(dtype))
    y.float().square().sum().backward()
    expected = reference.topk_moe(moe.double(), x.detach().double())
    torch.testing.assert_close(y.double(), expected, rtol=0.05, atol=0.05 if dtype == torch.bfloat16 else 1e-5)
    assert x.grad.isfinite().all()


@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0, 1.25])
def test_capacity_drops_exactly_the_choices_the_position_rule_drops(capacity_factor):
    moe = make_moe(capacity_factor=capacity_factor)
    x = torch.randn(3, 10, 8, dtype=torch.float64, requires_grad=True)
    y, aux = moe(x)
    expected = reference.topk_moe(moe, x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    params = [x, moe.experts.w_in, moe.experts.w_out, moe.router.weight]
    for got, want in zip(torch.autograd.grad(y.sin().sum(), params), torch.autograd.grad(expected.sin().sum(), params)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    _, index, _ = reference.topk_choices(moe, x)
    kept = reference.capacity_kept(index, 4, capacity_factor)
    assert not kept.all(), "the case must drop something to test the rule"
    assert aux.stats["dropped_fraction"].item() == pytest.approx(1 - kept.float().mean().item())
    expected_counts = torch.bincount(index[kept], minlength=4).double()
    torch.testing.assert_close(aux.stats["tokens_per_expert"].double(), expected_counts)


def test_prefix_capacity_is_the_fair_share_of_the_prefix():
    # capacity_factor 1, k 1, E 2: ceil((t + 1) / 2)
    assert prefix_capacity(1.0, 1, 2, 6).tolist() == [1, 1, 2, 2, 3, 3]
    assert prefix_capacity(2.0, 2, 8, 4).tolist() == [1, 1, 2, 2]


def test_position_priority_on_a_hand_made_case():
    # One sequence, k=1, every token wants expert 0, capacity 2 everywhere: the first two win.
    index = torch.zeros(1, 4, 1, dtype=torch.long)
    routed = torch.ones(1, 4, 1, dtype=torch.bool)
    capacity = torch.full((4,), 2)
    keep, _ = position_priority_keep(index, routed, capacity, num_experts=3)
    assert keep.flatten().tolist() == [True, True, False, False]
    # Padding does not take a place in the queue.
    routed[0, 0, 0] = False
    keep, _ = position_priority_keep(index, routed, capacity, num_experts=3)
    assert keep.flatten().tolist() == [False, True, True, False]
    # A growing capacity lets the last position in again.
    keep, _ = position_priority_keep(index, routed, torch.tensor([1, 1, 2, 3]), num_experts=3)
    assert keep.flatten().tolist() == [False, True, True, True]


def test_capacity_lets_no_future_choice_evict_a_past_one():
    # Outputs up to t ignore any change after t.
    moe = make_moe(capacity_factor=0.5)
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    in_batch, _ = moe(x)
    t = 5
    changed = x.clone()
    changed[:, t + 1 :] = 100 * torch.randn(2, 12 - t - 1, 8, dtype=torch.float64)
    after, _ = moe(changed)
    torch.testing.assert_close(after[:, : t + 1], in_batch[:, : t + 1], rtol=0, atol=0)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_padding_is_routed_nowhere(capacity_factor):
    moe = make_moe(capacity_factor=capacity_factor)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    _, aux = moe(x, mask)
    served = aux.stats["tokens_per_expert"].sum().item()  # the 10 real tokens' 2 choices each, less the drops
    assert served == round(10 * 2 * (1 - aux.stats["dropped_fraction"].item()))


def test_load_balancing_loss_on_hand_computed_cases():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]], dtype=torch.float64)
    routing = TopKRouting(logits=probs.log(), probs=probs, expert_index=torch.tensor([[0], [1]]), weight=probs[:, :1])
    # f = [0.5, 0.5], P = [0.55, 0.45]  ->  2 * (0.5 * 0.55 + 0.5 * 0.45) = 1
    assert load_balancing_loss(routing).item() == pytest.approx(1.0)
    routing.expert_index = torch.tensor([[0], [0]])
    # f = [1, 0]  ->  2 * 0.55 = 1.1
    assert load_balancing_loss(routing).item() == pytest.approx(1.1)
    # Only the valid token counts: f = [1, 0], P = [0.7, 0.3]  ->  1.4
    assert load_balancing_loss(routing, valid=torch.tensor([True, False])).item() == pytest.approx(1.4)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_perfectly_balanced_router_scores_one_whatever_k(top_k):
    num_experts, num_tokens = 6, 12
    probs = torch.full((num_tokens, num_experts), 1 / num_experts)
    # Token i picks experts i, i+1, ... (mod E): every expert gets the same number of choices.
    index = (torch.arange(num_tokens)[:, None] + torch.arange(top_k)) % num_experts
    routing = TopKRouting(logits=probs.log(), probs=probs, expert_index=index, weight=probs[:, :top_k])
    assert load_balancing_loss(routing).item() == pytest.approx(1.0)
    assert router_entropy(routing).item() == pytest.approx(math.log(num_experts))


def test_router_z_loss_on_a_hand_computed_case():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]], dtype=torch.float64)
    routing = TopKRouting(logits=logits, probs=logits.softmax(-1), expert_index=torch.zeros(2, 1, dtype=torch.long), weight=None)
    # logsumexp = ln 4 and ln 2
    expected = (math.log(4) ** 2 + math.log(2) ** 2) / 2
    assert router_z_loss(routing).item() == pytest.approx(expected)


def test_aux_loss_is_the_weighted_sum_of_both_terms():
    moe = make_moe(load_balance_weight=0.3, z_loss_weight=0.07)
    _, aux = moe(torch.randn(2, 5, 8, dtype=torch.float64))
    expected = 0.3 * aux.stats["load_balance_loss"] + 0.07 * aux.stats["router_z_loss"]
    torch.testing.assert_close(aux.loss.detach(), expected)
    assert aux.loss.requires_grad
    assert all(not value.requires_grad for value in aux.stats.values())


def test_jitter_noise_only_in_training():
    moe = make_moe(jitter_noise=0.5)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    moe.eval()
    torch.testing.assert_close(moe(x)[0], moe(x)[0], rtol=0, atol=0)
    torch.testing.assert_close(moe(x)[0], reference.topk_moe(moe, x), rtol=0, atol=1e-12)
    moe.train()
    assert not torch.equal(moe.router(x.view(-1, 8)).probs, moe.router(x.view(-1, 8)).probs)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_bf16_autocast_keeps_router_in_fp32(capacity_factor):
    moe = TopKMoE(16, 32, 4, capacity_factor=capacity_factor)
    seen = []
    moe.router.register_forward_hook(lambda module, args, out: seen.append(out.logits.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(torch.randn(2, 8, 16))
    assert seen == [torch.float32]


@pytest.mark.parametrize("router_init_std", [0.02, 8**-0.5])
def test_router_starts_at_its_init_std(router_init_std):
    torch.manual_seed(0)
    moe = TopKMoE(dim=8, hidden_dim=4, num_experts=4096, router_init_std=router_init_std)
    assert moe.router.weight.std().item() == pytest.approx(router_init_std, rel=0.02)


def test_capacity_is_prefix_consistent():
    # What a prefix of length l gets does not depend on how long the sequence is: decoding-ready.
    moe = make_moe(capacity_factor=0.5)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    full, _ = moe(x)
    for length in (1, 4, 7):
        prefix, _ = moe(x[:, :length])
        torch.testing.assert_close(prefix, full[:, :length], rtol=0, atol=1e-13)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_the_decoding_state_holds_the_choices_each_expert_has_served(capacity_factor):
    # Dropless routing is per token: no state. With a capacity, a new token's place in an expert's
    # queue depends on what that expert has served in its sequence so far.
    moe = make_moe(capacity_factor=capacity_factor)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    _, states = decode_in_pieces(moe, x, [4])
    if capacity_factor is None:
        assert all(state is None for state in states)
    else:
        position, served = states[-1]
        assert position == 11 and served.shape == (2, 4)
        assert served.sum() == moe(x)[1].stats["tokens_per_expert"].sum()


def test_gshard_capacity_is_flagged_and_lets_the_future_evict_the_past():
    leaky = make_moe(capacity_factor=0.5, capacity_priority="gshard")
    assert not leaky.is_causal and make_moe(capacity_factor=0.5).is_causal and make_moe().is_causal
    torch.manual_seed(3)
    x = torch.randn(4, 16, 8, dtype=torch.float64)
    t = 3
    changed = x.clone()
    changed[:, t + 1 :] = 50 * torch.randn(4, 16 - t - 1, 8, dtype=torch.float64)
    before, after = leaky(x)[0], leaky(changed)[0]
    assert (before[:, : t + 1] - after[:, : t + 1]).abs().max() > 1e-6


def test_gshard_serves_first_choices_before_second_choices():
    # One sequence, k=2, E=2, capacity ceil(0.5 * 2 * 2 / 2) = 1 per expert.
    index = torch.tensor([[[0, 1], [1, 0]]])  # token 0: first 0, second 1; token 1: first 1, second 0
    keep = gshard_keep(index, torch.ones_like(index, dtype=torch.bool), 0.5, num_experts=2)
    # Both first choices fit; token 0's second choice (expert 1) loses to token 1's first choice.
    assert keep.tolist() == [[[True, False], [True, False]]]


@pytest.mark.parametrize("capacity_priority", ["position", "gshard"])
def test_batch_capacity_group_equals_the_rows_concatenated_into_one_sequence(capacity_priority):
    moe = make_moe(capacity_factor=0.5, capacity_priority=capacity_priority, capacity_group="batch")
    per_sequence = make_moe(capacity_factor=0.5, capacity_priority=capacity_priority)
    per_sequence.load_state_dict(moe.state_dict())
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    grouped, aux = moe(x)
    concatenated, reference_aux = per_sequence(x.reshape(1, 18, 8))
    torch.testing.assert_close(grouped, concatenated.view(3, 6, 8), rtol=0, atol=1e-13)
    assert aux.stats["dropped_fraction"] == reference_aux.stats["dropped_fraction"] > 0


def test_batch_capacity_group_makes_rows_depend_on_their_batch_mates():
    moe = make_moe(capacity_factor=0.5, capacity_group="batch")
    assert not moe.is_causal and not moe.per_example_deterministic
    dropless = make_moe(capacity_group="batch")  # no capacity to share: the rows stay apart
    assert dropless.is_causal and dropless.per_example_deterministic
    assert make_moe(capacity_factor=0.5).per_example_deterministic
    torch.manual_seed(0)
    x = torch.randn(4, 8, 8, dtype=torch.float64)
    mates_changed = torch.cat([x[:1], 10 * torch.randn(3, 8, 8, dtype=torch.float64)])
    # Row 0 goes first, so its drops are its own; row 1's depend on row 0.
    torch.testing.assert_close(moe(mates_changed)[0][:1], moe(x)[0][:1], rtol=0, atol=0)
    # Row 0 made of one token repeated: all its choices go to the same two experts.
    first_changed = torch.cat([x[:1, :1].expand(1, 8, 8), x[1:]])
    assert (moe(first_changed)[0][1:] - moe(x)[0][1:]).abs().max() > 1e-6


def test_entropy_on_hand_computed_cases():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]], dtype=torch.float64)
    expected = torch.tensor([math.log(2), 0.0, 1.5 * math.log(2)], dtype=torch.float64)  # 0 log 0 = 0
    torch.testing.assert_close(entropy(probs, dim=-1), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(entropy(probs.T, dim=0), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("logit_scale", [0.1, 3.0, 30.0])
@pytest.mark.parametrize("dim", [0, 1])
def test_softmax_entropy_equals_the_entropy_of_the_softmax(logit_scale, dim):
    torch.manual_seed(0)
    logits = logit_scale * torch.randn(6, 5, dtype=torch.float64)
    probs = logits.softmax(dim=dim)
    torch.testing.assert_close(softmax_entropy(probs, logits, dim=dim), entropy(probs, dim=dim), rtol=0, atol=1e-12)


def test_softmax_entropy_leaves_zeroed_entries_out():
    # SoftMoE's padding: dispatch is a softmax over the real tokens only, combine is zero on padding.
    logits = torch.randn(4, 3, dtype=torch.float64)
    valid = torch.tensor([True, True, False, False])
    dispatch_logits = logits.masked_fill(~valid[:, None], torch.finfo(logits.dtype).min)  # [4, 3]
    dispatch = dispatch_logits.softmax(dim=0)  # [4, 3]
    torch.testing.assert_close(
        softmax_entropy(dispatch, dispatch_logits, dim=0), entropy(dispatch, dim=0), rtol=0, atol=1e-12
    )
    combine = logits.softmax(dim=1) * valid[:, None]  # [4, 3]
    expected = torch.cat([entropy(combine[:2], dim=1), torch.zeros(2, dtype=torch.float64)])
    torch.testing.assert_close(softmax_entropy(combine, logits, dim=1), expected, rtol=0, atol=1e-12)


def test_router_entropy_is_the_mean_over_real_tokens():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    routing = TopKRouting(logits=probs.log(), probs=probs, expert_index=torch.zeros(3, 1, dtype=torch.long), weight=None)
    assert router_entropy(routing).item() == pytest.approx(2 * math.log(2) / 3)
    valid = torch.tensor([True, True, False])  # the third token is padding
    assert router_entropy(routing, valid).item() == pytest.approx(math.log(2) / 2)

import math

import pytest
import torch

from lm_moe.layers import slot_routing
from lm_moe.layers.lagged_chunk_soft_moe import LaggedChunkSoftMoE

from . import reference_causal_soft_moe as reference
from .layer_checks import assert_matches_reference, decode_in_pieces
from .layer_registry import DIM, LAYERS
from .mixed_precision import record_dtypes

C = LAYERS["lagged_chunk"].arguments["chunk_size"]  # of the small test layers


def make_layer(**kwargs) -> LaggedChunkSoftMoE:
    return LAYERS["lagged_chunk"].build(**kwargs)


def without_shared_expert(layer: LaggedChunkSoftMoE) -> LaggedChunkSoftMoE:
    """Zero the shared expert, so that the output is the slots' contribution alone."""
    with torch.no_grad():
        layer.shared.w_out.zero_()
    return layer


def test_is_declared_causal():
    assert LaggedChunkSoftMoE.is_causal is True


@pytest.mark.parametrize("summary", ["prefix", "previous"])
@pytest.mark.parametrize(
    "activation, num_experts, slots_per_expert, T",
    [("gelu", 3, 2, 11), ("gelu", 3, 2, 12), ("gelu", 3, 2, 3), ("swiglu", 3, 2, 11), ("gelu", 1, 1, 9),
     ("gelu", 4, 1, 14)],
)
def test_output_and_gradients_match_the_loop_reference(summary, activation, num_experts, slots_per_expert, T):
    # T = 11 and 14 end inside a chunk, 12 on a chunk edge, 3 inside chunk 0 (nothing but null outputs).
    layer = make_layer(
        num_experts=num_experts, slots_per_expert=slots_per_expert, activation=activation, summary=summary
    )
    x = torch.randn(2, T, DIM, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    assert aux.loss.item() == 0
    # With T <= C the reference never calls the experts; the layer must give them zero gradients.
    params = [x, layer.experts.w_in, layer.experts.w_out, layer.shared.w_in, layer.shared.w_out]
    params += [layer.slot_embeddings, layer.scale, layer.null_outputs]
    assert_matches_reference(y, reference.lagged_chunk_soft_moe(layer, x), params, atol=1e-10)


@pytest.mark.parametrize("summary", ["prefix", "previous"])
def test_the_decoding_state_holds_the_sums_and_the_outputs_the_chunk_reads(summary):
    layer = make_layer(summary=summary)
    _, states = decode_in_pieces(layer, torch.randn(2, 19, DIM, dtype=torch.float64), [5])
    state = states[-1]
    assert state.length == 19
    assert state.num.shape == (2, layer.num_slots, DIM) and state.lagged_outputs.shape == (2, layer.num_slots, DIM)


@pytest.mark.parametrize("summary", ["prefix", "previous"])
@pytest.mark.parametrize("t", [0, 1, C - 1, C, C + 1, 2 * C - 1, 2 * C, 2 * C + 1, 17])
def test_future_tokens_do_not_change_earlier_outputs(summary, t):
    layer = make_layer(summary=summary)
    x = torch.randn(2, 18, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, t + 1 :] = 100 * torch.randn_like(changed[:, t + 1 :])
    y, _ = layer(x)
    y_changed, _ = layer(changed)
    assert torch.equal(y[:, : t + 1], y_changed[:, : t + 1])
    assert ((y - y_changed)[:, t + 1 :].abs().amax(dim=-1) > 1e-6).all(), "every later output must change"


@pytest.mark.parametrize("summary", ["prefix", "previous"])
def test_a_chunk_reads_only_the_summaries_of_earlier_chunks(summary):
    # Through the slots alone, a token of chunk 1 reaches no other token of chunk 1 (not even
    # later ones: a chunk reading its own summary would leak), but every token of chunk 2; chunk 3
    # only when the summaries pool all earlier chunks. (The token itself moves: its own logits
    # choose its combine weights.)
    layer = without_shared_expert(make_layer(summary=summary))
    x = torch.randn(2, 4 * C, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, C] += 3 * torch.randn(2, DIM, dtype=torch.float64)  # the first token of chunk 1
    y, _ = layer(x)
    y_changed, _ = layer(changed)
    moved = (y - y_changed).abs().amax(dim=-1)  # [B, T]
    assert (moved[:, :C] == 0).all() and (moved[:, C + 1 : 2 * C] == 0).all()
    assert (moved[:, 2 * C : 3 * C] > 1e-6).all()
    if summary == "prefix":
        assert (moved[:, 3 * C :] > 1e-6).all()
    else:  # chunk 3 reads the summary of chunk 2 alone
        assert (moved[:, 3 * C :] == 0).all()


def test_the_first_chunk_combines_the_null_outputs():
    layer = without_shared_expert(make_layer())
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    y, _ = layer(x)
    combine = torch.softmax(reference.routing_logits(layer, x[:, :C]), dim=-1)  # [B, C, S]
    torch.testing.assert_close(y[:, :C], combine @ layer.null_outputs, rtol=0, atol=1e-12)


def test_experts_run_once_per_chunk_and_slot():
    layer = make_layer(num_experts=3, slots_per_expert=2)
    rows = []
    original = layer.experts.forward_batched

    def counting(inputs):
        rows.append(inputs.shape[:2])
        return original(inputs)

    layer.experts.forward_batched = counting
    B, T = 2, 11  # chunks 0, 1, 2: chunks 1 and 2 read the summaries of chunks 0 and 1
    layer(torch.randn(B, T, DIM, dtype=torch.float64))
    assert rows == [(3, 2 * B * 2)]  # [E, P * B * (K - 1)]: T*S/C expert calls per sequence, rounded

    # Decoding one token at a time: a burst of S expert calls exactly when a chunk completes.
    rows.clear()
    state, bursts = None, []
    with torch.inference_mode():
        for t in range(T):
            before = len(rows)
            _, state = layer.decode(torch.randn(B, 1, DIM, dtype=torch.float64), state)
            bursts += [t] * (len(rows) - before)
    assert bursts == [C - 1, 2 * C - 1] and rows == [(3, 2 * B)] * 2


@pytest.mark.parametrize("summary, chunk_entropies", [("prefix", [C, 2 * C]), ("previous", [C, C])])
def test_stats_describe_the_routing(summary, chunk_entropies):
    layer = make_layer(num_experts=4, slots_per_expert=1, summary=summary)
    with torch.no_grad():
        layer.scale.fill_(0.0)  # all logits 0: uniform dispatch over each pool and uniform combine
    _, aux = layer(torch.randn(2, 3 * C - 1, DIM, dtype=torch.float64))  # chunks 1, 2 read summaries 0, 1
    mean_entropy = sum(math.log(n) for n in chunk_entropies) / 2
    assert aux.stats["dispatch_entropy"].item() == pytest.approx(mean_entropy)
    assert aux.stats["combine_entropy"].item() == pytest.approx(math.log(4))
    torch.testing.assert_close(aux.stats["slot_usage"], torch.full((4,), 0.25))
    assert aux.stats["slot_usage_spread"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("summary", ["prefix", "previous"])
def test_bf16_autocast_keeps_routing_and_sums_in_fp32(monkeypatch, summary):
    layer = LaggedChunkSoftMoE(16, 32, 4, slots_per_expert=2, chunk_size=4, summary=summary)
    seen = record_dtypes(monkeypatch, slot_routing, "slot_logits")
    x = torch.randn(2, 18, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        layer(x)
        _, state = layer.decode(x[:, :6], None)
    assert seen == [torch.float32] * 2  # forward, decode
    assert state.num.dtype == torch.float32 and state.den.dtype == torch.float32

"""The ViT model: shapes, where the MoE MLPs go, per-example determinism, argument errors."""

from functools import partial

import pytest
import torch

from lm_moe.layers import DenseFFN, SoftMoE, TopKMoE
from lm_moe.layers.encoder_attention import EncoderSelfAttention
from lm_moe.lit.optim import adamw_param_groups
from lm_moe.models.vit import ViT


def tiny_vit(ffn=None, **overrides) -> ViT:
    settings = dict(num_classes=5, image_size=8, channels=1, patch_size=2, dim=16, depth=4, n_head=2, ffn=ffn)
    return ViT(**{**settings, **overrides})


def soft_moe(**init_args):
    return partial(SoftMoE, **{"hidden_dim": 8, "num_experts": 4, **init_args})


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("channels", [1, 3])
def test_logits_have_one_row_per_image_and_one_column_per_class(pool, channels):
    model = tiny_vit(soft_moe(), pool=pool, channels=channels)
    output = model(torch.randn(3, channels, 8, 8))
    assert output.logits.shape == (3, 5)
    assert model.pos_embed.num_embeddings == 16 + (pool == "cls")  # (8 / 2)^2 patches (+ the class token)


def test_encoder_attention_is_not_causal():
    attention = EncoderSelfAttention(dim=8, n_head=2).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    changed = x.clone()
    changed[:, -1] += 1.0  # only the last token changes
    assert not torch.allclose(attention(x)[:, 0], attention(changed)[:, 0])  # the first token sees it


@pytest.mark.parametrize(
    "moe_blocks, expected", [("second_half", {2, 3}), ("all", {0, 1, 2, 3}), ("every_other", {1, 3}), ("none", set())]
)
def test_moe_blocks_chooses_which_ffns_are_soft_moe(moe_blocks, expected):
    model = tiny_vit(soft_moe(), moe_blocks=moe_blocks)
    kinds = [type(block.mlp) for block in model.blocks]
    assert {i for i, kind in enumerate(kinds) if kind is SoftMoE} == expected
    assert all(kind is DenseFFN for i, kind in enumerate(kinds) if i not in expected)


def test_without_an_ffn_factory_every_block_is_dense_with_the_given_width():
    model = tiny_vit(None, dense_hidden_dim=24)
    assert all(type(block.mlp) is DenseFFN and block.mlp.expert.hidden_dim == 24 for block in model.blocks)
    assert tiny_vit(None).blocks[0].mlp.expert.hidden_dim == 64  # default: 4 x dim


def test_experts_and_slots_come_from_the_factory_and_slots_default_to_one_per_expert():
    assert tiny_vit(soft_moe()).blocks[-1].mlp.num_slots == 4
    layer = tiny_vit(soft_moe(num_experts=3, slots_per_expert=2)).blocks[-1].mlp
    assert (layer.num_experts, layer.slots_per_expert, layer.num_slots) == (3, 2, 6)


def test_moe_stats_and_aux_loss_are_reported_per_moe_block():
    images = torch.randn(2, 1, 8, 8)
    soft = tiny_vit(soft_moe())(images)
    assert set(soft.layer_stats) == {"block_2", "block_3"}
    assert {"dispatch_entropy", "combine_entropy", "slot_usage"} <= set(soft.layer_stats["block_2"])
    assert soft.aux_loss == 0
    sparse = tiny_vit(partial(TopKMoE, hidden_dim=8, num_experts=4, top_k=2))(images)
    assert {"tokens_per_expert", "dropped_fraction"} <= set(sparse.layer_stats["block_3"])
    assert sparse.aux_loss > 0  # load balance + z-loss


def test_every_parameter_gets_a_gradient():
    model = tiny_vit(soft_moe(), pool="cls")
    model(torch.randn(2, 1, 8, 8)).logits.square().sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_class_token_and_position_embeddings_are_not_weight_decayed():
    model = tiny_vit(soft_moe(), pool="cls")
    decayed, not_decayed = adamw_param_groups(model, weight_decay=0.1, learning_rate=1e-3)
    assert any(p is model.cls_token for p in not_decayed["params"])
    assert any(p is model.pos_embed.weight for p in not_decayed["params"])
    assert any(p is model.patch_embed.weight for p in decayed["params"])


def _row0_changes_with_batch_mates(model: ViT) -> tuple[float, float]:
    """Largest change of row 0's logits and of row 1's when rows 1.. are replaced (float64, eval)."""
    model = model.double().eval()
    images = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    other = images.clone()
    other[1:] = torch.randn(3, 1, 8, 8, dtype=torch.float64) * 3
    with torch.no_grad():
        before, after = model(images).logits, model(other).logits
    return (before[0] - after[0]).abs().max().item(), (before[1] - after[1]).abs().max().item()


def test_soft_moe_vit_is_per_example_deterministic():
    row0, row1 = _row0_changes_with_batch_mates(tiny_vit(soft_moe(), moe_blocks="all"))
    assert row0 == 0.0
    assert row1 > 1e-3  # not vacuous: the changed rows do change


@pytest.mark.parametrize("capacity_group", ["sequence", "batch"])
def test_capacity_limited_topk_vit_depends_on_batch_mates_only_with_a_batch_capacity(capacity_group):
    """With capacity_group="batch" (V-MoE style: all images of the batch share each expert's capacity)
    an image's drops, so its logits, depend on the images before it; with the default per-image
    capacity (tokens in patch order) they do not."""
    ffn = partial(TopKMoE, hidden_dim=8, num_experts=4, top_k=2, capacity_factor=0.5, capacity_group=capacity_group)
    model = tiny_vit(ffn, moe_blocks="all").double()
    images = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    assert model(images).layer_stats["block_0"]["dropped_fraction"] > 0.3  # the capacity does bite
    changed_first = images.clone()
    changed_first[0] = torch.randn(1, 8, 8, dtype=torch.float64) * 3
    with torch.no_grad():
        row1 = (model(images).logits[1] - model(changed_first).logits[1]).abs().max().item()
    if capacity_group == "sequence":
        assert row1 == 0.0
    else:
        assert row1 > 1e-6


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_size": 30, "patch_size": 4}, "image_size 30 is not divisible by patch_size 4"),
        ({"channels": 2}, "channels must be one of"),
        ({"dim": 15, "n_head": 2}, "dim must be divisible by n_head"),
        ({"pool": "max"}, "pool must be one of"),
        ({"moe_blocks": "first_half"}, "moe_blocks must be one of"),
        ({"num_classes": 0}, "num_classes must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"dropout": -0.5}, "dropout must be a number in"),
        ({"ffn": soft_moe(num_experts=0)}, "num_experts must be a positive integer, got 0"),
        ({"ffn": soft_moe(slots_per_expert=0)}, "slots_per_expert must be a positive integer, got 0"),
        ({"ffn": 3}, "ffn must be a callable"),
    ],
)
def test_bad_arguments_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_vit(**overrides)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 1, 16, 16), (1, 8, 8)])
def test_images_of_the_wrong_shape_are_refused(shape):
    with pytest.raises(ValueError, match=r"images must have shape \[B, 1, 8, 8\]"):
        tiny_vit()(torch.randn(*shape))

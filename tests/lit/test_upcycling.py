"""Sparse upcycling (model.upcycle_from): the MoE layers' experts start as copies of a trained dense
model's MLPs; a renormalised top-k model (and the segment-merged V4) then computes exactly what the
dense model computes."""

import pytest
import torch

from lm_moe import cli
from lm_moe.lit.checkpoints import read_checkpoint
from lm_moe.lit.trained_model import load_trained_module
from lm_moe.lit.upcycling import upcycle_from_dense

from .lm_runs import REPO, fit, tiny_args
from .tiny_runs import WeightsAtStart

DENSE, TOP2 = REPO / "configs/lm/dense.yaml", REPO / "configs/lm/top2.yaml"
WIDTH = ["--model.ffn.init_args.hidden_dim=128"]  # the tiny dense MLP's width (tiny_args' dense_hidden_dim)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A trained tiny dense LM: (its last checkpoint, the data cache)."""
    work, cache = tmp_path_factory.mktemp("dense"), tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        fit(DENSE, cache, steps=2)
    return work / "runs/dense/version_0/checkpoints/last.ckpt", cache


def _built(config, cache, *extra):
    return cli.main(["-c", str(config), *tiny_args(cache), *extra], run=False).model.model


@pytest.mark.parametrize("config, extra", [
    ("top2", WIDTH),
    ("top2", [*WIDTH, "--model.ffn.init_args.score_function=sigmoid", "--model.ffn.init_args.balance=loss_free"]),
    ("segment_merged", WIDTH),
])
def test_an_upcycled_model_computes_what_the_dense_model_computes(config, extra, dense_run):
    checkpoint, cache = dense_run
    dense = load_trained_module(checkpoint).model.double()
    moe = _built(REPO / f"configs/lm/{config}.yaml", cache, *extra)
    upcycle_from_dense(moe, checkpoint, "lm")
    moe = moe.double().eval()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-9, atol=1e-9)


def test_the_experts_are_copies_with_noise_and_the_router_stays_fresh(dense_run):
    checkpoint, cache = dense_run
    trained = read_checkpoint(checkpoint)["state_dict"]
    fresh = _built(TOP2, cache, *WIDTH)
    router_before = fresh.blocks[1].ffn.router.weight.clone()
    torch.manual_seed(0)
    upcycle_from_dense(fresh, checkpoint, "lm", noise=0.01)
    experts = fresh.blocks[1].ffn.experts
    dense_in, dense_out = trained["model.blocks.1.ffn.expert.w_in"][0], trained["model.blocks.1.ffn.expert.w_out"][0]
    for e in range(experts.num_experts):
        difference = experts.w_in[e] - dense_in
        assert 0 < difference.std() < 0.02 * dense_in.std()  # a copy, each with its own noise
    assert not torch.equal(experts.w_in[0], experts.w_in[1])
    assert torch.allclose(experts.w_out.mean(0) * 2, dense_out, atol=0.05 * dense_out.abs().max())  # / route_scale 2
    assert torch.equal(fresh.blocks[1].ffn.router.weight, router_before)
    assert torch.equal(fresh.wte.weight, trained["model.wte.weight"])


@pytest.mark.parametrize("config, extra, message", [
    ("fine_grained", [], "blocks.0.ffn: TopKMoE.shared: the dense MLP (gelu, width 128, dim 64) does not fit experts "
                         "of gelu, width 256, dim 64; upcycling copies the dense MLP into experts of its own width"),
    ("top2", [], "does not fit experts of gelu, width 512"),
])
def test_experts_of_another_width_are_refused_by_name(config, extra, message, dense_run):
    checkpoint, cache = dense_run
    model = _built(REPO / f"configs/lm/{config}.yaml", cache, *extra)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        upcycle_from_dense(model, checkpoint, "lm")


def test_upcycling_from_a_model_that_is_not_dense_is_refused(trained_top2):
    work, cache = trained_top2
    model = _built(TOP2, cache, *WIDTH)
    with pytest.raises(ValueError, match=r"upcycling starts from a dense model \(ffn: null\); this one has ffn lm_moe"):
        upcycle_from_dense(model, work / "runs/top2/version_0/checkpoints/last.ckpt", "lm")


def test_init_from_and_upcycle_from_together_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"model.init_from \(a.ckpt\) and model.upcycle_from \(b.ckpt\) both name"):
        cli.main(["fit", "-c", str(TOP2), *tiny_args(tmp_path / "cache"), "--model.init_from=a.ckpt",
                  "--model.upcycle_from=b.ckpt"])


def test_fit_upcycles_a_dense_checkpoint_and_trains(dense_run, tmp_path, monkeypatch):
    checkpoint, cache = dense_run
    monkeypatch.chdir(tmp_path)
    run = fit(TOP2, cache, *WIDTH, f"--model.upcycle_from={checkpoint}", "--model.freeze=[non_moe]",
              "--trainer.callbacks+=tests.lit.tiny_runs.WeightsAtStart", steps=2)
    (start,) = [callback for callback in run.trainer.callbacks if isinstance(callback, WeightsAtStart)]
    trained = read_checkpoint(checkpoint)["state_dict"]
    assert torch.equal(start.weights["blocks.0.ffn.experts.w_in"][3], trained["model.blocks.0.ffn.expert.w_in"][0])
    assert start.step == 0 and run.trainer.global_step == 2
    final = run.model.model.state_dict()
    assert torch.equal(final["wte.weight"], trained["model.wte.weight"])  # frozen
    assert not torch.equal(final["blocks.0.ffn.experts.w_in"], start.weights["blocks.0.ffn.experts.w_in"])


def test_a_vit_upcycles_into_soft_moe(tmp_path, monkeypatch):
    from .vit_runs import fit as fit_vit

    monkeypatch.chdir(tmp_path)
    fit_vit(REPO / "configs/vit/dense.yaml", tmp_path / "cache", steps=2)
    source = tmp_path / "runs/vit_dense/version_0/checkpoints/last.ckpt"
    run = fit_vit(REPO / "configs/vit/soft_moe.yaml", tmp_path / "cache", f"--model.upcycle_from={source}",
                  "--model.ffn.init_args.hidden_dim=64", "--trainer.callbacks+=tests.lit.tiny_runs.WeightsAtStart",
                  steps=1)
    (start,) = [callback for callback in run.trainer.callbacks if isinstance(callback, WeightsAtStart)]
    trained = read_checkpoint(source)["state_dict"]
    assert torch.equal(start.weights["blocks.1.mlp.experts.w_out"][5], trained["model.blocks.1.mlp.expert.w_out"][0])
    assert torch.equal(start.weights["blocks.0.mlp.expert.w_in"], trained["model.blocks.0.mlp.expert.w_in"])

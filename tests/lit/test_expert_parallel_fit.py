"""Expert-parallel training through the CLI (configs/trainer/cpu_ep.yaml: 2 gloo processes, half of
the experts each): the same weights as 2-process DDP after the same steps, a full checkpoint that
loads and resumes in one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lm_moe.lit.checkpoints import read_checkpoint
from lm_moe.lit.trained_model import load_trained_module

from .lm_runs import REPO, tiny_args

TOP2 = REPO / "configs/lm/top2.yaml"


def run_cli(work, *args):
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf_cache"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "lm_moe", *args], cwd=work, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def ep_and_ddp_runs(tmp_path_factory):
    """The same 3 steps of top-2 with expert parallelism and with DDP: their work folders."""
    cache = tmp_path_factory.mktemp("cache")
    works = {}
    for preset in ("cpu_ep", "cpu_ddp"):
        work = works[preset] = tmp_path_factory.mktemp(preset)
        run_cli(work, "fit", "-c", str(TOP2), "-c", str(REPO / f"configs/trainer/{preset}.yaml"), *tiny_args(cache, steps=3),
                "--trainer.callbacks+=tests.lit.tiny_runs.ExpertCounts", f"--trainer.default_root_dir={work}")
    return works, cache


def test_each_rank_holds_half_of_the_experts(ep_and_ddp_runs):
    works, _ = ep_and_ddp_runs
    for rank in (0, 1):
        assert json.loads((works["cpu_ep"] / f"experts_rank{rank}.json").read_text()) == [4, 4]  # of 8, 2 layers
        assert json.loads((works["cpu_ddp"] / f"experts_rank{rank}.json").read_text()) == [8, 8]


def test_expert_parallel_training_equals_data_parallel_training(ep_and_ddp_runs):
    works, _ = ep_and_ddp_runs
    ep = read_checkpoint(works["cpu_ep"] / "runs/top2/version_0/checkpoints/last.ckpt")
    ddp = read_checkpoint(works["cpu_ddp"] / "runs/top2/version_0/checkpoints/last.ckpt")
    assert ep["global_step"] == ddp["global_step"] == 3
    assert ep["state_dict"]["model.blocks.0.ffn.experts.w_in"].shape[0] == 8  # gathered
    # Equal up to fp32 summation order, which Adam's first steps magnify for the tiniest gradients
    # (a few 1e-6, against steps of about 1e-3).
    for name, tensor in ddp["state_dict"].items():
        torch.testing.assert_close(ep["state_dict"][name], tensor, rtol=1e-4, atol=2e-5,
                                   msg=lambda message, name=name: f"{name}: {message}")
    for ours, theirs in zip(ep["optimizer_states"][0]["state"].values(), ddp["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(ours["exp_avg_sq"], theirs["exp_avg_sq"], rtol=1e-3, atol=1e-12)


def test_the_checkpoint_loads_and_resumes_in_one_process(ep_and_ddp_runs):
    works, cache = ep_and_ddp_runs
    work = works["cpu_ep"]
    checkpoint = work / "runs/top2/version_0/checkpoints/last.ckpt"
    assert load_trained_module(checkpoint).model.blocks[0].ffn.experts.num_experts == 8
    run_cli(work, "fit", "-c", str(TOP2), *tiny_args(cache, steps=5), f"--ckpt_path={checkpoint}",
            f"--trainer.default_root_dir={work / 'resumed'}", f"--trainer.logger.init_args.save_dir={work / 'resumed'}")
    resumed = read_checkpoint(work / "resumed/top2/version_0/checkpoints/last.ckpt")
    assert resumed["global_step"] == 5
    assert {float(state["step"]) for state in resumed["optimizer_states"][0]["state"].values()} == {5.0}


def test_the_soft_moe_vit_trains_with_expert_parallelism(tmp_path):
    from .vit_runs import tiny_args as vit_tiny_args

    run_cli(tmp_path, "fit", "-c", str(REPO / "configs/vit/soft_moe.yaml"), *vit_tiny_args(tmp_path / "cache", steps=2),
            "-c", str(REPO / "configs/trainer/cpu_ep.yaml"), "--trainer.max_steps=2", "--trainer.val_check_interval=2",
            "--trainer.callbacks+=tests.lit.tiny_runs.ExpertCounts", f"--trainer.default_root_dir={tmp_path}")
    assert json.loads((tmp_path / "experts_rank1.json").read_text()) == [16]  # 32 experts, in the second of 2 blocks
    checkpoint = tmp_path / "runs/vit_soft_moe/version_0/checkpoints/last.ckpt"
    assert load_trained_module(checkpoint).model.blocks[1].mlp.experts.num_experts == 32

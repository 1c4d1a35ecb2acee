"""Multi-process training on the CPU: DDP over gloo, as it runs on GPUs with NCCL."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lm_moe import cli
from lm_moe.layers.feed_forward_layer import end_of_step
from lm_moe.lit.checkpoints import read_checkpoint
from lm_moe.lit.safe_loading import foreign_callables

from .lm_runs import tiny_args

REPO = Path(__file__).resolve().parents[2]


def run_cli(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf_cache")}
    result = subprocess.run([sys.executable, "-m", "lm_moe", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_sigterm_to_every_rank_stops_them_together_with_last_ckpt_at_that_step(tmp_path):
    # As a scheduler preempts a job: every rank gets SIGTERM (here each sends it to itself as step 2 starts).
    args = ["fit", "-c", str(REPO / "configs/lm/top2.yaml"), "-c", str(REPO / "configs/trainer/cpu_ddp.yaml"),
            *tiny_args(tmp_path / "cache", steps=8), "--trainer.callbacks+=tests.lit.tiny_runs.SignalAtStep",
            "--trainer.callbacks.step=2", f"--trainer.callbacks.signum={int(signal.SIGTERM)}"]
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "lm_moe", *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)  # ranks whose collectives stop matching hang here
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-4000:]
    checkpoint = read_checkpoint(tmp_path / "runs/top2/version_0/checkpoints/last.ckpt")
    assert checkpoint["global_step"] == 3  # the step under way when the signal came finished


@pytest.mark.parametrize("config", ["top2", "lagged_chunk"])
def test_two_process_ddp_fit_completes_and_resumes_in_one_process(config, tmp_path):
    cache = tmp_path / "cache"
    config_path = str(REPO / f"configs/lm/{config}.yaml")
    run_cli(tmp_path, "fit", "-c", config_path, "-c", str(REPO / "configs/trainer/cpu_ddp.yaml"), *tiny_args(cache))
    run_dir = tmp_path / "runs" / config / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs" / config / "version_1").exists()  # one run folder: rank 0 writes
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # the safe loading takes it
    assert checkpoint["global_step"] == 4
    assert foreign_callables(run_dir / "checkpoints" / "last.ckpt") == []

    if config == "top2":  # the expert loads logged are those of the global batch, not rank 0's
        events = EventAccumulator(str(run_dir))
        events.Reload()
        histogram = events.Histograms("moe/block_0/tokens_per_expert")[-1].histogram_value
        # 2 ranks x batch 4 x 32 tokens x top-2 routing choices
        assert histogram.sum == 2 * 4 * 32 * 2

        # Predict under DDP with an odd number of prompts, one per batch: the ranks get different
        # numbers of batches, and every prompt is written once.
        run_cli(tmp_path, "predict", "-c", str(run_dir / "config.yaml"), "-c", str(REPO / "configs/trainer/cpu_ddp.yaml"),
                f"--ckpt_path={run_dir}/checkpoints/last.ckpt", "--data.batch_size=1", "--data.val_fraction=0.1",
                "--model.sampling.prompt_tokens=4", "--model.sampling.new_tokens=2", "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}/predict")
        built = cli.main(["-c", config_path, *tiny_args(cache), "--data.val_fraction=0.1"], run=False)
        built.datamodule.setup("predict")
        prompts = len(built.datamodule.val_set)
        assert prompts % 2 == 1  # the case under test
        assert len((tmp_path / "predict" / "predictions.jsonl").read_text().splitlines()) == prompts

    # The DDP checkpoint resumes in a single process (a different world size).
    resumed = cli.main(["fit", "-c", config_path, *tiny_args(cache, steps=6), f"--ckpt_path={run_dir}/checkpoints/last.ckpt",
                        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}/runs"])
    assert resumed.trainer.global_step == 6


def test_two_process_ddp_fine_tune_with_frozen_parts_trains_them_not(trained_top2, tmp_path):
    # DDP without find_unused_parameters: frozen parameters are left out of its reducer.
    work, cache = trained_top2
    source = work / "runs/top2/version_0/checkpoints/last.ckpt"
    run_cli(tmp_path, "fit", "-c", str(REPO / "configs/lm/top2.yaml"), "-c", str(REPO / "configs/trainer/cpu_ddp.yaml"),
            *tiny_args(cache), f"--model.init_from={source}", "--model.freeze=[experts, attention]")
    tuned = read_checkpoint(tmp_path / "runs/top2/version_0/checkpoints/last.ckpt")["state_dict"]
    trained = read_checkpoint(source)["state_dict"]
    for name, tensor in tuned.items():
        frozen = ".experts." in name or ".attn." in name
        assert torch.equal(tensor, trained[name]) == frozen or "expert_bias" in name, name


def _ddp_gradients(rank: int, world_size: int, config: str, state: dict, init_file: str, ids: torch.Tensor, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _ddp_backward(rank, world_size, config, state, ids, out_file)
        # No rank tears its group down while the other still works (rank 0 saves the gradients):
        # gloo aborts a process (std::terminate) now and then when its peer closes the connections
        # under it.
        dist.barrier()
    finally:
        # The DDP wrapper is gone by now. Had its reducer held the last reference to the gloo
        # group, the group's destructor would join gloo's threads while holding the GIL, and a
        # thread still releasing its last work item needs the GIL: a deadlock at exit, now and then.
        dist.destroy_process_group()


def _ddp_backward(rank: int, world_size: int, config: str, state: dict, ids: torch.Tensor, out_file: str) -> None:
    model = _tiny_model(config)
    model.load_state_dict(state)
    shard = ids.chunk(world_size)[rank]  # [B / world, T + 1]
    # DDP wraps what returns the loss, as Lightning wraps training_step; it must outlive the
    # backward pass, whose hooks it owns.
    ddp = DistributedDataParallel(_LossOf(model))
    ddp(shard).backward()
    end_of_step(model)  # the loss-free bias, ReMoE's L1 coefficient
    if rank == 0:
        torch.save({**{name: p.grad for name, p in model.named_parameters()}, **_per_step_buffers(model)}, out_file)


def _per_step_buffers(model) -> dict:
    """The buffers the optimizer steps move, by name: loss-free biases and ReMoE's L1 coefficients."""
    return {name: buffer.clone() for name, buffer in model.named_buffers()
            if name.endswith(("expert_bias", "l1_coefficient"))}


def _tiny_model(config: str):
    overrides = ["--model.n_layer=2", "--model.dim=32", "--model.n_head=2", "--model.dense_hidden_dim=64",
                 "--data.vocab_size=300", "--data.block_size=40", "--trainer.logger=false"]
    return cli.main(["-c", str(REPO / f"configs/lm/{config}.yaml"), *overrides], run=False).model.model.double()


class _LossOf(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _loss(self.model, ids)


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    output = model(ids[:, :-1])
    return F.cross_entropy(output.logits.flatten(0, 1), ids[:, 1:].flatten()) + output.aux_loss


@pytest.mark.parametrize("config", ["top2", "top2_loss_free", "fine_grained", "remoe", "mixture_of_tokens", "lagged_chunk"])
def test_ddp_gradient_equals_the_single_process_gradient_of_the_global_batch(config, tmp_path):
    # And what the step moves from every rank's counts (the loss-free bias, ReMoE's L1
    # coefficient) equals the single-process update.
    ids = torch.randint(0, 300, (8, 33), generator=torch.Generator().manual_seed(1))  # global batch
    out_file = str(tmp_path / "ddp_grads.pt")
    model = _tiny_model(config)
    mp.spawn(_ddp_gradients, args=(2, config, model.state_dict(), str(tmp_path / "init"), ids, out_file), nprocs=2, join=True)
    ddp_grads = torch.load(out_file)

    _loss(model, ids).backward()
    end_of_step(model)  # the loss-free bias, ReMoE's L1 coefficient
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], parameter.grad, rtol=1e-9, atol=1e-12, msg=name)
    moved = _per_step_buffers(model)
    assert len(moved) == (2 if config in ("top2_loss_free", "remoe") else 0)
    for name, buffer in moved.items():
        assert not torch.equal(buffer, _tiny_model(config).get_buffer(name)), "the step must move it to test it"
        torch.testing.assert_close(ddp_grads[name], buffer, rtol=0, atol=0, msg=name)


TRAINER_PRESETS = sorted((REPO / "configs/trainer").glob("*.yaml"))


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=[path.stem for path in TRAINER_PRESETS])
def test_every_trainer_preset_builds_a_trainer(preset, tmp_path):
    # GPU presets are checked on the CPU: the accelerator is swapped, every other setting stays.
    on_cpu = ["--trainer.accelerator=cpu", "--trainer.devices=1"] if "gpu" in preset.stem else []
    built = cli.main(["-c", str(REPO / "configs/lm/top2.yaml"), "-c", str(preset), *on_cpu,
                      f"--data.cache_dir={tmp_path}", "--data.num_workers=0"], run=False)
    assert built.trainer.max_steps > 0
    if preset.stem == "gpu_fsdp":
        from lm_moe.layers.block import TransformerBlock
        from lm_moe.lit.strategies import BlockFSDPStrategy

        assert isinstance(built.trainer.strategy, BlockFSDPStrategy)
        assert TransformerBlock in built.trainer.strategy.kwargs["auto_wrap_policy"]._module_classes

"""scripts/sweep_vit.py: the settings of the Soft MoE paper's two ViT sweeps at matched FLOPs, and
the sweep end to end on a tiny ViT (files, rows, resume)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_moe.profiling.vit_sweep import EXPERTS_SWEEP, SLOTS_SWEEP, sweep_settings

from .scripts_in_process import run_script_in_process

REPO = Path(__file__).resolve().parents[1]
SOFT_MOE_FFN = {"num_experts": 32, "slots_per_expert": 1, "hidden_dim": 784}  # configs/vit/soft_moe.yaml
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--model.dim=32", "--model.n_head=2", "--model.depth=2", "--model.dense_hidden_dim=64", "--data.batch_size=16",
        "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1"]


def test_the_default_sweeps_keep_the_configs_flops():
    settings = sweep_settings(Path("soft_moe.yaml"), SOFT_MOE_FFN, Path("dense.yaml"), [4, 8, 16, 32], 32, [1, 2, 4], 32)
    by_name = {setting.name: setting for setting in settings}
    assert list(by_name) == ["dense", "E4_P8", "E8_P4", "E16_P2", "E32_P1", "E32_P2", "E32_P4"]
    assert by_name["dense"].config == Path("dense.yaml") and by_name["dense"].overrides == ()
    for setting in settings[1:]:
        assert setting.experts * setting.slots_per_expert * setting.hidden_dim == 32 * 784  # slots x width
    assert [by_name[name].hidden_dim for name in ("E4_P8", "E32_P1", "E32_P2", "E32_P4")] == [784, 784, 392, 196]
    assert by_name["E32_P1"].sweeps == (EXPERTS_SWEEP, SLOTS_SWEEP)  # in both sweeps, trained once
    assert by_name["E8_P4"].overrides == ("--model.ffn.init_args.num_experts=8",
                                          "--model.ffn.init_args.slots_per_expert=4",
                                          "--model.ffn.init_args.hidden_dim=784")


@pytest.mark.parametrize("experts, total, slots, fixed, message", [
    ([3], 32, [1], 32, "--experts 3 does not divide --total-slots 32"),
    ([4], 32, [3], 32, "32 experts x 3 slots = 96 slots do not divide the config's 25088 expert units"),
])
def test_a_setting_without_a_whole_expert_width_is_refused(experts, total, slots, fixed, message):
    with pytest.raises(ValueError, match=message):
        sweep_settings(Path("s.yaml"), SOFT_MOE_FFN, Path("d.yaml"), experts, total, slots, fixed)


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "1,x"], "--seeds 1,x: give whole numbers"),
    (["--experts", "0", "8"], "--experts takes positive whole numbers, got 0 8"),
    (["--soft-moe-config", "configs/lm/top2.yaml"], "the sweep trains ViTs; not ViT configs: configs/lm/top2.yaml"),
    (["--max-steps", "10", "--val-every", "3"], "--val-every (3) must divide --max-steps (10)"),
])
def test_sweep_vit_refuses_bad_options(tmp_path, monkeypatch, capsys, flags, message):
    with pytest.raises(SystemExit) as refused:
        run_script_in_process("scripts/sweep_vit.py", [*flags, "--out", str(tmp_path / "out")], monkeypatch)
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def run_sweep(out: Path, env: dict) -> subprocess.CompletedProcess:
    args = ["--out", str(out), "--seeds", "1", "--experts", "4", "8", "--total-slots", "8", "--slots-per-expert", "1",
            "--fixed-experts", "8", "--max-steps", "4", "--val-every", "2", "--threads", "1", *TINY]
    return subprocess.run([sys.executable, str(REPO / "scripts/sweep_vit.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=env)


def test_sweep_vit_end_to_end_and_resumed(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    result = run_sweep(out, env)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("dense seed 1: trained", "E4_P2 seed 1: trained", "E8_P1 seed 1: trained"):
        assert line in result.stdout
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(row["setting"], row["experts"], row["slots_per_expert"], row["hidden_dim"]) for row in rows] == [
        ("dense", "", "", ""), ("E4_P2", "4", "2", "3136"), ("E8_P1", "8", "1", "3136")]
    runs = list(csv.DictReader((out / "runs.csv").open()))
    for row, run in zip(rows, runs):
        assert row["status"] == "ok" and row["seeds"] == "1/1"
        assert 0 < float(run["val_loss"]) < 5 and 0 <= float(run["val_acc"]) <= 1 and float(run["ms_per_step"]) > 0
        assert float(row["val_loss_mean"]) == pytest.approx(float(run["val_loss"]))
        assert float(row["val_acc_mean"]) == pytest.approx(100 * float(run["val_acc"]))
    assert float(rows[1]["params"]) > float(rows[0]["params"])
    assert float(rows[0]["time_ratio"]) == 1.0
    assert json.loads((out / "results.json").read_text())["runs"][0]["setting"] == "dense"
    assert (out / "sweep_vit.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "| E8_P1 | 8 | 1 | 8 | 3136 |" in (out / "table.md").read_text()

    again = run_sweep(out, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "dense seed 1: skipped" in again.stdout and "E8_P1 seed 1: skipped" in again.stdout
    assert sorted(path.name for path in (out / "E4_P2" / "seed_1").glob("version_*")) == ["version_0"]

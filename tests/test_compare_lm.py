"""The variant comparison: its cost accounting, its reading of TensorBoard logs, and
scripts/compare_lm.py end to end (a failed variant, an interrupted one resumed, finished ones skipped)."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from lm_moe.profiling.comparison import (
    SweepSettings,
    Variant,
    batches_per_step,
    failure_reason,
    fit_command,
    require_same_learning_rate,
    require_same_settings,
)
from lm_moe.profiling.model_cost import parameter_counts
from lm_moe.profiling.models import build_from_config
from lm_moe.profiling.training_curves import curve, median_scalar, tokens_per_step

from .scripts_in_process import run_script_in_process

REPO = Path(__file__).resolve().parents[1]
LM_CONFIGS = sorted((REPO / "configs/lm").glob("*.yaml"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--model.n_layer=1", "--model.dim=32", "--model.n_head=2", "--data.block_size=32", "--data.vocab_size=512",
        "--data.max_documents=40", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=2"]


def test_every_config_matches_the_dense_ffn_cost_per_token():
    counts = {path.stem: parameter_counts(build_from_config(path)) for path in LM_CONFIGS}
    dense = counts["dense"]
    assert dense["params_active"] == dense["params_total"]
    for name, count in counts.items():
        assert count["ffn_macs_per_token"] == pytest.approx(dense["ffn_macs_per_token"], rel=0.02), name
        assert count["params_active"] <= count["params_total"]
    # top-2 of 8 experts: the router and a quarter of the expert weights.
    top2 = counts["top2"]
    experts = 4 * 8 * (2 * 256 * 512)  # 4 layers of 8 experts, D = 256, H = 512
    assert top2["params_active"] == top2["params_total"] - experts * 6 / 8


def test_validation_curve_joins_a_resumed_run(tmp_path):
    run = tmp_path / "top2"
    start = time.time()
    first = SummaryWriter(run / "version_0")  # interrupted after its validation at step 8
    first.add_scalar("val/loss", 5.0, 3, walltime=start + 10)
    first.add_scalar("val/loss", 4.0, 7, walltime=start + 20)
    first.close()
    second = SummaryWriter(run / "version_1")  # resumed from the step-8 checkpoint
    second.add_scalar("val/loss", 3.0, 11, walltime=time.time() + 15)
    second.close()
    points = curve(run)
    assert [(point.step, point.value) for point in points] == [(4, 5.0), (8, 4.0), (12, 3.0)]
    assert [round(point.seconds) for point in points] == [10, 20, 35]  # the pause between the runs left out


def test_median_of_a_logged_scalar_over_versions_leaves_warm_up_steps_out(tmp_path):
    run = tmp_path / "dense"
    for version, values in enumerate([[100.0, 10.0, 20.0], [30.0, 40.0]]):
        writer = SummaryWriter(run / f"version_{version}")
        for index, value in enumerate(values):
            writer.add_scalar("perf/train_tokens_per_sec", value, 3 * version + index)
        writer.close()
    assert median_scalar(run, "perf/train_tokens_per_sec") == 30.0  # of 100, 10, 20, 30, 40
    assert median_scalar(run, "perf/train_tokens_per_sec", from_step=1) == 25.0  # of 10, 20, 30, 40
    assert median_scalar(run, "val/loss") is None


def test_tokens_per_step_count_accumulated_batches_and_processes(tmp_path):
    config = {"data": {"batch_size": 16, "block_size": 128},
              "trainer": {"devices": [0, 1], "num_nodes": 2, "accumulate_grad_batches": 4}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert tokens_per_step(tmp_path) == 16 * 128 * 4 * 4


def test_a_sweep_with_gradient_accumulation_validates_every_val_every_optimizer_steps(tmp_path):
    preset = tmp_path / "accumulating.yaml"
    preset.write_text(yaml.safe_dump({"trainer": {"accumulate_grad_batches": 3}}))
    config = REPO / "configs/lm/dense.yaml"
    settings = SweepSettings(str(preset), max_steps=20, val_every=5, seed=0)
    assert batches_per_step(config, settings) == 3
    assert "--trainer.val_check_interval=15" in fit_command(config, tmp_path / "dense", settings, 3)
    # An override after the preset wins, as in the fit.
    overridden = SweepSettings(str(preset), 20, 5, 0, ("--trainer.accumulate_grad_batches=2",))
    assert batches_per_step(config, overridden) == 2
    plain = SweepSettings(str(REPO / "configs/trainer/cpu_quick.yaml"), 20, 5, 0)
    assert batches_per_step(config, plain) == 1


def test_failure_reason_is_the_error_line():
    traceback = "Traceback (most recent call last):\n  File \"x.py\"\nValueError: top_k must be at most 8\n"
    assert failure_reason(1, "some warning\n" + traceback) == "ValueError: top_k must be at most 8"
    assert failure_reason(2, "usage: ...\nerror: Parser key \"model\": bad\n") == "error: Parser key \"model\": bad"
    # The parser's message goes on in indented lines; the CLI's own errors are one line.
    parser_error = "usage: ...\nerror: Parser key \"model.n_layer\":\n  Expected a <class 'int'>. Got value: abc\n"
    assert failure_reason(2, parser_error) == "error: Parser key \"model.n_layer\": Expected a <class 'int'>. Got value: abc"
    cli_error = "Seed set to 0\npython -m lm_moe: error: batch_size must be a positive integer, got 0\n"
    assert failure_reason(2, cli_error) == "batch_size must be a positive integer, got 0"
    assert failure_reason(-9, "step 10\n") == "killed by signal 9: step 10"


def test_a_sweep_folder_refuses_other_settings(tmp_path):
    require_same_settings(tmp_path, SweepSettings("trainer.yaml", 100, 10, 1))
    require_same_settings(tmp_path, SweepSettings("trainer.yaml", 100, 10, 1))  # the same: resume
    with pytest.raises(ValueError, match="max_steps: 100 there, 200 now"):
        require_same_settings(tmp_path, SweepSettings("trainer.yaml", 200, 10, 1))


def test_a_variants_own_learning_rate_comes_after_the_overrides(tmp_path):
    settings = SweepSettings("trainer.yaml", 20, 5, 0, ("--model.learning_rate=0.001",))
    top2 = fit_command(REPO / "configs/lm/top2.yaml", tmp_path / "top2", settings, learning_rate=0.0014)
    assert top2.index("--model.learning_rate=0.0014") > top2.index("--model.learning_rate=0.001")
    dense = fit_command(REPO / "configs/lm/dense.yaml", tmp_path / "dense", settings)
    assert [flag for flag in dense if flag.startswith("--model.learning_rate")] == ["--model.learning_rate=0.001"]


def test_a_variant_folder_refuses_another_learning_rate(tmp_path):
    def variant(rate):
        return Variant("top2", REPO / "configs/lm/top2.yaml", tmp_path / "top2", learning_rate=rate)

    require_same_learning_rate(variant(0.0014))
    require_same_learning_rate(variant(0.0014))  # the same: resume
    with pytest.raises(ValueError, match=r"trained top2 at learning rate 0.0014, not its config's: give the same"):
        require_same_learning_rate(variant(None))
    require_same_learning_rate(Variant("dense", REPO / "configs/lm/dense.yaml", tmp_path / "dense"))
    with pytest.raises(ValueError, match=r"trained dense at learning rate its config's, not 0.003"):
        require_same_learning_rate(Variant("dense", REPO / "configs/lm/dense.yaml", tmp_path / "dense",
                                           learning_rate=0.003))


@pytest.mark.parametrize("flag, message", [
    ("topx=0.001", "--learning-rate topx=0.001: 'topx' is not a variant of this sweep (dense, top2)"),
    ("top2=-1", "--learning-rate top2=-1: the rate must be a positive number, as in top2=0.002"),
    ("top2=fast", "--learning-rate top2=fast: the rate must be a positive number"),
    ("top2", "--learning-rate top2: the rate must be a positive number"),
])
def test_compare_lm_refuses_a_bad_learning_rate(tmp_path, monkeypatch, capsys, flag, message):
    args = ["--configs", "configs/lm/dense.yaml", "configs/lm/top2.yaml", "--learning-rate", flag,
            "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as refused:
        run_script_in_process("scripts/compare_lm.py", args, monkeypatch)
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_lm_refuses_two_rates_for_one_variant(tmp_path, monkeypatch, capsys):
    args = ["--configs", "configs/lm/top2.yaml", "--learning-rate", "top2=0.001", "--learning-rate", "top2=0.002",
            "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as refused:
        run_script_in_process("scripts/compare_lm.py", args, monkeypatch)
    assert refused.value.code == 2 and "gives one variant two rates: top2=0.001 top2=0.002" in capsys.readouterr().err


def run_compare(out: Path, configs: list[Path], env: dict) -> subprocess.CompletedProcess:
    args = ["--configs", *map(str, configs), "--max-steps=8", "--val-every=4", "--threads=1", f"--out={out}",
            "--learning-rate", "top2=0.003", *TINY]
    return subprocess.run([sys.executable, str(REPO / "scripts/compare_lm.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def test_compare_lm_refuses_a_bad_override_before_training_anything(tmp_path):
    out = tmp_path / "out"
    args = ["--configs", str(REPO / "configs/lm/dense.yaml"), "--max-steps=8", f"--out={out}", "--model.n_layerz=1"]
    result = subprocess.run([sys.executable, str(REPO / "scripts/compare_lm.py"), *args],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.startswith("compare_lm.py: error: ") and result.stderr.count("\n") == 1
    assert "dense.yaml: " in result.stderr and "model.n_layerz" in result.stderr
    assert not out.exists()  # no sweep folder whose recorded settings would refuse the corrected command


def event_files(out: Path) -> dict[Path, float]:
    return {path: path.stat().st_mtime for path in out.glob("*/version_*/events.out.tfevents.*")}


def test_compare_lm_end_to_end_with_a_failure_a_resume_and_a_rerun(tmp_path):
    broken = yaml.safe_load((REPO / "configs/lm/top2.yaml").read_text())
    broken["model"]["ffn"]["init_args"]["top_k"] = 9  # more than its 8 experts
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    configs = [REPO / "configs/lm/dense.yaml", REPO / "configs/lm/top2.yaml", tmp_path / "broken.yaml"]
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}

    # An interrupted top2 run: the sweep's own fit command, stopped at step 4 of 8 (checkpoint at step 4).
    settings = SweepSettings(str((REPO / "configs/trainer/cpu_quick.yaml").resolve()), 8, 4, 1234, tuple(TINY))
    require_same_settings(out, settings)
    require_same_learning_rate(Variant("top2", configs[1], out / "top2", learning_rate=0.003))
    interrupted = fit_command(configs[1], out / "top2", settings, learning_rate=0.003) + ["--trainer.max_steps=4"]
    assert subprocess.run(interrupted, capture_output=True, env=env, cwd=REPO).returncode == 0

    result = run_compare(out, configs, env)
    assert result.returncode == 1, result.stderr[-3000:]  # 1: the broken variant failed, the others finished
    assert "dense: trained" in result.stdout and "top2: resumed from step 4" in result.stdout
    assert sorted(path.name for path in (out / "top2").glob("version_*")) == ["version_0", "version_1"]

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["variant"] for row in rows] == ["dense", "top2", "broken"]
    assert {"val_loss", "val_ppl", "params_total", "params_active", "train_tokens_per_s", "decode_tokens_per_s",
            "causality", "status", "reason"} <= set(rows[0])
    for row in rows[:2]:
        assert row["status"] == "ok" and row["steps"] == "8" and row["tokens"] == str(8 * 16 * 32)
        assert 0 < float(row["val_loss"]) < 10 and float(row["train_tokens_per_s"]) > 0
        assert float(row["decode_tokens_per_s"]) > 0 and row["causality"] == "PASS"
    assert int(rows[1]["params_active"]) < int(rows[1]["params_total"])
    assert [row["learning_rate"] for row in rows[:2]] == ["0.002", "0.003"]  # the preset's; top2's own
    assert rows[2]["status"] == "FAILED" and "top_k must be at most num_experts=8, got 9" in rows[2]["reason"]

    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {"settings", "definitions", "variants"}
    assert saved["variants"][2]["output_tail"].endswith("python -m lm_moe: error: top_k must be at most num_experts=8, got 9")
    table = (out / "table.md").read_text()
    table_rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [line.split("|")[1].strip() for line in table_rows] == ["dense", "top2", "broken"]
    assert "FAILED: top_k must be at most num_experts=8, got 9" in table_rows[2]
    for name in ("loss_vs_tokens.png", "loss_vs_time.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)

    # Again on the same folder: the finished variants are not trained again, the failed one is retried.
    before = event_files(out)
    again = run_compare(out, configs, env)
    assert again.returncode == 1, again.stderr[-3000:]
    assert "dense: skipped" in again.stdout and "top2: skipped" in again.stdout
    assert event_files(out) == before
    assert [row["variant"] for row in csv.DictReader((out / "results.csv").open())] == ["dense", "top2", "broken"]

"""The variant comparison: its cost accounting, its reading of TensorBoard logs, and
scripts/compare_lm.py end to end (seeds, a learning-rate grid, a failed variant, an interrupted run
resumed, finished runs skipped). The statistics over seeds are tested in test_seed_statistics.py."""

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from lm_moe.profiling.comparison import (
    Run,
    SweepSettings,
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
    settings = SweepSettings(str(preset), max_steps=20, val_every=5)
    assert batches_per_step(config, settings) == 3
    run = Run("dense", config, tmp_path / "dense", seed=0, steps=20, batches_per_step=3)
    assert "--trainer.val_check_interval=15" in fit_command(run, settings)
    # An override after the preset wins, as in the fit.
    overridden = SweepSettings(str(preset), 20, 5, ("--trainer.accumulate_grad_batches=2",))
    assert batches_per_step(config, overridden) == 2
    plain = SweepSettings(str(REPO / "configs/trainer/cpu_quick.yaml"), 20, 5)
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
    require_same_settings(tmp_path, SweepSettings("trainer.yaml", 100, 10))
    require_same_settings(tmp_path, SweepSettings("trainer.yaml", 100, 10))  # the same: resume
    with pytest.raises(ValueError, match="max_steps: 100 there, 200 now"):
        require_same_settings(tmp_path, SweepSettings("trainer.yaml", 200, 10))


def test_the_same_trainer_preset_in_another_checkout_resumes_the_sweep(tmp_path):
    checkouts = [tmp_path / "checkout_a", tmp_path / "checkout_b"]
    for checkout in checkouts:
        (checkout / "configs").mkdir(parents=True)
        (checkout / "configs" / "cpu_quick.yaml").write_text("trainer:\n  max_steps: 300\n")
    sweep = tmp_path / "sweep"
    require_same_settings(sweep, SweepSettings(str(checkouts[0] / "configs/cpu_quick.yaml"), 100, 10))
    require_same_settings(sweep, SweepSettings(str(checkouts[1] / "configs/cpu_quick.yaml"), 100, 10))
    (checkouts[1] / "configs" / "cpu_quick.yaml").write_text("trainer:\n  max_steps: 600\n")  # now another preset
    with pytest.raises(ValueError, match="trainer: .*checkout_a.* there, .*checkout_b.* now"):
        require_same_settings(sweep, SweepSettings(str(checkouts[1] / "configs/cpu_quick.yaml"), 100, 10))


def test_a_runs_seed_and_own_learning_rate_come_after_the_overrides(tmp_path):
    settings = SweepSettings("trainer.yaml", 20, 5, ("--model.learning_rate=0.001", "--seed_everything=7"))
    top2 = fit_command(Run("top2", REPO / "configs/lm/top2.yaml", tmp_path / "top2", 1235, 20, 0.0014), settings)
    assert top2.index("--model.learning_rate=0.0014") > top2.index("--model.learning_rate=0.001")
    assert top2.index("--seed_everything=1235") > top2.index("--seed_everything=7")
    assert "--data.shuffle_seed=1235" in top2 and "--trainer.max_steps=20" in top2
    dense = fit_command(Run("dense", REPO / "configs/lm/dense.yaml", tmp_path / "dense", 1234, 20), settings)
    assert [flag for flag in dense if flag.startswith("--model.learning_rate")] == ["--model.learning_rate=0.001"]


def test_a_run_folder_refuses_another_learning_rate(tmp_path):
    def run(name, rate):
        return Run(name, REPO / f"configs/lm/{name}.yaml", tmp_path / name, 1234, 20, learning_rate=rate)

    require_same_learning_rate(run("top2", 0.0014))
    require_same_learning_rate(run("top2", 0.0014))  # the same: resume
    with pytest.raises(ValueError, match=r"trained top2 at learning rate 0.0014, not its config's: give the same"):
        require_same_learning_rate(run("top2", None))
    require_same_learning_rate(run("dense", None))
    with pytest.raises(ValueError, match=r"trained dense at learning rate its config's, not 0.003"):
        require_same_learning_rate(run("dense", 0.003))


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


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "1234,x"], "--seeds 1234,x: give whole numbers, as in 1234,1235,1236"),
    (["--seeds", "1,1"], "--seeds 1,1 names a seed twice"),
    (["--lr-grid", "0.001,-2"], "--lr-grid 0.001,-2: give positive numbers, as in 0.0014,0.002,0.0028"),
    (["--lr-grid", "0.001", "--max-steps", "100", "--val-every", "20", "--grid-steps", "30"],
     "--val-every (20) must divide --grid-steps (30, >= 1) as well"),
    (["--reference", "top8"], "--reference top8 is not a variant of this sweep (dense, top2)"),
])
def test_compare_lm_refuses_bad_seeds_grids_and_references(tmp_path, monkeypatch, capsys, flags, message):
    args = ["--configs", "configs/lm/dense.yaml", "configs/lm/top2.yaml", *flags, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as refused:
        run_script_in_process("scripts/compare_lm.py", args, monkeypatch)
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def run_compare(out: Path, configs: list[Path], env: dict, seeds: str = "1234,1235") -> subprocess.CompletedProcess:
    args = ["--configs", *map(str, configs), "--max-steps=8", "--val-every=4", "--threads=1", f"--out={out}",
            f"--seeds={seeds}", "--lr-grid=0.001,0.004", "--grid-steps=4", "--learning-rate", "top2=0.003", *TINY]
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
    return {path: path.stat().st_mtime for path in out.glob("**/version_*/events.out.tfevents.*")}


def test_compare_lm_end_to_end_with_seeds_a_grid_a_failure_a_resume_and_a_rerun(tmp_path):
    broken = yaml.safe_load((REPO / "configs/lm/top2.yaml").read_text())
    broken["model"]["ffn"]["init_args"]["top_k"] = 9  # more than its 8 experts
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    configs = [REPO / "configs/lm/dense.yaml", REPO / "configs/lm/top2.yaml", tmp_path / "broken.yaml"]
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}

    # An interrupted top2 run: the sweep's own fit command, stopped at step 4 of 8 (checkpoint at step 4).
    settings = SweepSettings(str((REPO / "configs/trainer/cpu_quick.yaml").resolve()), 8, 4, tuple(TINY), 4)
    require_same_settings(out, settings)
    interrupted_run = Run("top2", configs[1], out / "top2" / "seed_1235", 1235, 8, 0.003)
    require_same_learning_rate(interrupted_run)
    interrupted = fit_command(interrupted_run, settings) + ["--trainer.max_steps=4"]
    assert subprocess.run(interrupted, capture_output=True, env=env, cwd=REPO).returncode == 0

    result = run_compare(out, configs, env)
    assert result.returncode == 1, result.stderr[-3000:]  # 1: the broken variant failed, the others finished
    for line in ("grid dense at 0.001: trained", "grid dense at 0.004: trained", "dense seed 1234: trained",
                 "dense seed 1235: trained", "top2 seed 1234: trained", "top2 seed 1235: resumed from step 4",
                 "grid broken at 0.001: FAILED: top_k must be at most num_experts=8, got 9"):
        assert line in result.stdout, line
    assert "grid top2" not in result.stdout  # its rate was given
    assert sorted(path.name for path in (out / "top2" / "seed_1235").glob("version_*")) == ["version_0", "version_1"]

    # The grid: every (variant, rate) run, dense's best chosen, broken's failures reported.
    grid = list(csv.DictReader((out / "lr_grid.csv").open()))
    assert [(row["variant"], row["learning_rate"], row["status"]) for row in grid] == [
        ("dense", "0.001", "ok"), ("dense", "0.004", "ok"), ("broken", "0.001", "FAILED"), ("broken", "0.004", "FAILED")]
    dense_grid = {float(row["learning_rate"]): float(row["val_loss"]) for row in grid[:2]}
    best = min(dense_grid, key=dense_grid.get)
    assert [row["chosen"] for row in grid] == [str(rate == best) for rate in dense_grid] + ["False", "False"]
    assert json.loads((out / "lr_grid.json").read_text())["chosen"] == {"dense": best, "broken": None}
    assert (out / "lr_grid.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "| dense | " in (out / "lr_grid.md").read_text()

    # A row per run, each seed trained at its variant's rate.
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert [(row["variant"], row["seed"], row["status"]) for row in runs] == [
        ("dense", "1234", "ok"), ("dense", "1235", "ok"), ("top2", "1234", "ok"), ("top2", "1235", "ok"),
        ("broken", "1234", "FAILED"), ("broken", "1235", "FAILED")]
    for row in runs[:4]:
        assert row["steps"] == "8" and row["tokens"] == str(8 * 16 * 32)
        assert 0 < float(row["val_loss"]) < 10 and float(row["train_tokens_per_s"]) > 0
        assert float(row["decode_tokens_per_s"]) > 0 and row["causality"] == "PASS"
    assert {float(row["learning_rate"]) for row in runs[:2]} == {best} and {row["learning_rate"] for row in runs[2:4]} == {"0.003"}
    assert runs[0]["val_loss"] != runs[1]["val_loss"]  # the seeds differ
    assert "no rate of the learning-rate grid trained" in runs[4]["reason"]

    # A row per variant: the mean and spread of its seeds, and its gap to dense seed by seed.
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["variant"] for row in rows] == ["dense", "top2", "broken"]
    for row, seeds in zip(rows[:2], (runs[:2], runs[2:4])):
        losses = [float(run["val_loss"]) for run in seeds]
        assert row["status"] == "ok" and row["seeds"] == "2/2"
        assert float(row["val_loss_mean"]) == pytest.approx(statistics.fmean(losses))
        assert float(row["val_loss_std"]) == pytest.approx(statistics.stdev(losses))
    gaps = [float(top2["val_loss"]) - float(dense["val_loss"]) for dense, top2 in zip(runs[:2], runs[2:4])]
    assert float(rows[1]["gap_mean"]) == pytest.approx(statistics.fmean(gaps)) and rows[1]["gap_seeds"] == "2"
    assert rows[1]["verdict"] == "undecided (2 seeds)"
    assert int(rows[1]["params_active"]) < int(rows[1]["params_total"])
    assert rows[2]["status"].startswith("FAILED: seed 1234: no rate of the learning-rate grid trained")
    assert rows[2]["seeds"] == "0/2"

    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {"settings", "seeds", "reference", "definitions", "variants", "runs"}
    assert saved["seeds"] == [1234, 1235] and saved["reference"] == "dense"
    table = (out / "table.md").read_text()
    table_rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [line.split("|")[1].strip() for line in table_rows] == ["dense", "top2", "broken"]
    assert f"{statistics.fmean(gaps):+.3f} ± {statistics.stdev(gaps):.3f}" in table_rows[1]
    for name in ("loss_vs_tokens.png", "loss_vs_time.png", "gap_vs_tokens.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)

    # Again with a third seed: the finished runs are not trained again, the third seed's are.
    before = event_files(out)
    again = run_compare(out, configs, env, seeds="1234,1235,1236")
    assert again.returncode == 1, again.stderr[-3000:]
    assert "grid dense at 0.001: skipped" in again.stdout and "dense seed 1235: skipped" in again.stdout
    assert "top2 seed 1234: skipped" in again.stdout and "top2 seed 1236: trained" in again.stdout
    assert {path: time for path, time in event_files(out).items() if path in before} == before
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["seeds"] for row in rows] == ["3/3", "3/3", "0/3"]
    assert rows[1]["verdict"] in ("lower", "higher", "tie")

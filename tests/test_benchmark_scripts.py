"""The benchmark scripts run end to end and write the results they promise (speed is not judged here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .scripts_in_process import run_script_in_process

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, cache_dir: Path) -> str:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache_dir)}  # keep the user's datasets cache untouched
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True, timeout=600, cwd=REPO, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_layers_prints_and_writes_every_comparison(tmp_path):
    out = tmp_path / "layers.json"
    printed = run_script("bench_layers.py", "--quick", "--batch=3", "--repeats=2", "--warmup=1", f"--json={out}",
                         cache_dir=tmp_path)
    written = json.loads(out.read_text())
    assert {key: written["settings"][key] for key in ("batch", "seq", "dim", "quick")} == {
        "batch": 3, "seq": 256, "dim": 256, "quick": True}
    assert "B=3, T=256, D=256" in printed
    results = written["results"]
    assert [row["layer"].split()[0] for row in results] == ["TopKMoE", "SoftMoE", "SoftMoE"]
    for row in results:
        assert row["ratio"] > 0 and row["ratio"] == row["layer_ms"] / row["baseline_ms"]
        assert f"{row['ratio']:.2f}" in printed


def test_bench_train_compares_lightning_with_a_bare_loop(tmp_path):
    out = tmp_path / "train.json"
    args = ["-c", "configs/lm/dense.yaml", "-c", "configs/lm/top2.yaml", "--steps=3", "--warmup=1", "--rounds=1"]
    printed = run_script("bench_train.py", *args, f"--json={out}", cache_dir=tmp_path)
    ratios = json.loads(out.read_text())["ratios"]
    assert set(ratios) == {"dense: Lightning / bare loop", "top2: Lightning / bare loop", "top2 / dense"}
    assert all(ratio > 0 for ratio in ratios.values())
    assert "dense: Lightning / bare loop" in printed


def test_bench_decode_reports_cached_and_recomputed_time_per_context(tmp_path):
    out = tmp_path / "decode.json"
    args = ["-c", "configs/lm/dense.yaml", "-c", "configs/lm/top2.yaml", "--contexts", "8", "16", "--steps=2",
            "--repeats=1", f"--json={out}"]
    printed = run_script("bench_decode.py", *args, cache_dir=tmp_path)
    rows = json.loads(out.read_text())
    assert [(row["config"], row["context"]) for row in rows] == [("dense", 8), ("dense", 16), ("top2", 8), ("top2", 16)]
    assert all(row["speedup"] == row["recompute_ms_per_step"] / row["cached_ms_per_step"] for row in rows)
    assert "cache speed-up" in printed


def test_bench_vit_compares_soft_moe_with_dense(tmp_path):
    out = tmp_path / "vit.json"
    args = ["-c", "configs/vit/dense.yaml", "-c", "configs/vit/soft_moe.yaml", "--steps=3", "--warmup=1", "--rounds=1"]
    printed = run_script("bench_vit.py", *args, f"--json={out}", cache_dir=tmp_path)
    summary = json.loads(out.read_text())
    assert set(summary["ratios"]) == {"soft_moe / dense"}
    assert summary["ratios"]["soft_moe / dense"] == summary["median"]["soft_moe"] / summary["median"]["dense"]
    assert "soft_moe / dense" in printed


@pytest.mark.slow  # five `fit` runs, two of them 2-process (DDP, expert parallel), each starting Python anew: minutes
def test_bench_scaling_compares_precisions_ddp_and_expert_parallel_through_the_cli(tmp_path):
    out = tmp_path / "scaling.json"
    args = ["-c", "configs/lm/top2.yaml", "--expert-parallel", "--steps=3", "--warmup=1", "--rounds=1", "--batch=2",
            f"--json={out}"]
    printed = run_script("bench_scaling.py", *args, cache_dir=tmp_path)
    summary = json.loads(out.read_text())
    assert set(summary["median"]) == {"32-true", "bf16-mixed", "1 process, 2 threads", "2-process DDP, 1 thread each",
                                      "2-process expert parallel, 1 thread each"}
    ddp = summary["median"]["2-process DDP, 1 thread each"] / summary["median"]["1 process, 2 threads"]
    assert summary["ratios"]["2-process DDP / 1 process"] == ddp
    ep = summary["median"]["2-process expert parallel, 1 thread each"] / summary["median"]["2-process DDP, 1 thread each"]
    assert summary["ratios"]["expert parallel / DDP"] == ep > 0
    assert "bf16-mixed / 32-true" in printed and "expert parallel / DDP" in printed


@pytest.mark.slow  # seven ViTs built and trained for two steps: about 30 s
def test_bench_vit_times_the_soft_moe_sweep_settings_beside_dense(tmp_path):
    out = tmp_path / "sweep_timing.json"
    printed = run_script("bench_vit.py", "--soft-moe-sweep", "--steps=2", "--warmup=1", "--rounds=1", f"--json={out}",
                         cache_dir=tmp_path)
    summary = json.loads(out.read_text())
    settings = ["E4_P8", "E8_P4", "E16_P2", "E32_P1", "E32_P2", "E32_P4"]  # experts at 32 slots, then P at 32 experts
    assert list(summary["median"]) == ["dense", *settings]
    assert list(summary["ratios"]) == [f"{name} / dense" for name in settings]
    assert all(summary["ratios"][f"{name} / dense"] == summary["median"][name] / summary["median"]["dense"]
               for name in settings)
    assert "E32_P4 / dense" in printed


def test_bench_expert_parallel_times_the_all_to_all_of_each_rank(tmp_path):
    out = tmp_path / "ep.json"
    printed = run_script("bench_expert_parallel.py", "-c", "configs/lm/top2.yaml", "--steps=3", "--warmup=1", "--batch=2",
                         f"--json={out}", cache_dir=tmp_path)
    ranks = json.loads(out.read_text())["ranks"]
    assert [rank["experts_held"] for rank in ranks] == [[4, 4, 4, 4]] * 2  # half of 8 experts, every block
    for rank in ranks:
        # The profiler found the exchanges: the count exchange and the rows' four trips in 4 layers take time.
        assert 0 < rank["all_to_all_ms"] < rank["step_ms"]
        assert rank["all_to_all_share"] == rank["all_to_all_ms"] / rank["step_ms"]
        assert rank["tokens_per_step"] == 2 * 128
    assert "all-to-all share" in printed


@pytest.mark.slow  # three `fit` runs and the layer timings: about a minute
def test_gpu_check_logic_runs_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    args = ["--out", str(out), "--accelerator", "cpu", "--steps", "3", "--warmup", "1", "--tiny", "-c", "configs/lm/dense.yaml",
            "-c", "configs/lm/top2.yaml", "--batch", "2", "--seq", "16", "--repeats", "2"]
    printed = run_script("gpu_check.py", *args, cache_dir=tmp_path)
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["device"] == "cpu"
    assert set(results["bf16_tokens_per_s"]) == set(results["layer_ms_bf16"]) == {"dense", "top2"}
    assert all(value > 0 for value in [*results["bf16_tokens_per_s"].values(), *results["layer_ms_bf16"].values()])
    assert results["fp16"]["top2_tokens_per_s"] > 0 and 0 < results["fp16"]["top2_final_train_loss"] < 10
    assert "| top2" in printed and "16-mixed top2" in printed


@pytest.mark.parametrize("script, args, message", [
    ("bench_layers.py", ["--batch=0"], "--batch must be positive, got 0"),
    ("bench_decode.py", ["-c", "configs/vit/dense.yaml"], "decoding is for language-model configs"),
    ("bench_scaling.py", ["-c", "configs/lm/nope.yaml"], "no language-model config at configs/lm/nope.yaml"),
    ("gpu_check.py", ["--steps", "5", "--warmup", "5"], "--warmup must be in [0, --steps), got 5 with --steps 5"),
    ("gpu_check.py", [], "no GPU here (torch.cuda.is_available() is False): give --accelerator cpu"),
    ("bench_expert_parallel.py", ["-c", "configs/lm/dense.yaml"], "no MoE layer that supports expert parallelism"),
    ("bench_expert_parallel.py", ["--steps=2", "--warmup=2"], "--warmup must be in [0, --steps), got 2 with --steps 2"),
    ("bench_scaling.py", ["--batch=0"], "--rounds and --batch must be >= 1, got 2 and 0"),
    ("bench_train.py", ["--rounds=0"], "--rounds must be >= 1, got 0"),
    ("bench_train.py", ["-c", "configs/vit/dense.yaml"], "configs of task lm that exist; not: configs/vit/dense.yaml"),
    ("bench_vit.py", ["--soft-moe-sweep", "-c", "configs/vit/dense.yaml"], "--soft-moe-sweep times the sweep's settings"),
    ("bench_vit.py", ["-c", "configs/lm/dense.yaml"], "configs of task vit that exist; not: configs/lm/dense.yaml"),
    ("compare_lm.py", ["--trainer=configs/trainer/nope.yaml"], "no trainer preset at configs/trainer/nope.yaml"),
    ("compare_lm.py", ["--out=README.md"], "--out README.md is a file, not a folder"),
    ("profile_inference.py", ["--device=nope"], "device 'nope' is not usable here"),
])
def test_scripts_refuse_bad_options_before_any_work(script, args, message, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:  # any other exception fails the test
        run_script_in_process(f"scripts/{script}", args, monkeypatch)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

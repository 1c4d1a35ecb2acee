"""Every entry point refuses bad input the same way: one `<prog>: error: ...` line on stderr that
names the bad value, exit status 2, no traceback, before any work; the causality report's exit
status tells a leak (1) from bad input (2) and from a crash (3); a failed profiling run leaves an
earlier run's files as they were."""

import runpy
import sys
from pathlib import Path

import pytest

from lm_moe.causality import report

from .scripts_in_process import run_script_in_process

REPO = Path(__file__).resolve().parents[1]
TOP2 = str(REPO / "configs/lm/top2.yaml")
TINY_LM = ["--model.n_layer=1", "--model.dim=32", "--model.n_head=2", "--data.vocab_size=512", "--data.block_size=32"]


@pytest.fixture
def bad(tmp_path) -> dict[str, str]:
    """Paths of bad input: a missing file, an unreadable checkpoint, configs with an unknown key and class."""
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00not a checkpoint" * 64)
    (tmp_path / "unknown_key.yaml").write_text("model:\n  n_layerz: 2\n")
    (tmp_path / "unknown_class.yaml").write_text("model:\n  ffn:\n    class_path: lm_moe.layers.TopKMoEE\n")
    return {"missing": str(tmp_path / "missing.ckpt"), "garbage": str(tmp_path / "garbage.ckpt"),
            "missing_config": str(tmp_path / "missing.yaml"), "key": str(tmp_path / "unknown_key.yaml"),
            "class": str(tmp_path / "unknown_class.yaml")}


def run_entry_point(entry: str, args: list[str], monkeypatch) -> int:
    """`python -m <module> args` or `python scripts/<name>.py args`, in this process: its exit status."""
    try:
        if entry.startswith("scripts/"):
            run_script_in_process(entry, args, monkeypatch)
        else:
            monkeypatch.setattr(sys, "argv", [entry, *args])
            runpy.run_module(entry, run_name="__main__", alter_sys=False)
    except SystemExit as stop:
        return stop.code
    return 0


# (entry point, its name in the error line, arguments with `{name}` for a bad path, what the error names)
CASES = {
    "fit missing config": ("lm_moe", "python -m lm_moe", ["fit", "-c", "{missing_config}"], "missing.yaml"),
    "fit unreadable checkpoint": ("lm_moe", "python -m lm_moe", ["fit", "-c", TOP2, "--ckpt_path", "{garbage}"], "garbage.ckpt"),
    "validate unknown key": ("lm_moe", "python -m lm_moe", ["validate", "-c", TOP2, "-c", "{key}"], "n_layerz"),
    "fit unknown class": ("lm_moe", "python -m lm_moe", ["fit", "-c", TOP2, "-c", "{class}"], "TopKMoEE"),
    "fit out of range": ("lm_moe", "python -m lm_moe", ["fit", "-c", TOP2, "--model.dim=0"], "dim must be a positive integer, got 0"),
    "sample missing checkpoint": ("lm_moe.sample", "python -m lm_moe.sample", ["{missing}"], "missing.ckpt"),
    "sample unreadable checkpoint": ("lm_moe.sample", "python -m lm_moe.sample", ["{garbage}"], "garbage.ckpt"),
    "sample unknown option": ("lm_moe.sample", "python -m lm_moe.sample", ["{missing}", "--topk", "3"], "--topk"),
    "sample out of range": ("lm_moe.sample", "python -m lm_moe.sample", ["{missing}", "--top_p", "3"], "top_p must be a number in (0, 1]"),
    "causality missing checkpoint": ("lm_moe.causality", "python -m lm_moe.causality", ["--ckpt_path", "{missing}"], "missing.ckpt"),
    "causality unreadable checkpoint": ("lm_moe.causality", "python -m lm_moe.causality", ["--ckpt_path", "{garbage}"], "garbage.ckpt"),
    "causality unknown key": ("lm_moe.causality", "python -m lm_moe.causality", ["-c", TOP2, "-c", "{key}"], "n_layerz"),
    "causality unknown class": ("lm_moe.causality", "python -m lm_moe.causality", ["-c", TOP2, "-c", "{class}"], "TopKMoEE"),
    "causality out of range": ("lm_moe.causality", "python -m lm_moe.causality", ["-c", TOP2, "--seeds", "0"], "--seeds must be positive, got 0"),
    "export missing checkpoint": ("lm_moe.export", "python -m lm_moe.export", ["{missing}", "{missing}.out"], "missing.ckpt"),
    "export unreadable checkpoint": ("lm_moe.export", "python -m lm_moe.export", ["{garbage}", "{garbage}.out"], "garbage.ckpt"),
    "export unknown option": ("lm_moe.export", "python -m lm_moe.export", ["{garbage}", "out", "--ovewrite"], "--ovewrite"),
    "profile missing checkpoint": ("scripts/profile_inference.py", "profile_inference.py", ["--ckpt_path", "{missing}"], "missing.ckpt"),
    "profile unreadable checkpoint": ("scripts/profile_inference.py", "profile_inference.py", ["--ckpt_path", "{garbage}"], "garbage.ckpt"),
    "profile unknown key": ("scripts/profile_inference.py", "profile_inference.py", ["-c", "{key}"], "n_layerz"),
    "profile unknown class": ("scripts/profile_inference.py", "profile_inference.py", ["-c", TOP2, "-c", "{class}"], "TopKMoEE"),
    "profile out of range": ("scripts/profile_inference.py", "profile_inference.py", ["-c", TOP2, "--repeats", "0"], "--repeats"),
    "compare missing config": ("scripts/compare_lm.py", "compare_lm.py", ["--configs", "{missing_config}"], "missing.yaml"),
    "compare unknown key": ("scripts/compare_lm.py", "compare_lm.py", ["--configs", "{key}"], "n_layerz"),
    "compare out of range": ("scripts/compare_lm.py", "compare_lm.py", ["--max-steps", "4", "--val-every", "3"], "--val-every (3) must divide"),
    "bench_train missing config": ("scripts/bench_train.py", "bench_train.py", ["-c", "{missing_config}"], "missing.yaml"),
    "bench_train unknown key": ("scripts/bench_train.py", "bench_train.py", ["-c", "{key}"], "n_layerz"),
    "bench_train out of range": ("scripts/bench_train.py", "bench_train.py", ["--rounds", "0"], "--rounds must be >= 1, got 0"),
    "bench_vit missing config": ("scripts/bench_vit.py", "bench_vit.py", ["-c", "{missing_config}"], "missing.yaml"),
    "bench_decode missing config": ("scripts/bench_decode.py", "bench_decode.py", ["-c", "{missing_config}"], "missing.yaml"),
    "bench_decode unknown class": ("scripts/bench_decode.py", "bench_decode.py", ["-c", "{class}"], "TopKMoEE"),
    "bench_decode out of range": ("scripts/bench_decode.py", "bench_decode.py", ["--batch", "0"], "must be positive"),
    "bench_scaling missing config": ("scripts/bench_scaling.py", "bench_scaling.py", ["-c", "{missing_config}"], "missing.yaml"),
    "bench_scaling unknown key": ("scripts/bench_scaling.py", "bench_scaling.py", ["-c", "{key}"], "n_layerz"),
    "bench_layers out of range": ("scripts/bench_layers.py", "bench_layers.py", ["--batch", "0"], "--batch must be positive, got 0"),
    "reference_pair unknown model": ("scripts/reference_pair.py", "reference_pair.py", ["--models", "gpt4"], "'gpt4' is neither"),
    "reference_pair unknown key": ("scripts/reference_pair.py", "reference_pair.py", ["--models", "{key}"], "n_layerz"),
    "reference_pair out of range": ("scripts/reference_pair.py", "reference_pair.py", ["--max-steps", "600", "--val-every", "7"], "--val-every (7) must divide"),
    "bench_layers unknown option": ("scripts/bench_layers.py", "bench_layers.py", ["--batches", "2"], "--batches"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_error_line_with_status_2(case, bad, monkeypatch, capsys):
    entry, prog, args, named = CASES[case]
    args = [arg.format(**bad) for arg in args]
    assert run_entry_point(entry, args, monkeypatch) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Seed set to" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert named in lines[0] and "Traceback" not in err


LEAKY = "model:\n  allow_noncausal: true\n  ffn:\n    class_path: lm_moe.layers.SoftMoE\n    init_args: {hidden_dim: 32, num_experts: 4}\n"


def test_the_causality_report_exits_0_for_no_leak_1_for_a_leak_2_for_bad_input_3_for_a_crash(tmp_path, monkeypatch, capsys):
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text(LEAKY)
    quick = [*TINY_LM, "--seeds", "1"]
    assert run_entry_point("lm_moe.causality", ["-c", TOP2, *quick], monkeypatch) == report.NO_LEAK
    assert run_entry_point("lm_moe.causality", ["-c", TOP2, "-c", str(leaky), *quick], monkeypatch) == report.LEAK
    assert run_entry_point("lm_moe.causality", ["-c", TOP2, "--length=1"], monkeypatch) == report.BAD_INPUT
    capsys.readouterr()

    def crash(self, on_result=None):
        raise RuntimeError("an internal failure")

    monkeypatch.setattr(report.Checker, "results", crash)
    assert run_entry_point("lm_moe.causality", ["-c", TOP2, *quick], monkeypatch) == report.INTERNAL_FAILURE
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal failure" in err  # a crash keeps its traceback


def profile(out: Path, monkeypatch, *extra: str) -> int:
    return run_entry_point("scripts/profile_inference.py", [
        "-c", TOP2, *TINY_LM, "--batch-sizes", "1", "--contexts", "8", "--new-tokens", "2", "--warmup", "0",
        "--repeats", "1", "--out", str(out), *extra], monkeypatch)


def test_a_failed_profiling_run_leaves_an_earlier_run_s_files_as_they_were(tmp_path, monkeypatch, capsys):
    out = tmp_path / "inference"
    assert profile(out, monkeypatch, "--trace") == 0
    earlier = {path.name: path.read_bytes() for path in out.iterdir()}
    assert "trace_top2.json" in earlier and "results.csv" in earlier

    assert profile(out, monkeypatch) == 2  # refused before any work: it holds an earlier run's results
    assert "--overwrite" in capsys.readouterr().err

    import lm_moe.profiling.tables as tables

    def broken_write_csv(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tables, "write_csv", broken_write_csv)  # the script imports it from there as it starts
    with pytest.raises(OSError, match="disk full"):
        profile(out, monkeypatch, "--overwrite")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == earlier
    assert sorted(path.name for path in tmp_path.iterdir()) == ["inference"]  # no staging folder left
    monkeypatch.undo()

    assert profile(out, monkeypatch, "--overwrite") == 0  # replaced whole: the earlier trace is gone
    assert "trace_top2.json" not in {path.name for path in out.iterdir()}

"""scripts/reference_pair.py end to end: a public model and an lm_moe config in the same loop (slow:
it tokenises the default corpus; the Hugging Face model needs the optional extra)."""

import json

import pytest

from .scripts_in_process import run_script_in_process


@pytest.mark.slow
def test_reference_pair_trains_a_public_model_and_a_config_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "pair"
    args = ["--models", "hf_mixtral", "configs/lm/top2.yaml", "--max-steps", "2", "--val-every", "1",
            "--val-batches", "1", "--batch-size", "2", "--block-size", "16", "--threads", "1", "--out", str(out)]
    with pytest.raises(SystemExit) as finished:
        run_script_in_process("scripts/reference_pair.py", args, monkeypatch)
    assert finished.value.code == 0
    for name in ("hf_mixtral", "top2"):
        record = json.loads((out / f"{name}_seed1234.json").read_text())
        assert sorted(record["curve"], key=int) == ["1", "2"] and record["parameters"] > 0
        assert all(2 < loss < 10 for loss in record["curve"].values())
    assert "| top2 | 1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_script_in_process("scripts/reference_pair.py", args, monkeypatch)
    assert capsys.readouterr().out.count("done earlier, skipped") == 2

"""The leakage suite on the model of every config under configs/lm/, and with known-leaky FFNs."""

import json
from functools import partial
from pathlib import Path

import pytest

from lm_moe import cli
from lm_moe.causality import Checker, CheckSettings, ModelSubject
from lm_moe.causality.report import main as causality_report
from lm_moe.layers import SoftMoE
from lm_moe.models import GPT

REPO = Path(__file__).resolve().parents[2]
LM_CONFIGS = sorted((REPO / "configs" / "lm").glob("*.yaml"))
TINY = ["--model.n_layer=2", "--model.dim=32", "--model.n_head=2", "--model.dense_hidden_dim=64",
        "--data.vocab_size=300", "--data.block_size=256", "--trainer.logger=false"]


def tiny_model(config: Path) -> GPT:
    return cli.main(["-c", str(config), *TINY], run=False).model.model.double()


@pytest.mark.parametrize("config", LM_CONFIGS, ids=[path.stem for path in LM_CONFIGS])
def test_model_of_every_lm_config_passes_every_check(config):
    results = Checker(ModelSubject(tiny_model(config))).results()
    leaks = [f"{r.check} ({r.mode}): {r.max_diff:.2e}" for r in results if r.leaks]
    assert not leaks, leaks


def test_model_with_naive_soft_moe_is_reported_leaking():
    model = GPT(50, 32, n_layer=2, n_head=2, dim=16, ffn=partial(SoftMoE, hidden_dim=16, num_experts=4),
                allow_noncausal=True).double()
    verdicts = {(r.check, r.mode): r.verdict for r in Checker(ModelSubject(model)).results()}
    assert verdicts[("future perturbation", "eval")] == "LEAK"
    assert verdicts[("jacobian", "eval")] == "LEAK"


def test_report_command_prints_a_table_and_exits_by_verdict(tmp_path, capsys):
    config = tmp_path / "leaky.yaml"
    config.write_text(
        "model:\n  allow_noncausal: true\n  ffn:\n    class_path: lm_moe.layers.SoftMoE\n"
        "    init_args: {hidden_dim: 32, num_experts: 4}\n"
    )
    assert causality_report(["-c", str(REPO / "configs/lm/top2.yaml"), "-c", str(config), *map(str, TINY)]) == 1
    printed = capsys.readouterr().out
    assert "future perturbation" in printed and "LEAK" in printed
    out = tmp_path / "report.json"
    assert causality_report(["-c", str(REPO / "configs/lm/top2.yaml"), *TINY, f"--json={out}"]) == 0
    printed = capsys.readouterr().out
    assert "no leak found" in printed and "--model.n_layer=2" in printed  # the title names the overrides
    rows = json.loads(out.read_text())  # strict JSON: a difference not measured is null, not NaN
    padding = next(row for row in rows if row["check"] == "padding")
    assert padding == {"check": "padding", "mode": "eval", "max_diff": None, "verdict": "n/a",
                       "note": "no padding mask; right padding is the future"}
    assert all(isinstance(row["max_diff"], float) for row in rows if row["verdict"] != "n/a")


@pytest.mark.parametrize("length, message", [(1, "at least 2, got 1"), (300, r"longer than the model's context \(block_size=256\)")])
def test_a_length_with_nothing_to_check_or_past_the_context_is_refused(length, message):
    with pytest.raises(ValueError, match=message):
        Checker(ModelSubject(tiny_model(LM_CONFIGS[0])), CheckSettings(length=length))


def test_report_command_refuses_a_length_of_one(capsys):
    with pytest.raises(SystemExit):
        causality_report(["-c", str(REPO / "configs/lm/top2.yaml"), "--length=1"])
    assert "--length must be 0 (chosen from the model) or at least 2, got 1" in capsys.readouterr().err

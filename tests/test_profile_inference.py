"""The inference profiler: its measurements on tiny models, and scripts/profile_inference.py end to end."""

import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from lm_moe.lit.language_model import LanguageModel
from lm_moe.models.gpt import GPT
from lm_moe.models.vit import ViT
from lm_moe.profiling.inference import Decoder, measure_decoding, measure_images, round_up
from lm_moe.profiling.memory import peak_memory_mb, tensor_mb
from lm_moe.profiling.models import variant_names

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_gpt(block_size: int = 32) -> GPT:
    return GPT(vocab_size=64, block_size=block_size, n_layer=2, n_head=2, dim=16).eval()


def test_peak_memory_counts_what_the_run_allocates_not_what_was_there_before():
    before = torch.zeros(4 * 2**20)  # 16 MiB alive before the run: not counted

    def run():
        x = torch.ones(2**20)  # 4 MiB ...
        y = x + 1  # ... and 4 MiB more at the peak
        return float(y[0])

    peak = peak_memory_mb(run, CPU)
    assert 8 <= peak < 12
    assert before.numel()  # kept alive through the measurement


def test_peak_memory_ignores_what_earlier_measurements_left():
    kept = []
    assert peak_memory_mb(lambda: kept.append(torch.ones(2**22)), CPU) >= 16  # 16 MiB outlive the measurement
    kept.clear()  # and are freed between measurements, where the profiler does not see it
    assert 4 <= peak_memory_mb(lambda: torch.ones(2**20).sum(), CPU) < 8


def test_cache_size_is_the_kv_buffers_of_the_decoded_length():
    model = tiny_gpt()
    decoder = Decoder(model, batch=3, context=10, new_tokens=5, device=CPU, dtype="fp32")
    decoder.run()
    kv_bytes = 2 * model.n_layer * 3 * (10 + 5) * 16 * 4  # keys and values, [B, H, L, hd] fp32 per layer
    assert tensor_mb(decoder.cache) * 2**20 == kv_bytes


def test_measure_decoding_reports_consistent_rates():
    result = measure_decoding(tiny_gpt(), batch=2, context=8, new_tokens=4, device=CPU, warmup=1, repeats=2)
    assert (result.batch, result.context, result.new_tokens) == (2, 8, 4)
    assert result.prefill_ms > 0 and result.decode_ms_per_step > 0 and result.peak_mb > 0
    assert result.decode_tokens_per_s == pytest.approx(2 / (result.decode_ms_per_step / 1e3))
    timing_only = measure_decoding(tiny_gpt(), batch=2, context=8, new_tokens=4, device=CPU, memory=False)
    assert timing_only.peak_mb is None and timing_only.cache_mb is None


def test_bf16_decoding_keeps_a_bf16_cache():
    fp32 = measure_decoding(tiny_gpt(), 2, 8, 4, CPU, "fp32", warmup=0, repeats=1)
    bf16 = measure_decoding(tiny_gpt(), 2, 8, 4, CPU, "bf16", warmup=0, repeats=1)
    assert bf16.cache_mb == pytest.approx(fp32.cache_mb / 2)


def test_decoding_refuses_a_context_longer_than_the_model_takes():
    with pytest.raises(ValueError, match="exceed the model's block_size 32"):
        measure_decoding(tiny_gpt(), batch=1, context=30, new_tokens=4, device=CPU)


def test_measure_images_on_a_tiny_vit():
    vit = ViT(num_classes=10, image_size=8, channels=1, patch_size=4, dim=16, depth=2, n_head=2).eval()
    result = measure_images(vit, batch=4, device=CPU, warmup=0, repeats=2)
    assert result.images_per_s == pytest.approx(4 / (result.forward_ms / 1e3))
    assert result.peak_mb > 0


def test_round_up_to_the_group_size():
    assert [round_up(batch, 4) for batch in (1, 4, 5, 8)] == [4, 4, 8, 8]


def test_variant_names_tell_runs_and_versions_apart():
    assert variant_names("runs/top2/version_3/checkpoints/best-300.ckpt") == [
        "top2", "top2_version_3", "top2_version_3_best-300"]
    assert variant_names("configs/vit/dense.yaml") == ["dense", "vit_dense"]
    assert variant_names("elsewhere/checkpoints/model.ckpt") == ["model", "checkpoints_model"]


def shrunk_config(source: Path, folder: Path, model: dict, data: dict | None = None, name: str | None = None) -> Path:
    """A copy of a repository config with smaller settings."""
    config = yaml.safe_load(source.read_text())
    config["model"].update(model)
    config["data"].update(data or {})
    path = folder / f"{name or source.stem}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_checkpoint(folder: Path) -> Path:
    """A checkpoint in the layout fit writes (runs/<name>/version_0/checkpoints/), block_size 24."""
    module = LanguageModel(vocab_size=64, block_size=24, n_layer=1, n_head=2, dim=16)
    path = folder / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    hyper_parameters = {**module.hparams, "sampling": asdict(module.sampling)}  # as fit stores them
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hyper_parameters,
                "pytorch-lightning_version": pl.__version__}, path)
    return path


def test_profile_inference_script_end_to_end(tmp_path):
    small_lm, small_vocab = {"n_layer": 1, "dim": 32, "n_head": 2}, {"vocab_size": 512}
    bad_ffn = {"class_path": "lm_moe.layers.TopKMoE", "init_args": {"hidden_dim": 64, "num_experts": 4, "top_k": 9}}
    small_vit = {"depth": 2, "dim": 32, "n_head": 2, "patch_size": 7, "dense_hidden_dim": 64}
    lm, vit = REPO / "configs/lm", REPO / "configs/vit"
    configs = [
        shrunk_config(lm / "dense.yaml", tmp_path, small_lm, small_vocab),
        shrunk_config(lm / "mixture_of_tokens.yaml", tmp_path, small_lm, small_vocab),
        shrunk_config(lm / "top2.yaml", tmp_path, {**small_lm, "ffn": bad_ffn}, small_vocab, name="broken"),
        shrunk_config(vit / "soft_moe.yaml", tmp_path, small_vit, name="vit_soft_moe"),
    ]
    checkpoint = tiny_checkpoint(tmp_path)
    out = tmp_path / "out"
    args = [arg for config in configs for arg in ("-c", str(config))] + [
        "--ckpt_path", str(checkpoint), "--batch-sizes", "1", "2", "--contexts", "8", "24", "--new-tokens", "4",
        "--warmup", "0", "--repeats", "1", "--threads", "1", "--trace", "--out", str(out)]
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "scripts/profile_inference.py"), *args],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 1, result.stderr[-3000:]  # 1: the broken config failed, the others ran

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {"variant", "batch", "context", "prefill_ms", "decode_tokens_per_s", "images_per_s", "peak_mb", "cache_mb",
            "status", "note"} <= set(rows[0])
    by_variant = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    assert list(by_variant) == ["dense", "mixture_of_tokens", "broken", "vit_soft_moe", "tiny"]
    assert [(r["batch"], r["context"], r["status"]) for r in by_variant["dense"]] == [
        ("1", "8", "ok"), ("1", "24", "ok"), ("2", "8", "ok"), ("2", "24", "ok")]
    assert all(float(r["decode_tokens_per_s"]) > 0 and float(r["prefill_ms"]) > 0 for r in by_variant["dense"])
    # Mixture of Tokens decodes its group of 4 in lock-step: batch 1 and 2 become 4, and the table says so.
    assert {r["batch"] for r in by_variant["mixture_of_tokens"]} == {"4"}
    assert all("rounded up" in r["note"] for r in by_variant["mixture_of_tokens"])
    [broken] = by_variant["broken"]
    assert broken["status"] == "FAILED" and "top_k" in broken["note"]
    assert [(r["batch"], r["status"]) for r in by_variant["vit_soft_moe"]] == [("1", "ok"), ("2", "ok")]
    assert all(float(r["images_per_s"]) > 0 for r in by_variant["vit_soft_moe"])
    # The checkpoint's block_size 24 fits context 8 + 4 new tokens, not 24 + 4.
    assert [r["status"] for r in by_variant["tiny"]] == ["ok", "skipped", "ok", "skipped"]

    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["dtype"] == "fp32" and saved["settings"]["threads"] == 1
    assert len(saved["rows"]) == len(rows)
    table = (out / "table.md").read_text()
    table_rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(table_rows) == len(rows)
    assert all(line.count("|") == table_rows[0].count("|") for line in table_rows)
    assert table_rows[0] in result.stdout  # the table is printed too
    assert (out / "chart.png").read_bytes().startswith(PNG_SIGNATURE)
    for name in ("dense", "mixture_of_tokens", "tiny"):
        assert json.loads((out / f"trace_{name}.json").read_text())["traceEvents"]
    assert not (out / "trace_vit_soft_moe.json").exists()  # image classifiers do not decode


@pytest.mark.parametrize("batch, width", [(4, 2816), (8, 3712)])
def test_the_decode_controls_read_the_ffn_bytes_of_a_top2_step(batch, width):
    # docs/benchmarks.md compares top2's decoding with a dense model whose MLP is as wide as the
    # experts a top-2 step of `batch` tokens touches on average under uniform routing.
    top2 = yaml.safe_load((REPO / "configs/lm/top2.yaml").read_text())["model"]
    experts = top2["ffn"]["init_args"]
    E, k, H = experts["num_experts"], experts["top_k"], experts["hidden_dim"]
    touched = E * (1 - (1 - k / E) ** batch)
    control = yaml.safe_load((REPO / f"docs/inference/configs/dense_width_{width}.yaml").read_text())["model"]
    assert control["dense_hidden_dim"] == round(touched * H / 64) * 64 == width
    dense = yaml.safe_load((REPO / "configs/lm/dense.yaml").read_text())["model"]
    assert {key: value for key, value in control.items() if key != "dense_hidden_dim"} == \
        {key: value for key, value in dense.items() if key != "dense_hidden_dim"}

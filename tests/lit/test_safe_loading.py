"""Opening a checkpoint never runs code from it: a crafted pickle is refused by every entry point
that reads checkpoints, before anything in it runs; lm_moe's own checkpoints hold nothing else
than what the loader allows; an export folder holds the checkpoint's weights bit for bit."""

import pathlib
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lm_moe import cli, export, sample
from lm_moe.causality import report
from lm_moe.lit.checkpoints import best_checkpoint
from lm_moe.lit.image_classifier import ImageClassifier
from lm_moe.lit.language_model import LanguageModel
from lm_moe.lit.safe_loading import UnsafeCheckpointError, foreign_callables, load_checkpoint_file
from lm_moe.lit.strategies import BlockFSDPStrategy
from lm_moe.lit.trained_model import load_trained_module, read_trained
from lm_moe.lit.weights_export import CONFIG_FILE, WEIGHTS_FILE, read_export
from lm_moe.profiling import comparison

from ..scripts_in_process import run_script_in_process
from . import lm_runs, vit_runs

REPO = Path(__file__).resolve().parents[2]
LM_CONFIG = REPO / "configs/lm/top2.yaml"


class CreatesFile:
    """Unpickled, it creates a file: the payload of a crafted checkpoint."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """last.ckpt of tiny runs: a top-2 LM in fp32, one in bf16 weights (bf16-true), a Soft MoE ViT."""
    work = tmp_path_factory.mktemp("work")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        lm_runs.fit(LM_CONFIG, cache)
        lm_runs.fit(LM_CONFIG, cache, "--trainer.precision=bf16-true", "--trainer.logger.init_args.name=top2_bf16")
        vit_runs.fit(REPO / "configs/vit/soft_moe.yaml", cache)
    runs = {"lm": "top2", "lm_bf16": "top2_bf16", "vit": "vit_soft_moe"}
    return {key: work / "runs" / name / "version_0/checkpoints/last.ckpt" for key, name in runs.items()}


def with_extra_object(source: Path, path: Path, extra, protocol: int = 2) -> Path:
    """A copy of checkpoint `source` at `path` that also holds `extra` (in a callback's state)."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["callbacks"]["extra"] = extra
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path, pickle_protocol=protocol)
    return path


@pytest.fixture(params=[2, 4], ids=["protocol2", "protocol4"])
def crafted(trained, tmp_path, request) -> tuple[Path, Path]:
    """A real checkpoint plus a payload that would create a file; (checkpoint, that file). Pickle
    protocol 4 names the payload's function by STACK_GLOBAL instead of GLOBAL."""
    marker = tmp_path / "payload-ran"
    path = with_extra_object(trained["lm"], tmp_path / "crafted" / "last.ckpt", CreatesFile(marker), request.param)
    return path, marker


def assert_same(loaded, reference, where: str = "checkpoint") -> None:
    """The same nested dicts, lists and values, tensors equal in dtype and value."""
    assert type(loaded) is type(reference), where
    if isinstance(reference, dict):
        assert loaded.keys() == reference.keys(), where
        for key in reference:
            assert_same(loaded[key], reference[key], f"{where}[{key!r}]")
    elif isinstance(reference, (list, tuple)):
        assert len(loaded) == len(reference), where
        for i, (a, b) in enumerate(zip(loaded, reference)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(reference, torch.Tensor):
        assert loaded.dtype == reference.dtype and torch.equal(loaded, reference), where
    else:
        assert loaded == reference, where


def test_lm_moe_checkpoints_call_nothing_beyond_the_allowlist_and_load_as_a_full_unpickling_does(trained):
    for path in trained.values():
        assert foreign_callables(path) == [], path
        assert_same(load_checkpoint_file(path), torch.load(path, weights_only=False), str(path))
    assert read_trained(trained["lm_bf16"]).state_dict["model.wte.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["lm_bf16", "vit"])
def test_bf16_and_vit_checkpoints_resume(kind, trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if kind == "vit":
        run = vit_runs.fit(REPO / "configs/vit/soft_moe.yaml", tmp_path / "cache", f"--ckpt_path={trained[kind]}", steps=6)
    else:
        run = lm_runs.fit(LM_CONFIG, tmp_path / "cache", "--trainer.precision=bf16-true", f"--ckpt_path={trained[kind]}",
                          steps=6)
    assert run.trainer.global_step == 6


def test_the_payload_of_a_crafted_checkpoint_would_run_if_unpickled(crafted):
    path, marker = crafted  # the control: the refusals below refuse a file that does what it says
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_the_cli_refuses_a_crafted_checkpoint_naming_what_it_calls(subcommand, crafted, tmp_path, monkeypatch):
    path, marker = crafted
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"refers to io\.open, .*`--allow_unsafe_pickle true`"):
        cli.main([subcommand, "-c", str(LM_CONFIG), *lm_runs.tiny_args(tmp_path / "cache"), f"--ckpt_path={path}"])
    assert not marker.exists()


def test_lightning_s_own_restore_refuses_a_crafted_checkpoint(crafted, tmp_path, monkeypatch):
    path, marker = crafted
    monkeypatch.chdir(tmp_path)
    run = cli.main(["-c", str(LM_CONFIG), *lm_runs.tiny_args(tmp_path / "cache")], run=False)
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open"):  # past the CLI's own check
        run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=str(path))
    assert not marker.exists()


def test_the_fsdp_strategy_refuses_a_crafted_full_checkpoint_before_unpickling_it(crafted):
    path, marker = crafted
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open"):
        BlockFSDPStrategy().load_checkpoint(path)
    assert not marker.exists()


def test_the_causality_report_refuses_a_crafted_checkpoint_with_status_2(crafted, capsys):
    path, marker = crafted
    assert report.main(["--ckpt_path", str(path)]) == report.BAD_INPUT
    assert report.main(["-c", str(LM_CONFIG), "--model.n_layer=2", "--model.dim=64", "--model.n_head=2",
                        "--data.vocab_size=512", "--data.block_size=32", "--ckpt_path", str(path)]) == report.BAD_INPUT
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith("python -m lm_moe.causality: error: ") and "io.open" in line
                                    for line in errors)
    assert not marker.exists()


def test_sample_refuses_a_crafted_checkpoint_with_status_2(crafted, capsys):
    path, marker = crafted
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(path)])
    assert exit_info.value.code == 2 and "io.open" in capsys.readouterr().err
    assert not marker.exists()


def test_the_profiler_refuses_a_crafted_checkpoint_before_measuring_anything(crafted, tmp_path, monkeypatch, capsys):
    path, marker = crafted
    with pytest.raises(SystemExit) as exit_info:
        run_script_in_process("scripts/profile_inference.py", ["--ckpt_path", str(path), "--out", str(tmp_path / "out")],
                              monkeypatch)
    assert exit_info.value.code == 2 and "io.open" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_export_refuses_a_crafted_checkpoint_and_writes_nothing(crafted, tmp_path, capsys):
    path, marker = crafted
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(path), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "io.open" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_comparison_harness_refuses_a_crafted_last_checkpoint_of_a_run(crafted, tmp_path):
    path, marker = crafted
    run_dir = tmp_path / "sweep" / "top2" / "seed_0"
    (run_dir / "version_0" / "checkpoints").mkdir(parents=True)
    (run_dir / "version_0" / "checkpoints" / "last.ckpt").write_bytes(path.read_bytes())
    settings = comparison.SweepSettings(trainer=str(REPO / "configs/trainer/cpu_quick.yaml"), max_steps=4, val_every=2)
    run = comparison.Run("top2", LM_CONFIG, run_dir, seed=0, steps=4)
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open"):
        comparison.train(run, settings, None, lambda step: None)
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open"):
        comparison.evaluate(run, comparison.EvaluationSettings())
    assert not marker.exists()


def test_ckpt_path_best_skips_a_crafted_checkpoint_with_a_warning(crafted, trained, tmp_path):
    path, marker = crafted
    folder = tmp_path / "runs" / "top2" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "best-2.ckpt").write_bytes(trained["lm"].read_bytes())
    (folder / "best-4.ckpt").write_bytes(path.read_bytes())  # the same score: either could win
    with pytest.warns(UserWarning, match=r"skipping .*best-4.ckpt' refers to io\.open"):
        assert best_checkpoint(tmp_path / "runs" / "top2", "min") == folder / "best-2.ckpt"
    assert not marker.exists()


def test_lightning_s_weights_only_option_is_not_offered(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "-c", str(LM_CONFIG), "--weights_only=false"])
    assert exit_info.value.code == 2 and "--weights_only" in capsys.readouterr().err


def test_a_trusted_file_of_other_types_loads_with_the_escape_and_a_warning(trained, tmp_path, monkeypatch, capsys):
    foreign = with_extra_object(trained["lm"], tmp_path / "foreign.ckpt", pathlib.PurePosixPath("/a/path"))
    with pytest.raises(SystemExit):
        sample.main([str(foreign), "--max_new_tokens", "2"])
    assert "refers to pathlib.PurePosixPath" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="full unpickling; any code the file holds runs"):
        sample.main([str(foreign), "--max_new_tokens", "2", "--allow_unsafe_pickle", "true"])
    assert report.main(["--ckpt_path", str(foreign), "--seeds", "1", "--allow_unsafe_pickle"]) == report.NO_LEAK

    # fit resumes it, and the run's config.yaml does not carry the escape on to later runs
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="full unpickling"):
        run = lm_runs.fit(LM_CONFIG, tmp_path / "cache", f"--ckpt_path={foreign}", "--allow_unsafe_pickle=true", steps=6)
    assert run.trainer.global_step == 6
    saved = yaml.safe_load((Path(run.trainer.logger.log_dir) / "config.yaml").read_text())
    assert saved["allow_unsafe_pickle"] is False and saved["ckpt_path"] is None


def exported(checkpoint: Path, out: Path) -> Path:
    assert export.main([str(checkpoint), str(out)]) == 0
    return out


@pytest.mark.parametrize("kind", ["lm", "lm_bf16", "vit"])
def test_an_export_round_trips_bit_exactly_and_gives_the_checkpoint_s_outputs(kind, trained, tmp_path):
    checkpoint = trained[kind]
    folder = exported(checkpoint, tmp_path / "export")
    assert sorted(path.name for path in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config, state = read_export(folder)
    original = torch.load(checkpoint, weights_only=True)
    assert state.keys() == original["state_dict"].keys()
    for name, tensor in original["state_dict"].items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert config["task"] == ("vit" if kind == "vit" else "lm") and config["trained"]["global_step"] == 4

    # Lightning's own loader is the reference for the model both files build.
    reference_class = ImageClassifier if kind == "vit" else LanguageModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = reference_class.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    if kind == "vit":
        inputs = torch.randn(2, 1, 28, 28)
    else:
        inputs = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        expected = reference.model(inputs).logits
        for source in (checkpoint, folder):
            assert torch.equal(load_trained_module(source).model(inputs).logits, expected), source


def test_sample_causality_and_profiler_take_an_export_folder(trained, tmp_path, monkeypatch, capsys):
    folder = exported(trained["lm"], tmp_path / "export")
    from_checkpoint = sample.sample(str(trained["lm"]), prompt="def ", max_new_tokens=6, seed=3)
    assert sample.sample(str(folder), prompt="def ", max_new_tokens=6, seed=3) == from_checkpoint
    assert report.main(["--ckpt_path", str(folder), "--seeds", "1"]) == report.NO_LEAK
    out = tmp_path / "profile"
    with pytest.raises(SystemExit) as exit_info:
        run_script_in_process("scripts/profile_inference.py", [
            "--ckpt_path", str(folder), "--batch-sizes", "1", "--contexts", "8", "--new-tokens", "2",
            "--warmup", "0", "--repeats", "1", "--out", str(out)], monkeypatch)
    assert exit_info.value.code == 0
    assert "| export | lm | 1 | 8 |" in (out / "table.md").read_text()


def test_export_keeps_a_folder_that_holds_files_unless_told_to_overwrite(trained, tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(trained["lm"]), str(folder)])
    assert exit_info.value.code == 2
    assert "export folder " + str(folder) + " already holds files" in capsys.readouterr().err and (folder / "notes.txt").read_text() == "mine"
    assert export.main([str(trained["lm"]), str(folder), "--overwrite"]) == 0
    assert sorted(path.name for path in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert [path.name for path in tmp_path.iterdir()] == ["export"]  # no staging folder left behind


def test_an_export_whose_settings_name_a_foreign_class_is_refused(trained, tmp_path):
    folder = exported(trained["lm"], tmp_path / "export")
    config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    config["model"]["ffn"]["class_path"] = "os.system"
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"class_path 'os.system' is not an FFN layer of lm_moe"):
        load_trained_module(folder)
    config["model"]["ffn"] = "builtins.print"  # the parser would take a function's name for a callable
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"saved setting ffn: expected a class_path and init_args, got 'builtins.print'"):
        load_trained_module(folder)


@pytest.mark.parametrize("damage", ["no weights", "garbage weights", "no config"])
def test_a_damaged_export_folder_is_refused_by_name(damage, trained, tmp_path):
    folder = exported(trained["lm"], tmp_path / "export")
    if damage == "no weights":
        (folder / WEIGHTS_FILE).unlink()
    elif damage == "garbage weights":
        (folder / WEIGHTS_FILE).write_bytes(b"\xff" * 64)
    else:
        (folder / CONFIG_FILE).unlink()
    expected = {"no weights": "no model.safetensors in it", "garbage weights": "is not a readable safetensors file",
                "no config": "no config.yaml in it"}[damage]
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        load_trained_module(folder)

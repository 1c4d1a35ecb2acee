"""Each run takes its own version folder when it starts, even when another run under the same
name picked the same number a moment before."""

from pytorch_lightning.loggers import TensorBoardLogger

from lm_moe import cli
from lm_moe.lit.run_versions import claim_next_version

from .lm_runs import REPO, tiny_args


def test_a_run_takes_the_next_free_version_and_makes_its_folder(tmp_path):
    (tmp_path / "top2" / "version_0").mkdir(parents=True)
    logger = TensorBoardLogger(save_dir=tmp_path, name="top2")
    assert claim_next_version(logger)
    assert logger.version == 1 and (tmp_path / "top2" / "version_1").is_dir()


def test_two_runs_that_listed_the_same_next_version_get_different_folders(tmp_path, monkeypatch):
    first, second = (TensorBoardLogger(save_dir=tmp_path, name="top2") for _ in range(2))
    # Both listed the folder before either made one: both were told version 0.
    for logger in (first, second):
        monkeypatch.setattr(logger, "_get_next_version", lambda: 0)
    assert claim_next_version(first) and claim_next_version(second)
    assert (first.version, second.version) == (0, 1)
    assert sorted(path.name for path in (tmp_path / "top2").iterdir()) == ["version_0", "version_1"]


def test_a_version_the_user_set_is_left_alone(tmp_path):
    logger = TensorBoardLogger(save_dir=tmp_path, name="top2", version="baseline")
    assert not claim_next_version(logger)
    assert logger.version == "baseline" and not (tmp_path / "top2").exists()


def test_a_fit_whose_version_another_run_took_meanwhile_writes_into_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    earlier = tmp_path / "runs" / "top2" / "version_0"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").write_text("the other run's")
    # The other run made version_0 after this one listed the folder: the listing still says 0.
    monkeypatch.setattr(TensorBoardLogger, "_get_next_version", lambda self: 0)
    cli.main(["fit", "-c", str(REPO / "configs/lm/top2.yaml"), *tiny_args(tmp_path / "cache", steps=2)])
    assert (earlier / "checkpoints" / "last.ckpt").read_text() == "the other run's"
    assert (tmp_path / "runs" / "top2" / "version_1" / "checkpoints" / "last.ckpt").is_file()

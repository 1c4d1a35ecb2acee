"""A resumed run trains on the batches the uninterrupted run would have, epoch after epoch."""

import random
import signal
from pathlib import Path

import pytest

from lm_moe import cli

from .lm_runs import REPO, tiny_args
from .tiny_runs import BatchFingerprints

STEPS = 14  # about three epochs of the tiny corpus


def write_corpus(folder: Path) -> str:
    """Six documents of seeded random words, a few training batches per epoch: a glob of them."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma omega".split()
    rng = random.Random(0)
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(30)))
    return f"{folder}/*.txt"


def fit(data: tuple[str, Path], steps: int, *extra: str):
    files, cache = data
    args = ["fit", "-c", str(REPO / "configs/lm/dense.yaml"), *tiny_args(cache, steps), f"--data.data_files={files}",
            "--data.vocab_size=300", "--trainer.check_val_every_n_epoch=null",
            "--trainer.callbacks+=tests.lit.tiny_runs.BatchFingerprints", *extra]
    return cli.main(args)


def fingerprints(result) -> list[tuple[int, tuple[int, ...]]]:
    return next(callback for callback in result.trainer.callbacks if isinstance(callback, BatchFingerprints)).batches


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(the corpus and data cache, the batches of an uninterrupted run, its batches per epoch)."""
    data = (write_corpus(tmp_path_factory.mktemp("data") / "corpus"), tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("work"))
        result = fit(data, STEPS)
    per_epoch = result.trainer.num_training_batches
    assert 3 <= per_epoch <= 6  # so that the run crosses epochs
    return data, fingerprints(result), per_epoch


@pytest.mark.parametrize("stop", ["mid_epoch", "epoch_end", "next_epoch"])
def test_resuming_from_last_continues_the_batch_order(uninterrupted, tmp_path, monkeypatch, stop):
    data, batches, per_epoch = uninterrupted
    first_steps = {"mid_epoch": per_epoch // 2, "epoch_end": per_epoch, "next_epoch": per_epoch + 2}[stop]
    monkeypatch.chdir(tmp_path)
    before = fit(data, first_steps)
    after = fit(data, STEPS, "--ckpt_path=last")
    assert fingerprints(before) + fingerprints(after) == batches


def test_an_interrupted_run_resumes_with_the_batch_after_its_last_step(uninterrupted, tmp_path, monkeypatch):
    data, batches, per_epoch = uninterrupted
    monkeypatch.chdir(tmp_path)
    stop_at = per_epoch + 1
    with pytest.raises(SystemExit):  # Ctrl-C as step stop_at starts: that step finishes, then the run stops
        fit(data, STEPS, "--trainer.callbacks+=tests.lit.tiny_runs.SignalAtStep",
            f"--trainer.callbacks.init_args.step={stop_at}", f"--trainer.callbacks.init_args.signum={int(signal.SIGINT)}")
    after = fit(data, STEPS, "--ckpt_path=last")
    assert fingerprints(after) == batches[stop_at + 1 :]


def tokens(result) -> list[tuple[int, ...]]:
    return [rows for _, rows in fingerprints(result)]


def test_gradient_accumulation_sees_every_batch_of_every_epoch_and_resumes_in_order(uninterrupted, tmp_path, monkeypatch):
    # 5 batches per epoch, 2 per step: Lightning also steps on each epoch's fifth batch, so the
    # step count is not the batch count; the order must not notice.
    batches, per_epoch = uninterrupted[1], uninterrupted[2]
    data, accumulate = uninterrupted[0], "--trainer.accumulate_grad_batches=2"
    monkeypatch.chdir(tmp_path)
    whole = fit(data, 7, accumulate)
    assert tokens(whole) == [rows for _, rows in batches[: len(tokens(whole))]]
    assert len(tokens(whole)) == 2 * 7 - 2 * (per_epoch % 2)  # a short step closes each of the two full epochs
    (tmp_path / "resumed").mkdir()
    monkeypatch.chdir(tmp_path / "resumed")
    before, after = fit(data, 4, accumulate), fit(data, 7, accumulate, "--ckpt_path=last")
    assert tokens(before) + tokens(after) == tokens(whole)

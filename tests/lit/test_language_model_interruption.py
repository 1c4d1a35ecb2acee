"""An interrupted language-model run (Ctrl-C, SIGTERM) writes last.ckpt at the step it reached and
resumes there."""

import signal
from pathlib import Path

import pytest

from lm_moe.lit.checkpoints import read_checkpoint
from lm_moe.lit.interruption import CheckpointOnInterrupt

from .lm_runs import TOP2, fit


EXIT_STATUS = {signal.SIGINT: 1, signal.SIGTERM: 128 + signal.SIGTERM}  # not success


def interrupted_fit(tmp_path: Path, signum: int, *overrides: str, in_validation: bool = False) -> int:
    """Fit top2 for up to 8 steps with `signum` sent as step 2 starts (or during the validation
    after it); the exit status it stopped with."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as stopped:
            fit(TOP2, tmp_path / "cache", *overrides,
                "--trainer.callbacks+=tests.lit.tiny_runs.SignalAtStep", "--trainer.callbacks.step=2",
                f"--trainer.callbacks.signum={int(signum)}", f"--trainer.callbacks.in_validation={in_validation}",
                steps=8)
    finally:  # Lightning ignores Ctrl-C once it has stopped on one
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return stopped.value.code


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_writes_last_ckpt_at_the_step_it_reached_and_resumes_there(tmp_path, monkeypatch, signum):
    # No validation, so no checkpoint before the interruption: without one, the run would restart at 0.
    monkeypatch.chdir(tmp_path)
    no_validation = "--trainer.limit_val_batches=0"
    assert interrupted_fit(tmp_path, signum, no_validation) == EXIT_STATUS[signum]
    saved = read_checkpoint(tmp_path / "runs/top2/version_0/checkpoints/last.ckpt")
    assert saved["global_step"] == 3  # the step under way when the signal came was finished

    resumed = fit(TOP2, tmp_path / "cache", no_validation, "--ckpt_path=last", steps=5)
    assert resumed.trainer.global_step == 5
    assert {float(state["step"]) for state in resumed.trainer.optimizers[0].state.values()} == {5.0}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_validation_lets_it_finish_then_stops_at_that_step(tmp_path, monkeypatch, signum):
    monkeypatch.chdir(tmp_path)
    assert interrupted_fit(tmp_path, signum, "--trainer.limit_val_batches=3", in_validation=True) == EXIT_STATUS[signum]
    checkpoints = tmp_path / "runs/top2/version_0/checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best-2.ckpt", "last.ckpt"]  # scored
    saved = read_checkpoint(checkpoints / "last.ckpt")
    assert saved["global_step"] == 2  # no step after the validation
    # All 3 validation batches ran (Lightning alone stopped after the signal's batch, and the
    # resumed run skipped the rest).
    assert saved["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]["completed"] == 3


def test_with_gradient_accumulation_an_interruption_stops_after_an_optimizer_step(tmp_path, monkeypatch):
    # The signal comes as the first of step 3's two batches starts: stopping after it would lose its gradients.
    monkeypatch.chdir(tmp_path)
    interrupted_fit(tmp_path, signal.SIGTERM, "--trainer.accumulate_grad_batches=2", "--trainer.limit_val_batches=0")
    saved = read_checkpoint(tmp_path / "runs/top2/version_0/checkpoints/last.ckpt")
    assert saved["global_step"] == 3
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 6  # both of step 3's


def test_with_last_as_a_link_an_interruption_writes_its_own_last_ckpt_and_keeps_the_best(tmp_path, monkeypatch):
    # save_last="link" makes last.ckpt a link to the best checkpoint: writing through it would overwrite the best.
    monkeypatch.chdir(tmp_path)
    interrupted_fit(tmp_path, signal.SIGINT, "--checkpoint.save_last=link")
    checkpoints = tmp_path / "runs/top2/version_0/checkpoints"
    last = checkpoints / "last.ckpt"
    assert last.is_file() and not last.is_symlink()
    assert read_checkpoint(last)["global_step"] == 3
    assert read_checkpoint(checkpoints / "best-2.ckpt")["global_step"] == 2  # validated at step 2


def test_a_second_ctrl_c_stops_at_once():
    callback = CheckpointOnInterrupt()
    callback._on_ctrl_c(signal.SIGINT, None)  # the first asks for a stop after the step
    with pytest.raises(KeyboardInterrupt):
        callback._on_ctrl_c(signal.SIGINT, None)

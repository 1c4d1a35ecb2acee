"""The variant comparison: every LM config trained on the same data and token budget, for each of
several seeds, each run in its own `python -m lm_moe fit` process, then measured on its trained
checkpoint. A learning-rate grid may come first: each variant at a few rates on a shorter budget
(the first seed), the final runs at its best.

The output folder of a sweep:

    sweep.json                           the settings; a later invocation on the folder must use the same
    <variant>/seed_<seed>/               one final run: TensorBoard logs, config.yaml and
                                         checkpoints/ under version_<n>/ (one per fit process)
    lr_grid/<variant>/lr_<rate>/         one grid run, laid out the same
    <run>/fit_<n>.log                    what each fit attempt printed
    <run>/trained.json                   written once training reached its steps
    <run>/evaluation.json                parameters, decoding speed and causality of the trained model
    <run>/run.json                       the run's learning rate (null: its config's); a later
                                         invocation must give it the same

A run's seed sets `seed_everything` (initialisation, dropout, router noise) and the training
shuffle (`data.shuffle_seed`); the train/validation split stays the data module's, the same
documents for every run.

Resuming: a run with trained.json (or whose newest last.ckpt is at its steps) is not trained
again; one with a last.ckpt short of its steps continues from it (`--ckpt_path`); one without
starts from scratch. A fit that fails is recorded with its error, and the sweep goes on.
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lm_moe.causality.checks import Checker, CheckSettings
from lm_moe.causality.subjects import ModelSubject
from lm_moe.layers.batch_groups import required_batch_multiple
from lm_moe.lit.checkpoints import newest_last_checkpoint, read_checkpoint
from lm_moe.profiling.inference import measure_decoding, round_up
from lm_moe.profiling.model_cost import parameter_counts
from lm_moe.profiling.models import error_message, load_checkpoint, resolved_config
from lm_moe.profiling.training_curves import StepWatcher

POLL_SECONDS = 5.0  # how often the progress display looks at a running fit's logs


@dataclass(frozen=True)
class SweepSettings:
    """What every run shares; a sweep folder holds results for one set of these. Seeds and rates
    are not among them: each (variant, seed) and (variant, rate) has its own folder, so a sweep can
    grow by seeds or rates."""

    trainer: str  # trainer preset (a config file)
    max_steps: int  # of the final runs
    val_every: int  # validation (and checkpoint) interval in steps; divides max_steps and grid_steps
    overrides: tuple[str, ...] = ()  # config flags for every fit, e.g. --model.n_layer=2
    grid_steps: int | None = None  # of the learning-rate grid's runs (None: max_steps)


@dataclass(frozen=True)
class EvaluationSettings:
    decode_batch: int = 4  # rounded up to Mixture of Tokens' group size
    causality_seeds: int = 1  # 0 = skip the leakage checks


def require_same_settings(out: Path, settings: SweepSettings) -> None:
    """Record the settings in a new sweep folder, or refuse to mix results of other settings into one."""
    path = out / "sweep.json"
    wanted = json.loads(json.dumps(asdict(settings)))  # tuples as lists, as read back
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted, indent=2) + "\n")
        return
    recorded = json.loads(path.read_text())
    differences = [f"{key}: {recorded.get(key)!r} there, {value!r} now"
                   for key, value in wanted.items()
                   if recorded.get(key) != value and not (key == "trainer" and _same_preset(recorded[key], value))]
    if differences:
        raise ValueError(f"{out} holds a sweep with other settings ({'; '.join(differences)}): "
                         "give another --out, or the same settings to resume it")


def _same_preset(recorded: str, wanted: str) -> bool:
    """Whether two trainer presets at different paths hold the same text: the same preset in
    another checkout of the repository (or a moved one) resumes the sweep."""
    recorded_path, wanted_path = Path(recorded), Path(wanted)
    return recorded_path.is_file() and wanted_path.is_file() and recorded_path.read_text() == wanted_path.read_text()


def batches_per_step(config: Path, settings: SweepSettings) -> int:
    """The `trainer.accumulate_grad_batches` a variant's fit runs with (its config, the preset,
    then the overrides). Reads the config as the fit will: one it refuses raises a ValueError."""
    resolved = resolved_config(config, ["-c", settings.trainer, *settings.overrides])
    return int(resolved["trainer"].get("accumulate_grad_batches") or 1)


def fit_command(run: "Run", settings: SweepSettings) -> list[str]:
    """The `python -m lm_moe fit` command line of one run (logs and checkpoints in its run_dir)."""
    run_dir = run.run_dir
    return [
        sys.executable, "-m", "lm_moe", "fit", "-c", str(run.config), "-c", settings.trainer, *settings.overrides,
        *run.overrides,
        *([f"--model.learning_rate={run.learning_rate}"] if run.learning_rate is not None else []),
        # After the overrides: what makes the runs comparable and the sweep resumable.
        f"--seed_everything={run.seed}",
        f"--data.shuffle_seed={run.seed}",
        f"--trainer.max_steps={run.steps}",
        # Lightning counts this interval in batches, not optimizer steps.
        f"--trainer.val_check_interval={settings.val_every * run.batches_per_step}",
        "--trainer.check_val_every_n_epoch=null",  # count the interval across epochs
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir.parent}",
        f"--trainer.logger.init_args.name={run_dir.name}",
        "--trainer.logger.init_args.flush_secs=5",  # the sweep's progress display reads the events
    ]


def checkpoint_step(path: Path) -> int:
    return int(read_checkpoint(path)["global_step"])


def failure_reason(returncode: int, output: str) -> str:
    """The error of a failed fit's output (see error_message), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    reason = error_message(output) or (lines or ["no output"])[-1]
    return f"killed by signal {-returncode}: {reason}" if returncode < 0 else reason


def _exited(process: subprocess.Popen, seconds: float) -> bool:
    """Whether the process ended, waiting up to `seconds` for it."""
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


@dataclass
class Run:
    """One fit of a variant: its config at a seed and a learning rate, for a number of steps."""

    variant: str  # the config's file name
    config: Path
    run_dir: Path
    seed: int
    steps: int
    learning_rate: float | None = None  # its own model.learning_rate; None: its config's
    batches_per_step: int = 1  # gradient accumulation of its fit (see the function of that name)
    overrides: tuple[str, ...] = ()  # its own config flags, after the sweep's

    @property
    def trained_marker(self) -> Path:
        return self.run_dir / "trained.json"

    @property
    def settings_file(self) -> Path:
        return self.run_dir / "run.json"

    @property
    def evaluation_file(self) -> Path:
        return self.run_dir / "evaluation.json"


@dataclass
class TrainingOutcome:
    trained: bool
    action: str  # "skipped" (already trained), "trained", "resumed from step <n>", or "failed"
    reason: str = ""  # why it failed
    output_tail: str = ""  # the last lines the failed fit printed


def require_same_learning_rate(run: Run) -> None:
    """Record the run's own learning rate in its new folder, or refuse another one than the
    folder's fits trained with."""
    wanted = {"learning_rate": run.learning_rate}
    if not run.settings_file.exists():
        run.run_dir.mkdir(parents=True, exist_ok=True)
        run.settings_file.write_text(json.dumps(wanted) + "\n")
        return
    recorded = json.loads(run.settings_file.read_text())
    if recorded != wanted:
        def shown(rate: float | None) -> str:
            return "its config's" if rate is None else str(rate)
        raise ValueError(f"{run.run_dir} trained {run.variant} at learning rate "
                         f"{shown(recorded.get('learning_rate'))}, not {shown(run.learning_rate)}: "
                         "give the same rate to resume it, or another --out")


def train(run: Run, settings: SweepSettings, threads: int | None, on_step: Callable[[int], None]) -> TrainingOutcome:
    """Train one run to its steps in a `fit` process (with `threads` CPU threads, None: torch's
    choice), continuing its last checkpoint if any. `on_step` hears of the steps done while it runs."""
    if run.trained_marker.exists():
        return TrainingOutcome(True, "skipped")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = newest_last_checkpoint(run.run_dir)
    start = checkpoint_step(checkpoint) if checkpoint else 0
    if start < run.steps:
        command = fit_command(run, settings)
        command += ["--ckpt_path", str(checkpoint)] if checkpoint else []
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        log = run.run_dir / f"fit_{len(list(run.run_dir.glob('fit_*.log'))) + 1}.log"
        watcher = StepWatcher(run.run_dir)
        with log.open("w") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
            while not _exited(process, POLL_SECONDS):
                on_step(max(start, watcher.step()))
        text = log.read_text(errors="replace")
        if process.returncode != 0:
            tail = "\n".join(text.splitlines()[-30:])
            return TrainingOutcome(False, "failed", failure_reason(process.returncode, text), tail)
        checkpoint = newest_last_checkpoint(run.run_dir)
        reached = checkpoint_step(checkpoint) if checkpoint else 0
        if reached < run.steps:
            return TrainingOutcome(False, "failed", f"fit ended without a checkpoint at step {run.steps} "
                                                    f"(the last is at step {reached})")
    run.trained_marker.write_text(json.dumps({"checkpoint": str(checkpoint), "step": run.steps}) + "\n")
    action = "trained" if start == 0 else "skipped" if start >= run.steps else f"resumed from step {start}"
    return TrainingOutcome(True, action)


def evaluate(run: Run, evaluation: EvaluationSettings) -> dict:
    """Parameters, decoding speed and causality of the trained checkpoint (computed once, then read back).
    A part that fails is reported as an error in its place."""
    if run.evaluation_file.exists():
        return json.loads(run.evaluation_file.read_text())
    model = load_checkpoint(newest_last_checkpoint(run.run_dir))
    result = parameter_counts(model)
    # Decoding: a prompt of half the context, then cached steps to its end, on the CPU in fp32.
    batch = round_up(evaluation.decode_batch, required_batch_multiple(model))
    context = model.block_size // 2
    new_tokens = model.block_size - context
    result["decode_setting"] = f"batch {batch}, context {context} + {new_tokens} new tokens"
    try:
        decoding = measure_decoding(model, batch, context, new_tokens, torch.device("cpu"), memory=False)
        result["decode_tokens_per_s"] = decoding.decode_tokens_per_s
    except Exception as error:
        result["decode_setting"] += f": FAILED, {type(error).__name__}: {error}"
    result["causality"] = causality_verdict(model, evaluation.causality_seeds)
    run.evaluation_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def causality_verdict(model: torch.nn.Module, seeds: int) -> str:
    """PASS, or LEAK with the checks that failed, from the leakage checks in float64 (on the model: it
    becomes float64)."""
    if seeds == 0:
        return "not checked"
    try:
        results = Checker(ModelSubject(model.double()), CheckSettings(seeds=tuple(range(seeds)))).results()
    except Exception as error:
        return f"ERROR: {type(error).__name__}: {error}"
    leaks = [f"{result.check} ({result.mode}): {result.verdict}" for result in results if result.leaks]
    return f"LEAK: {'; '.join(leaks)}" if leaks else "PASS"

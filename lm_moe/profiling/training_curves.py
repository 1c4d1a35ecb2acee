"""What a training run logged to TensorBoard, read back: the validation-loss curve against tokens
and wall time, and the training throughput.

A run folder (`<save_dir>/<name>/`) holds one `version_<n>/` per `fit` process: a run that was
interrupted and resumed from its checkpoint continues in the next version. The curve joins them:
a later version wins at the steps both logged, and its wall time continues from the previous
version's last validation (the step its checkpoint was written at), so the time lost to the
interruption does not count.
"""

import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Scalars only: the runs also log MoE histograms, which are not needed here.
_SIZES = {"scalars": 0, "histograms": 1, "tensors": 1, "images": 1, "compressedHistograms": 1}


def versions(run_dir: Path) -> list[Path]:
    """The run's version folders, oldest first."""
    found = [path for path in run_dir.glob("version_*") if path.is_dir() and path.name[8:].isdigit()]
    return sorted(found, key=lambda path: int(path.name[8:]))


def _events(version: Path) -> EventAccumulator:
    events = EventAccumulator(str(version), size_guidance=_SIZES)
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> list:
    return events.Scalars(tag) if tag in events.Tags()["scalars"] else []


def _config(version: Path) -> dict:
    return yaml.safe_load((version / "config.yaml").read_text())


def learning_rate(version: Path) -> float:
    """The peak learning rate the run trained at (model.learning_rate of its resolved config.yaml)."""
    return float(_config(version)["model"]["learning_rate"])


def tokens_per_step(version: Path) -> int:
    """Training tokens per optimizer step from the run's resolved config.yaml: batch size x block
    size x batches accumulated per step x processes (devices as a count or a list, times nodes;
    1 for "auto")."""
    config = _config(version)
    trainer = config.get("trainer", {})
    devices = trainer.get("devices", 1)
    if isinstance(devices, list):
        devices = len(devices)
    elif not isinstance(devices, int) and not str(devices).isdigit():
        devices = 1
    processes = int(devices) * int(trainer.get("num_nodes") or 1)
    accumulation = int(trainer.get("accumulate_grad_batches") or 1)
    return config["data"]["batch_size"] * config["data"]["block_size"] * accumulation * processes


@dataclass
class CurvePoint:
    step: int  # optimizer steps done
    seconds: float  # wall time of training since the run started (interruptions left out)
    value: float


def curve(run_dir: Path, tag: str = "val/loss") -> list[CurvePoint]:
    """The run's values of `tag`, joined over its versions."""
    points: dict[int, CurvePoint] = {}
    offset = 0.0
    for version in versions(run_dir):
        events = _events(version)
        scalars = _scalars(events, tag)
        if not scalars:
            continue
        start = events.FirstEventTimestamp()  # the logger's creation, when that process started training
        for scalar in scalars:
            # Lightning logs the metrics of the n-th optimizer step at step n - 1.
            points[scalar.step + 1] = CurvePoint(scalar.step + 1, offset + scalar.wall_time - start, scalar.value)
        offset += scalars[-1].wall_time - start
    return [points[step] for step in sorted(points)]


def final_value(run_dir: Path, steps: int, tag: str = "val/loss") -> float | None:
    """The run's value of `tag` at step `steps` if that is the last it logged (None: it did not
    validate at the end)."""
    points = curve(run_dir, tag)
    return points[-1].value if points and points[-1].step == steps else None


def median_scalar(run_dir: Path, tag: str, from_step: int = 0) -> float | None:
    """The median of the values of `tag` the run logged (over all its versions) at logged steps
    >= `from_step` (to leave warm-up steps out), None if none."""
    values = [scalar.value for version in versions(run_dir) for scalar in _scalars(_events(version), tag)
              if scalar.step >= from_step]
    return statistics.median(values) if values else None


class StepWatcher:
    """The steps a running fit has logged so far, read from the event file of the version it creates
    (incrementally: each look reads only what was written since the last)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.known = set(versions(run_dir))  # versions of earlier processes
        self.events: EventAccumulator | None = None

    def step(self) -> int:
        if self.events is None:
            new = [version for version in versions(self.run_dir) if version not in self.known]
            if not new:
                return 0
            self.events = EventAccumulator(str(new[-1]), size_guidance=_SIZES)
        self.events.Reload()
        scalars = _scalars(self.events, "train/loss")
        return scalars[-1].step + 1 if scalars else 0

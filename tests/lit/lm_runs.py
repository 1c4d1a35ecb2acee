"""Language-model runs through the Lightning CLI at toy sizes, offline: what its tests share."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_moe import cli

from .tiny_runs import REPO, tiny_run_args

LM_CONFIGS = sorted((REPO / "configs" / "lm").glob("*.yaml"))
TOP2 = REPO / "configs/lm/top2.yaml"


def tiny_args(cache_dir: Path, steps: int = 4) -> list[str]:
    """Overrides that shrink any LM config to a seconds-long run on the offline default corpus."""
    return [
        "--model.n_layer=2",
        "--model.dim=64",
        "--model.n_head=2",
        "--model.dense_hidden_dim=128",
        "--model.warmup_steps=2",
        "--data.max_documents=40",
        "--data.vocab_size=512",
        "--data.block_size=32",
        "--data.batch_size=4",
        "--data.val_fraction=0.2",
        *tiny_run_args(cache_dir, steps),
    ]


def fit(config: Path, cache_dir: Path, *extra: str, steps: int = 4):
    return cli.main(["fit", "-c", str(config), *tiny_args(cache_dir, steps), *extra])


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

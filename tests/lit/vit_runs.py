"""Image-classifier runs through the Lightning CLI at toy sizes, offline: what its tests share."""

from pathlib import Path

from lm_moe import cli

from .tiny_runs import REPO, tiny_run_args

QUICK_TRAINER = REPO / "configs" / "trainer" / "cpu_quick_vit.yaml"


def tiny_args(cache_dir: Path, steps: int = 4) -> list[str]:
    """Overrides that shrink any ViT config to a seconds-long run on the offline default data
    (the MoE layers keep their configured experts and slots)."""
    return [
        "-c", str(QUICK_TRAINER),
        "--model.depth=2",
        "--model.dim=32",
        "--model.n_head=2",
        "--model.patch_size=7",
        "--model.dense_hidden_dim=64",
        "--model.warmup_steps=2",
        "--data.batch_size=32",
        *tiny_run_args(cache_dir, steps),
    ]


def fit(config: Path, cache_dir: Path, *extra: str, steps: int = 4):
    return cli.main(["fit", "-c", str(config), *tiny_args(cache_dir, steps), *extra])

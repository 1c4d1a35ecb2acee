"""Training throughput of a real `python -m lm_moe fit` subprocess, read back from its TensorBoard
logs: what the scaling benchmark and the GPU check measure."""

import os
import subprocess
import sys
from pathlib import Path

from lm_moe.profiling.training_curves import median_scalar


def fit_tokens_per_sec(config: Path, trainer: Path, extra: list[str], steps: int, warmup: int, work: Path,
                       threads: int | None = None) -> float:
    """Median logged training tokens/s of one `fit` run of `steps` steps (no validation) after
    `warmup` steps, with `threads` CPU threads per process (None: torch's choice); RuntimeError
    with the run's error output if it fails."""
    run_name = f"run{len(list(work.glob('run*')))}"
    args = [sys.executable, "-m", "lm_moe", "fit", "-c", str(config), "-c", str(trainer), *extra,
            f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=true",
            f"--trainer.logger.init_args.save_dir={work}", f"--trainer.logger.init_args.name={run_name}",
            f"--trainer.default_root_dir={work}"]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"fit failed:\n{result.stderr[-3000:]}")
    return median_scalar(work / run_name, "perf/train_tokens_per_sec", from_step=warmup)

"""`python -m lm_moe {fit,validate,test,predict} -c config.yaml`: the Lightning CLI.

Runs log to TensorBoard under `runs/<name>/version_<n>/`, with checkpoints (last + best by
validation loss) in its `checkpoints/` folder. `--ckpt_path last` resumes the newest run of the
same name: the step count, optimizer and schedule continue, and the logs go to a new version.
"""

from pathlib import Path

from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from lm_moe.data.text import TextDataModule
from lm_moe.lit.callbacks import TextPredictionWriter, Throughput
from lm_moe.lit.language_model import LanguageModel

RUNS_DIR = "runs"


def newest_last_checkpoint(logger_root: Path) -> Path:
    """The `last.ckpt` of the newest run version under `logger_root` (runs/<name>)."""
    candidates = sorted(logger_root.glob("version_*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path last: no last.ckpt under {logger_root}/version_*/checkpoints/; "
            "train first, or give the checkpoint's path"
        )
    return candidates[-1]


def logger_root(logger_config) -> Path:
    """runs/<name> of the configured TensorBoardLogger, where its run versions live."""
    init_args = getattr(logger_config, "init_args", None)
    if init_args is None or "save_dir" not in init_args or "name" not in init_args:
        raise ValueError("--ckpt_path last needs a TensorBoardLogger with save_dir and name to find the newest run")
    return Path(init_args.save_dir) / init_args.name


class LanguageModelCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Given once, in the data section: the tokenizer fixes the vocabulary, the data the context.
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.block_size", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's step that rebuilds the model from the checkpoint's hyperparameters,
        which would silently override the config: here the config decides what is built, and a
        checkpoint that does not fit it is refused with the differences listed (before training).
        Resolves `--ckpt_path last` and checks that a given file exists, before any data work."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            config.ckpt_path = str(newest_last_checkpoint(logger_root(config.trainer.logger)))
        elif ckpt_path is not None and ckpt_path not in ("best", "hpc", "registry") and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path: no checkpoint file at {ckpt_path!r}")


def main(args=None, run: bool = True) -> LanguageModelCLI:
    """Parse `args` (default: the command line) and run the subcommand; with `run=False` only build
    the model, data module and trainer of a config (no subcommand in `args`)."""
    return LanguageModelCLI(
        LanguageModel,
        TextDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,  # LanguageModel brings its own AdamW + schedule
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "default_root_dir": RUNS_DIR,
            "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": {"save_dir": RUNS_DIR, "name": "lm"}},
            "callbacks": [
                LearningRateMonitor(logging_interval="step"),
                Throughput(unit="tokens", key="targets"),
                TextPredictionWriter(),
            ],
        },
    )

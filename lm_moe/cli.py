"""`python -m lm_moe {fit,validate,test,predict} -c config.yaml`: the Lightning CLI.

One command for two tasks: `task: lm` (the default: a GPT on text, `configs/lm/`) and `task: vit`
(an image classifier, `configs/vit/`); a config names its task.

Runs log to TensorBoard under `runs/<name>/version_<n>/`, with checkpoints (last + best by
validation loss) in its `checkpoints/` folder. `--ckpt_path last` resumes the newest run of the
same name: the step count, optimizer and schedule continue, and the logs go to a new version.
"""

import shutil
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jsonargparse
import yaml
from pytorch_lightning.callbacks import LearningRateMonitor, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lm_moe.argument_checks import require_non_negative_float
from lm_moe.command_line import OneLineErrors
from lm_moe.layers.batch_groups import required_batch_multiple
from lm_moe.lit.callbacks import ImagePredictionWriter, TextPredictionWriter, Throughput
from lm_moe.lit.checkpoint_callback import LastAndBestCheckpoint
from lm_moe.lit.checkpoints import (
    best_checkpoint,
    newest_last_checkpoint,
    read_checkpoint,
    require_matching_state,
    run_root,
    setting_differences,
    with_current_setting_names,
)
from lm_moe.lit.fine_tuning import load_initial_weights
from lm_moe.lit.interruption import CheckpointOnInterrupt
from lm_moe.lit.progress_bar import StepProgressBar
from lm_moe.lit.run_versions import claim_next_version
from lm_moe.lit.safe_loading import ESCAPE_FLAG, ESCAPE_HELP, use_safe_loading
from lm_moe.lit.upcycling import upcycle_from_dense

RUNS_DIR = "runs"
ESCAPE_DEST = ESCAPE_FLAG.removeprefix("--")
LIGHTNING_CHECKPOINT_NAMES = ("hpc", "registry")  # --ckpt_path values Lightning resolves itself
# What `--ckpt_path last` and `best` look for in a run's versions, and what gives a run one.
MISSING_CHECKPOINT = {
    "last": ("last.ckpt", "train first"),
    "best": ("checkpoint with a monitored score", "train first (with validation)"),
}
CKPT_PATH_HELP = (
    "checkpoint to start from (fit: resume its step, optimiser, schedule and batch order). "
    '"last": the newest last.ckpt (or last-v<n>.ckpt) of this run\'s versions (<save_dir>/<name>/<version> of the logger); '
    '"best": the checkpoint with the best monitored score over every version of this run; '
    "or a file path (default: null, a fresh run for fit, the model as built otherwise)"
)


def batches_started(trainer) -> int:
    """Batches the trainer's loops have started: training, and validate / test / predict runs."""
    loops = (trainer.fit_loop.epoch_loop, trainer.validate_loop, trainer.test_loop, trainer.predict_loop)
    return sum(loop.batch_progress.total.started for loop in loops)


class SaveConfigWithoutCheckpoint(SaveConfigCallback):
    """Lightning's config.yaml of the run, less `ckpt_path` and the unsafe-loading escape: the file
    records what builds and trains the run, and `-c config.yaml` of a resumed run would otherwise
    load, silently, the older checkpoint it resumed from (and trust any later one)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.config.get("ckpt_path") is not None or self.config.get(ESCAPE_DEST):
            self.config = self.config.clone()
            self.config.ckpt_path = None
            self.config[ESCAPE_DEST] = False
        super().setup(trainer, pl_module, stage)


CONFIG_READ_MODE = "lm_moe_yaml"


def _read_config(text: str):
    """A config file (or a value on the command line) as the parser's YAML reads it; a ViT
    config's model settings under their current names, which a run's saved config.yaml may predate."""
    value = jsonargparse.get_loader("yaml")(text)
    if isinstance(value, dict) and value.get("task") == "vit" and isinstance(value.get("model"), dict):
        value = {**value, "model": with_current_setting_names(value["model"])}
    return value


jsonargparse.set_loader(CONFIG_READ_MODE, _read_config, exceptions=(yaml.YAMLError,))


class LmMoeParser(OneLineErrors, LightningArgumentParser):
    """Lightning's parser, with a bad setting, key, class or config file in one error line, and
    configs read by `_read_config`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_mode", CONFIG_READ_MODE)  # the nested parsers it makes pass their own
        super().__init__(*args, **kwargs)


class LmMoeCLI(LightningCLI):
    """What both tasks share: `--task`, the checkpoint callback, `--ckpt_path last`. Subclasses
    link what the data module knows (vocabulary, image size, ...) into the model's arguments."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--task", choices=tuple(TASKS), default="lm", help="what the config trains (configs set it)")
        parser.add_argument(ESCAPE_FLAG, type=bool, default=False, help=ESCAPE_HELP)
        parser.add_lightning_class_args(LastAndBestCheckpoint, "checkpoint")
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
        for source, target in self.linked_arguments:
            parser.link_arguments(source, target, apply_on="instantiate")

    linked_arguments: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands, without their `--weights_only`: every checkpoint loads through
        lm_moe.lit.safe_loading, and `--allow_unsafe_pickle` is the one way past it."""
        return {name: {*skipped, "weights_only"} for name, skipped in LightningCLI.subcommands().items()}

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config[self.subcommand] if self.subcommand else self.config
        use_safe_loading(trainer.strategy, config.get(ESCAPE_DEST, False))
        # Lightning's default bar (exactly that class: one the user configured stays) counts steps here.
        trainer.callbacks = [StepProgressBar() if type(c) is RichProgressBar else c for c in trainer.callbacks]
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's, with the run's version folder taken first (lm_moe.lit.run_versions: two
        runs started together get two folders), and less the run folder of a run refused before
        its first batch (a corpus that does not split, say)."""
        logger = self.trainer.logger
        new_folders = []  # of <save_dir>/<name>/<version>, those this run makes, innermost first
        if isinstance(logger, TensorBoardLogger):
            run_root = Path(logger.root_dir)
            made_above = [folder for folder in (run_root, run_root.parent) if not folder.exists()]
            claimed = rank_zero_only.rank == 0 and claim_next_version(logger)  # other ranks write into rank 0's
            log_dir = Path(logger.log_dir)
            new_folders = ([log_dir] if claimed or not log_dir.exists() else []) + made_above
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if new_folders and self.trainer.is_global_zero and not batches_started(self.trainer):
                shutil.rmtree(new_folders[-1], ignore_errors=True)
            raise

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        """Lightning's subcommand parser, with `--ckpt_path` described as `_parse_ckpt_path`
        resolves it (Lightning's own text describes its in-process `last` and `best`)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for action in parser._actions:
            if action.dest == "ckpt_path":
                action.help = CKPT_PATH_HELP
        return parser

    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's step that rebuilds the model from the checkpoint's hyperparameters,
        which would silently override the config: here the config decides what is built, and a
        checkpoint that does not fit it is refused with the differences listed (before training).
        Resolves `--ckpt_path last` and `best` and checks that a given file exists, before any data work."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in ("last", "best"):
            root = run_root(config.trainer.logger)
            found = newest_last_checkpoint(root) if ckpt_path == "last" else best_checkpoint(root, config.checkpoint.mode)
            if found is None:
                sought, needed = MISSING_CHECKPOINT[ckpt_path]
                raise FileNotFoundError(
                    f"--ckpt_path {ckpt_path}: no {sought} under {root}/*/checkpoints/; {needed}, or give the checkpoint's path"
                )
            config.ckpt_path = str(found)
        elif ckpt_path is not None and ckpt_path not in LIGHTNING_CHECKPOINT_NAMES and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path: no checkpoint file at {ckpt_path!r}")

    def before_fit(self) -> None:
        """Before any data work, refuse a checkpoint that is not one of lm_moe's, of the other task,
        or does not fit the model this config builds. (The module checks again when Lightning loads
        it, but only after the data is prepared, which can take minutes for a new corpus.)"""
        if self.subcommand == "fit" and self.trainer.gradient_clip_val is not None:
            # Lightning skips clipping for any value <= 0, so a negative one would train unclipped unnoticed.
            require_non_negative_float("trainer.gradient_clip_val", self.trainer.gradient_clip_val)
        if self.trainer.logger is None:  # Lightning's learning-rate monitor refuses to start without one
            self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        multiple = required_batch_multiple(self.model)
        if self.subcommand == "fit" and self.datamodule.batch_size % multiple:  # (evaluation fills its batches)
            raise ValueError(
                f"data.batch_size={self.datamodule.batch_size} must be a multiple of {multiple}: the model's "
                "Mixture of Tokens layers mix the tokens of group_size sequences, and training batches are not filled"
            )
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is not None and ckpt_path not in LIGHTNING_CHECKPOINT_NAMES:
            # Read safely (a file naming foreign code is refused); the other task's: refused as such.
            checkpoint = read_checkpoint(ckpt_path, task=config.get("task"), allow_unsafe_pickle=config.get(ESCAPE_DEST))
            require_matching_state(checkpoint["state_dict"], self.model.state_dict())
            # Same shapes, other settings (another FFN class, top_k, data split, ...): the config's apply.
            differences = setting_differences(checkpoint["hyper_parameters"], self.model.hparams, "model")
            differences += setting_differences(
                checkpoint.get("datamodule_hyper_parameters", {}), self.datamodule.hparams, "data"
            )
            if differences:
                rank_zero_warn(
                    f"the checkpoint was trained with other settings than this {self.subcommand} uses "
                    f"(the config's apply): {'; '.join(differences)}"
                )
        hparams = self.model.hparams
        start_from = hparams.get("init_from") or hparams.get("upcycle_from")
        if self.subcommand == "fit" and start_from is not None:
            task = config.get("task") or "lm"
            if ckpt_path is not None:
                rank_zero_info(f"{start_from} is not loaded: --ckpt_path resumes the run from its own checkpoint")
            elif hparams.get("init_from"):  # a new run from trained weights: loaded here, before any data work
                load_initial_weights(self.model.model, start_from, task)
            else:
                upcycle_from_dense(self.model.model, start_from, task, hparams.get("upcycle_noise", 0.0))

    def before_validate(self) -> None:
        """before_fit's checks; and evaluating without a checkpoint is the freshly built model:
        worth a warning, since it is rarely what is meant."""
        self.before_fit()
        if self.config[self.subcommand].get("ckpt_path") is None:
            rank_zero_warn(
                f"{self.subcommand} without --ckpt_path evaluates the model as the config builds it, with "
                "untrained weights; give --ckpt_path last, best or a checkpoint file to evaluate a trained one"
            )

    before_test = before_validate

    def before_predict(self) -> None:
        self.before_validate()
        check_predict_settings = getattr(self.model, "check_predict_settings", None)  # what the task has
        if check_predict_settings is not None:
            check_predict_settings()


class LanguageModelCLI(LmMoeCLI):
    # Given once, in the data section: the tokenizer fixes the vocabulary, the data the context.
    linked_arguments = (("data.vocab_size", "model.vocab_size"), ("data.block_size", "model.block_size"))


class ImageClassifierCLI(LmMoeCLI):
    # The data set fixes the classes, the image size and the channels.
    linked_arguments = (
        ("data.num_classes", "model.num_classes"),
        ("data.image_size", "model.image_size"),
        ("data.channels", "model.channels"),
    )


@dataclass(frozen=True)
class Task:
    cli: type[LmMoeCLI]
    classes: Callable[[], tuple[type, type]]  # (LightningModule, LightningDataModule), imported when chosen
    callbacks: Callable[[], list]


def _language_model_classes():
    from lm_moe.data.text import TextDataModule
    from lm_moe.lit.language_model import LanguageModel

    return LanguageModel, TextDataModule


def _image_classifier_classes():
    from lm_moe.data.images import ImageDataModule
    from lm_moe.lit.image_classifier import ImageClassifier

    return ImageClassifier, ImageDataModule


TASKS = {
    "lm": Task(
        LanguageModelCLI,
        _language_model_classes,
        lambda: [
            LearningRateMonitor(logging_interval="step"),
            Throughput("tokens", "targets"),
            TextPredictionWriter(),
            CheckpointOnInterrupt(),
        ],
    ),
    "vit": Task(
        ImageClassifierCLI,
        _image_classifier_classes,
        lambda: [
            LearningRateMonitor(logging_interval="step"),
            Throughput("images", "labels"),
            ImagePredictionWriter(),
            CheckpointOnInterrupt(),
        ],
    ),
}


def _task_in_config(path: Path) -> str | None:
    """The `task:` key of a config file (None if it has none); a file that is not a YAML mapping
    is refused by name (before the parser, which would only report it as a file it cannot load)."""
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"config {str(path)!r} is not readable YAML: {error}") from None
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"config {str(path)!r} must be a mapping of sections (model:, data:, trainer:), "
                         f"got a {type(config).__name__}")
    return (config or {}).get("task")


def task_of(args: list[str]) -> str:
    """The task a command line asks for, read the way the CLI will read it: the last `--task`
    flag or `task:` key of a `-c` file wins; "lm" if none says."""
    task = "lm"
    for i, arg in enumerate(args):
        value = None
        if arg.startswith("--task="):
            value = arg.split("=", 1)[1]
        elif arg == "--task" and i + 1 < len(args):
            value = args[i + 1]
        elif arg in ("-c", "--config") and i + 1 < len(args) and Path(args[i + 1]).is_file():
            value = _task_in_config(Path(args[i + 1]))
        elif arg.startswith("--config=") and Path(arg.split("=", 1)[1]).is_file():
            value = _task_in_config(Path(arg.split("=", 1)[1]))
        if value is not None:
            task = value
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return task


def configs_not_of_task(configs, task: str) -> list[str]:
    """The config files of `configs` that do not exist or are of another task than `task`."""
    return [str(config) for config in configs if not Path(config).is_file() or task_of(["-c", str(config)]) != task]


def main(args: list[str] | None = None, run: bool = True, prog: str = "python -m lm_moe") -> LmMoeCLI:
    """Parse `args` (default: the command line) and run the subcommand; with `run=False` only build
    the model, data module and trainer of a config (no subcommand in `args`). `prog` names the
    command in error lines (a tool that builds models through the CLI gives its own)."""
    task = TASKS[task_of(sys.argv[1:] if args is None else list(args))]
    model_class, data_class = task.classes()
    with warnings.catch_warnings():
        # Lightning cannot tell that the training sampler resumes mid-epoch (lm_moe.data.loaders).
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        if args is not None:  # called from a script or a test: that program's own argv is not for the CLI
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            return task.cli(
                model_class,
                data_class,
                args=args,
                run=run,
                auto_configure_optimizers=False,  # the modules bring their own AdamW + schedule
                parser_class=LmMoeParser,
                parser_kwargs={"prog": prog},  # not "__main__.py" in usage lines and errors
                # Lightning's default (True) seeds 0 too, with a warning, and --print_config shows `true`.
                seed_everything_default=0,
                save_config_callback=SaveConfigWithoutCheckpoint,
                save_config_kwargs={"overwrite": True},
                trainer_defaults={
                    "default_root_dir": RUNS_DIR,
                    "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": {"save_dir": RUNS_DIR, "name": "run"}},
                    "callbacks": task.callbacks(),
                },
            )
        except SIGTERMException as stopped:
            # Lightning stops with exit status 0 on SIGTERM; a scheduler or script must not read it as success.
            raise SystemExit(128 + signal.SIGTERM) from stopped

"""Reading checkpoint files without running code from them.

A `.ckpt` file is a pickle, and unpickling can call any function the file names. Every checkpoint
lm_moe reads goes through `load_checkpoint_file`, which first lists what the pickle would call
(a static read of its opcodes, nothing executed) and refuses a file that names anything outside
`CHECKPOINT_GLOBALS`, then loads it with torch's weights-only unpickler as a second guard.
`allow_unsafe_pickle=True` is the escape for a file the user trusts: a plain `torch.load`.
"""

import argparse
import io
import pickle
import pickletools
import zipfile
from pathlib import Path

import torch
from lightning_fabric.plugins import CheckpointIO
from pytorch_lightning.utilities import rank_zero_warn

# Everything the pickles of lm_moe's checkpoints name, read off what the trainer writes (LM and
# ViT, every layer, fp32, bf16 and fp16 precision, DDP, resumed and interrupted runs): the state
# dicts' OrderedDict and tensors. The rest of a checkpoint (settings, loop and optimizer states,
# scores) is plain dicts, lists, strings and numbers, which a pickle holds without naming anything.
TENSOR_DTYPES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
CHECKPOINT_GLOBALS = frozenset(
    {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", *(f"torch.{dtype}Storage" for dtype in TENSOR_DTYPES)}
)
# Opcodes that reach a callable other than by a GLOBAL line, which the check reads: torch.save
# writes none of them, and torch's weights-only unpickler refuses them too.
_INDIRECT_CALLABLE_OPCODES = frozenset({"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4", "NEWOBJ_EX"})
_STRING_OPCODES = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)

ESCAPE_FLAG = "--allow_unsafe_pickle"
ESCAPE_HELP = (
    "load a checkpoint that holds other Python objects than lm_moe's own checkpoints do, with a full "
    "unpickling that runs any code the file carries: only for a file whose source you trust (default: false)"
)


def _yes_or_no(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def add_escape_option(parser: argparse.ArgumentParser) -> None:
    """`--allow_unsafe_pickle [true|false]` for a script's argparse parser, written as the CLI's
    `--allow_unsafe_pickle true` (a bare flag means true)."""
    parser.add_argument(ESCAPE_FLAG, type=_yes_or_no, nargs="?", const=True, default=False, help=ESCAPE_HELP)


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose pickle names a callable lm_moe's checkpoints never hold."""


def _refusal(path: str | Path, foreign: list[str]) -> str:
    return (
        f"{str(path)!r} refers to {', '.join(foreign)}, which lm_moe's checkpoints never hold, and "
        "unpickling it could run code: it was not loaded. If you trust the file and where it came from, "
        f"load it with `{ESCAPE_FLAG} true` (and `python -m lm_moe.export` it to weights anyone can open safely)"
    )


def _pickle_of(path: Path) -> bytes:
    """The pickle of a checkpoint in torch's zip format (`<archive>/data.pkl`)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{str(path)!r} is not a checkpoint in torch's zip format (what torch.save has written since "
            "PyTorch 1.6, and Lightning writes): a truncated or foreign file"
        )
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(names) != 1:
            raise ValueError(f"{str(path)!r} is not a PyTorch checkpoint: no data.pkl in the archive")
        return archive.read(names[0])


def foreign_callables(path: str | Path) -> list[str]:
    """What the checkpoint's pickle would call beyond `CHECKPOINT_GLOBALS`, as `module.name`, read
    without unpickling anything; where it calls nothing else, but reaches callables by opcodes
    that torch.save never writes (nor torch's weights-only unpickler reads), those opcodes."""
    found, indirect = set(), set()
    recent: list[str | None] = []  # what the pickle pushed, strings kept (STACK_GLOBAL takes two)
    memo: dict[int, str | None] = {}
    try:
        for opcode, argument, _ in pickletools.genops(io.BytesIO(_pickle_of(Path(path)))):
            if opcode.name == "GLOBAL":
                found.add(argument.replace(" ", "."))  # pickletools gives "module name"
            elif opcode.name == "STACK_GLOBAL" and len(recent) >= 2 and all(isinstance(part, str) for part in recent[-2:]):
                found.add(".".join(recent[-2:]))
                indirect.add(opcode.name)
            elif opcode.name in _INDIRECT_CALLABLE_OPCODES:
                indirect.add(opcode.name)
            if opcode.name in _STRING_OPCODES:
                recent.append(argument)
            elif opcode.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if opcode.name == "MEMOIZE" else argument] = recent[-1] if recent else None
            elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(argument))
            else:
                recent.append(None)
    except (ValueError, zipfile.BadZipFile, EOFError) as error:  # a damaged archive or pickle
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint: {error}") from error
    foreign = sorted(found - CHECKPOINT_GLOBALS)
    return foreign or [f"pickle opcode {name}" for name in sorted(indirect)]


def load_checkpoint_file(
    path: str | Path, map_location="cpu", *, mmap: bool = False, allow_unsafe_pickle: bool = False
):
    """torch.load of `path` once its pickle is known to hold only what lm_moe's checkpoints hold.
    `mmap` maps the tensors instead of reading them (for checks that read a few); with
    `allow_unsafe_pickle`, any file loads, after a warning that its code runs."""
    path = Path(path)
    require_safe_pickle(path, allow_unsafe_pickle)
    if allow_unsafe_pickle:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap and zipfile.is_zipfile(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:  # torch's weights-only unpickler refused what the check let through
        raise UnsafeCheckpointError(f"{str(path)!r} was refused by torch's weights-only loader: {error}") from error
    except Exception as error:  # torch raises several kinds for a damaged file
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint: {error}") from error


class SafeLoadingCheckpointIO(CheckpointIO):
    """A trainer's checkpoint IO whose loading (Lightning's restore of `--ckpt_path`) goes through
    `load_checkpoint_file`; saving and removing are the wrapped IO's."""

    def __init__(self, wrapped: CheckpointIO, allow_unsafe_pickle: bool = False):
        self.wrapped = wrapped
        self.allow_unsafe_pickle = allow_unsafe_pickle

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.wrapped.save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        # Lightning's weights_only is not the user's to set here: the safety check decides.
        # No memory map: the restored optimizer state would stay backed by a file the run rewrites.
        return load_checkpoint_file(path, map_location, allow_unsafe_pickle=self.allow_unsafe_pickle)

    def remove_checkpoint(self, path) -> None:
        self.wrapped.remove_checkpoint(path)

    def teardown(self) -> None:
        self.wrapped.teardown()


def use_safe_loading(strategy, allow_unsafe_pickle: bool = False) -> None:
    """Make `strategy` (a trainer's) restore checkpoints through `load_checkpoint_file`."""
    current = strategy.checkpoint_io
    if isinstance(current, SafeLoadingCheckpointIO):
        current = current.wrapped
    strategy.checkpoint_io = SafeLoadingCheckpointIO(current, allow_unsafe_pickle)


def require_safe_pickle(path: str | Path, allow_unsafe_pickle: bool = False) -> None:
    """For loaders that unpickle a checkpoint file themselves (FSDP's full state dict): refuse what
    `load_checkpoint_file` refuses, before they read it."""
    if allow_unsafe_pickle:
        rank_zero_warn(f"{ESCAPE_FLAG}: loading {str(path)!r} with full unpickling; any code the file holds runs")
        return
    foreign = foreign_callables(path)
    if foreign:
        raise UnsafeCheckpointError(_refusal(path, foreign))

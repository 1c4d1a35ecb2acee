"""Result files written so that a failed run loses nothing: a run writes its files into a staging
folder beside their destination and moves them there only once all of them are written; an
output that holds an earlier run's results is refused before any work, unless the user asks to
replace it (`--overwrite`), and is then replaced whole, never mixed with the new run's files."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

OVERWRITE_HELP = "replace what the output already holds (an earlier run's results) once this run has written its own"


def add_overwrite_option(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def output_problem(path: Path | None, overwrite: bool, folder: bool) -> str | None:
    """Why `path` cannot take this run's results (None if it can): a file where a folder goes or
    the reverse, or earlier results without `overwrite`."""
    if path is None or not path.exists():
        return None
    if folder != path.is_dir():
        return f"{path} is a {'file' if folder else 'folder'}; give the path of a {'folder' if folder else 'file'}"
    if not overwrite and (not folder or any(path.iterdir())):
        return f"{path} already holds files (an earlier run's results?); give another path, or --overwrite to replace them"
    return None


def require_free_output(parser, option: str, path: Path | None, overwrite: bool, folder: bool) -> None:
    """A script's check of its output option, before any work: the parser's error if it cannot take the results."""
    problem = output_problem(path, overwrite, folder)
    if problem:
        parser.error(f"{option} {problem}")


def add_json_option(parser) -> None:
    """A benchmark's `--json FILE` (refused if it exists, unless --overwrite) and `--overwrite`."""
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results to this JSON file (refused if it exists, unless --overwrite)")
    add_overwrite_option(parser)


def _staging_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A new folder to write a run's files into; when the block ends without an error it takes the
    place of `out` (and of whatever `out` held), otherwise it is removed and `out` stays as it was."""
    staging = _staging_beside(out)
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_files(out: Path) -> Iterator[Path]:
    """For a folder that keeps other state (a sweep's runs): the files written into the yielded
    folder replace their namesakes in `out` one by one, once all of them are written."""
    out.mkdir(parents=True, exist_ok=True)
    staging = _staging_beside(out)
    try:
        yield staging
        for written in sorted(staging.iterdir()):
            os.replace(written, out / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary file beside it: it holds the old text or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)

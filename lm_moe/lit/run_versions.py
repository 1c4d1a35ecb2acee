"""A run's version folder (<save_dir>/<name>/version_<n>), taken when the run starts.

Lightning's TensorBoardLogger picks the next free number when it is first asked for its folder
and makes the folder only at its first write, after the data is set up (seconds to minutes). Two
runs started together under one name would both pick the same number and write their logs and
checkpoints into one folder, each overwriting the other's last.ckpt. Making the folder with an
exclusive mkdir leaves each run its own.
"""

from pathlib import Path

from pytorch_lightning.loggers import TensorBoardLogger


def claim_next_version(logger: TensorBoardLogger) -> bool:
    """Make the logger's next free version_<n> folder now and give the logger that version (True).
    A logger with a version of its own, or one logging to a remote file system, is left as it is
    (False)."""
    if logger._version is not None or "://" in str(logger.root_dir):  # Lightning keeps the version there
        return False
    root = Path(logger.root_dir)
    root.mkdir(parents=True, exist_ok=True)
    version = logger._get_next_version()
    while True:
        try:
            (root / f"version_{version}").mkdir()
        except FileExistsError:  # another run took it since the listing
            version += 1
            continue
        logger._version = version
        return True

import sys

import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException

from lm_moe.cli import main
from lm_moe.cpu_allocator import tune_cpu_allocator

if __name__ == "__main__":
    if not torch.cuda.is_available():  # the run trains on the CPU: see lm_moe/cpu_allocator.py
        tune_cpu_allocator()
    try:
        main()
    except (ValueError, FileNotFoundError, MisconfigurationException) as error:
        # A bad setting, file or checkpoint (Lightning's own settings: MisconfigurationException):
        # the user's to fix, in one line, as the parser's own errors.
        print(f"python -m lm_moe: error: {error}", file=sys.stderr)
        sys.exit(2)

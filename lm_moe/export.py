"""`python -m lm_moe.export CKPT FOLDER`: the weights of a checkpoint as a folder to share.

    python -m lm_moe.export runs/top2/version_0/checkpoints/best-300.ckpt exports/top2

Writes FOLDER/model.safetensors (the model's tensors) and FOLDER/config.yaml (the task, the model's
and data's settings, the step trained to): nothing in them runs code when opened. `python -m
lm_moe.sample`, `python -m lm_moe.causality --ckpt_path` and `scripts/profile_inference.py
--ckpt_path` take the folder as they take a checkpoint. Keep the checkpoint to resume training:
the folder holds no optimizer, schedule or data-order state.
"""

import argparse
import sys
from pathlib import Path

from lm_moe.command_line import ArgumentParser, exit_with_error
from lm_moe.lit.checkpoints import read_checkpoint
from lm_moe.lit.safe_loading import add_escape_option
from lm_moe.lit.weights_export import CONFIG_FILE, WEIGHTS_FILE, write_export
from lm_moe.output_files import add_overwrite_option, require_free_output

PROG = "python -m lm_moe.export"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_path", type=Path, help="a checkpoint written by `python -m lm_moe fit`")
    parser.add_argument("out", type=Path, help="the folder to write (refused if it holds files, unless --overwrite)")
    add_overwrite_option(parser)
    add_escape_option(parser)
    args = parser.parse_args(argv)
    require_free_output(parser, "export folder", args.out, args.overwrite, folder=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        checkpoint = read_checkpoint(args.ckpt_path, allow_unsafe_pickle=args.allow_unsafe_pickle)
        write_export(checkpoint, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as error:
        exit_with_error(PROG, str(error))
    print(f"wrote {args.out / WEIGHTS_FILE} and {args.out / CONFIG_FILE} (trained for {checkpoint.get('global_step')} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m lm_moe.causality`: run the leakage checks on the model of a config or a checkpoint.

    python -m lm_moe.causality -c configs/lm/top2.yaml
    python -m lm_moe.causality --ckpt_path runs/top2/version_0/checkpoints/last.ckpt
    python -m lm_moe.causality -c configs/lm/top2.yaml --ckpt_path runs/top2/version_0/checkpoints/last.ckpt
    python -m lm_moe.causality -c configs/lm/top2.yaml --model.n_layer=2   # config overrides as in fit

Prints one row per check with its measured maximum difference and PASS / LEAK. Exit status: 0 no
leak found, 1 a leak found, 2 bad input (an option, config, checkpoint or setting refused, in one
`error:` line), 3 an internal failure (with its traceback): a crash never reads as a verdict. The model runs in float64 on the CPU, so a causal model shows
differences at rounding level and a leak shows differences of the size of the logits.
"""

import argparse
import json
import math
import sys
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from lm_moe.causality.checks import Checker, CheckResult, CheckSettings
from lm_moe.causality.subjects import ModelSubject
from lm_moe.command_line import ArgumentParser
from lm_moe.lit.checkpoints import require_matching_state
from lm_moe.lit.safe_loading import add_escape_option
from lm_moe.lit.trained_model import load_trained_module, read_trained
from lm_moe.models.gpt import GPT
from lm_moe.output_files import add_json_option, require_free_output, write_text_atomically


def model_from(configs: list[str], overrides: list[str], ckpt_path: str | None, allow_unsafe_pickle: bool = False) -> GPT:
    """The GPT a config builds (with the weights of a checkpoint or export folder, if given), or
    the trained model of a checkpoint or export folder as it was trained."""
    from lm_moe import cli  # the CLI pulls in Lightning's trainer machinery: only when needed

    if not configs:
        return load_trained_module(ckpt_path, task="lm", allow_unsafe_pickle=allow_unsafe_pickle).model
    args = [item for config in configs for item in ("-c", config)]
    module = cli.main(args + overrides + ["--trainer.logger=false"], run=False, prog=PROG).model
    if not isinstance(getattr(module, "model", None), GPT):
        raise ValueError(f"the causality checks are for language models (task: lm); {configs} builds a {type(module).__name__}")
    if ckpt_path is not None:
        state = read_trained(ckpt_path, allow_unsafe_pickle=allow_unsafe_pickle).state_dict
        require_matching_state(state, module.state_dict())
        module.load_state_dict(state)
    return module.model


def print_table(title: str, results: list[CheckResult], console: Console) -> None:
    table = Table(title=title)
    for column in ("check", "mode", "max diff", "verdict", "what was checked"):
        table.add_column(column)
    colours = {"PASS": "green", "LEAK": "bold red", "VACUOUS": "bold red", "ERROR": "bold red", "n/a": "dim"}
    for result in results:
        diff = "-" if math.isnan(result.max_diff) else f"{result.max_diff:.1e}"
        verdict = f"[{colours[result.verdict]}]{result.verdict}[/]"
        table.add_row(result.check, result.mode, diff, verdict, result.note)
    console.print(table)


PROG = "python -m lm_moe.causality"
NO_LEAK, LEAK, BAD_INPUT, INTERNAL_FAILURE = 0, 1, 2, 3  # exit statuses


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The command's own options, and the config overrides (`--model.dim=64`) for the CLI."""
    parser = ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-c", "--config", action="append", default=[], help="LM config(s), as for `python -m lm_moe fit`")
    parser.add_argument(
        "--ckpt_path", default=None,
        help="checkpoint or export folder to check (its own architecture unless -c is given)",
    )
    add_escape_option(parser)
    parser.add_argument(
        "--length", type=int, default=0, help="sequence length, at least 2 (0 = three chunks and a bit, at most block_size)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="random inputs per check")
    parser.add_argument("--tolerance", type=float, default=1e-10, help="largest difference a causal model may show (float64)")
    add_json_option(parser)
    args, overrides = parser.parse_known_args(argv)
    require_free_output(parser, "--json", args.json, args.overwrite, folder=False)
    if not args.config and args.ckpt_path is None:
        parser.error("give a config (-c) or a checkpoint (--ckpt_path)")
    if overrides and not args.config:
        parser.error(f"config overrides {overrides} need a config (-c)")
    if args.seeds <= 0:
        parser.error(f"--seeds must be positive, got {args.seeds}")
    if args.length < 0 or args.length == 1:
        parser.error(f"--length must be 0 (chosen from the model) or at least 2, got {args.length}")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    console = Console()
    try:
        model = model_from(args.config, overrides, args.ckpt_path, args.allow_unsafe_pickle).double()
        settings = CheckSettings(length=args.length, seeds=tuple(range(args.seeds)), tolerance=args.tolerance)
        checker = Checker(ModelSubject(model), settings)
    except (ValueError, FileNotFoundError) as error:  # a checkpoint or setting refused: no traceback
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return BAD_INPUT
    with console.status("running the leakage checks") as status:
        results = checker.results(on_result=lambda result: status.update(f"done: {result.check} ({result.mode})"))
    source = " + ".join(args.config + overrides + ([args.ckpt_path] if args.ckpt_path else []))
    print_table(f"causality of {source} (float64, T={checker.length}, batch {checker.batch})", results, console)
    leaks = [result for result in results if result.leaks]
    console.print(f"[bold red]LEAK in {len(leaks)} check(s)[/]" if leaks else "[green]no leak found[/]")
    if args.json is not None:
        # JSON has no NaN: a difference that was not measured is null.
        rows = [{**asdict(result), "max_diff": None if math.isnan(result.max_diff) else result.max_diff} for result in results]
        write_text_atomically(args.json, json.dumps(rows, indent=2, allow_nan=False))
    return LEAK if leaks else NO_LEAK

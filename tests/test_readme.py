"""The documented commands stay true: the README's quickstart is the two commands CI runs, and
every command the code blocks of README.md and docs/*.md show for the package and its scripts
parses as written (its configs exist, its options are known)."""

import argparse
import shlex
import tomllib
from pathlib import Path

import pytest

from lm_moe import cli, export, sample
from lm_moe.causality import report
from lm_moe.profiling.models import resolved_config

from .scripts_in_process import run_script_in_process

REPO = Path(__file__).resolve().parents[1]
INSTALL = ["python", "-m", "pip", "install", "-r", "requirements.txt", "-e", "."]


def bash_blocks(markdown: str) -> list[list[list[str]]]:
    """The commands of each ```bash block, split as the shell splits them: continuation lines
    joined, comments dropped, `a && b` as two commands."""
    blocks, current = [], None
    for line in markdown.splitlines():
        if line.startswith("```"):
            if current is not None:
                blocks.append(current)
                current = None
            elif line.strip() == "```bash":
                current = []
        elif current is not None:
            current.append(line)
    commands_per_block = []
    for lines in blocks:
        commands = []
        for line in "\n".join(lines).replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while "&&" in words:
                cut = words.index("&&")
                commands.append(words[:cut])
                words = words[cut + 1 :]
            if words:
                commands.append(words)
        commands_per_block.append(commands)
    return commands_per_block


BLOCKS = bash_blocks((REPO / "README.md").read_text())
DOCS = sorted((REPO / "docs").glob("*.md"))
COMMANDS = [command for page in [REPO / "README.md", *DOCS] for block in bash_blocks(page.read_text()) for command in block]


def without_environment(command: list[str]) -> list[str]:
    """`A=1 B=2 python ...` -> `python ...`."""
    while command and "=" in command[0] and not command[0].startswith("-"):
        command = command[1:]
    return command


def module_commands(module: str) -> list[list[str]]:
    """The arguments of every `python -m <module> ...` command."""
    found = []
    for command in map(without_environment, COMMANDS):
        if command[:3] == ["python", "-m", module]:
            found.append(command[3:])
    return found


def test_bash_blocks_are_read_as_the_shell_reads_them():
    text = '```bash\npython -m a --x "two words" \\\n    --y 1   # note\npip install b && python -m c\n```\n```\nnot bash\n```\n'
    assert bash_blocks(text) == [[["python", "-m", "a", "--x", "two words", "--y", "1"], ["pip", "install", "b"], ["python", "-m", "c"]]]


def test_the_quickstart_is_two_commands_each_installing_first_and_ci_runs_the_second():
    quickstart = BLOCKS[0]
    assert quickstart[0] == INSTALL and quickstart[2] == INSTALL and len(quickstart) == 4
    assert quickstart[1][:4] == ["python", "-m", "lm_moe", "fit"]
    assert quickstart[3] == ["python", "-m", "pytest"]
    ci_commands = [shlex.split(line) for line in (REPO / ".ci/run").read_text().splitlines() if line.startswith("python ")]
    assert ci_commands == [INSTALL, quickstart[3]]


@pytest.mark.parametrize("args", module_commands("lm_moe"), ids=shlex.join)
def test_every_lm_moe_command_parses(args, tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    for config in [args[i + 1] for i, arg in enumerate(args) if arg == "-c"]:
        if config.startswith("runs/"):  # the config.yaml a run wrote: make it as `fit` writes it
            task_config = "configs/vit/soft_moe.yaml" if "soft_moe" in config else "configs/lm/top2.yaml"
            with pytest.raises(SystemExit):
                cli.main(["fit", "-c", task_config, "--print_config"])
            Path(config).parent.mkdir(parents=True, exist_ok=True)
            Path(config).write_text(capsys.readouterr().out)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err


@pytest.mark.parametrize("args", module_commands("lm_moe.sample"), ids=shlex.join)
def test_every_sample_command_parses(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*args, "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err


@pytest.mark.parametrize("args", module_commands("lm_moe.causality"), ids=shlex.join)
def test_every_causality_command_parses_and_names_configs_that_exist(args):
    options, overrides = report.parse_args(args)
    assert overrides == []
    assert all((REPO / config).is_file() for config in options.config)


@pytest.mark.parametrize("args", module_commands("lm_moe.export"), ids=shlex.join)
def test_every_export_command_parses(args):
    options = export.parse_args(args)
    assert options.ckpt_path.suffix == ".ckpt"


def script_commands() -> list[list[str]]:
    """`scripts/<name>.py` and its arguments of every `python scripts/...` command (also after a
    launcher such as `taskset -c 0`)."""
    found = []
    for command in COMMANDS:
        for i, word in enumerate(command[:-1]):
            if word == "python" and command[i + 1].startswith("scripts/"):
                found.append(command[i + 1 :])
    return found


class Parsed(Exception):
    """Raised in place of running a script once its command line parsed."""


@pytest.mark.parametrize("command", script_commands(), ids=shlex.join)
def test_every_script_command_parses(command, monkeypatch):
    original = argparse.ArgumentParser.parse_known_args

    def parse_args(parser, args=None, namespace=None):
        namespace, unknown = original(parser, args, namespace)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        raise Parsed

    overrides = []

    def parse_known_args(parser, args=None, namespace=None):  # the scripts that pass config overrides on
        overrides.extend(original(parser, args, namespace)[1])
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    script, *args = command
    with pytest.raises(Parsed):  # a bad option exits with argparse's error instead
        run_script_in_process(script, args, monkeypatch)
    configs = [arg for arg in args if arg.endswith(".yaml")]
    assert all((REPO / config).is_file() for config in configs)
    for config in configs or ["configs/lm/dense.yaml"]:  # the overrides parse with the configs they go to
        resolved_config(REPO / config, overrides)


def test_every_pytest_marker_the_readme_selects_is_registered():
    registered = {
        marker.split(":")[0]
        for marker in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    }
    expressions = [args[args.index("-m") + 1] for args in module_commands("pytest") if "-m" in args]
    selected = {word for expression in expressions for word in expression.split()} - {"and", "or", "not"}
    assert selected and selected <= registered


def test_the_readme_shows_commands_of_every_kind():
    # A guard on the parser above: were it to miss the blocks, the tests above would check nothing.
    assert len(module_commands("lm_moe")) >= 10
    assert module_commands("lm_moe.sample") and module_commands("lm_moe.causality") and module_commands("lm_moe.export")
    assert {command[0] for command in script_commands()} >= {"scripts/compare_lm.py", "scripts/profile_inference.py"}

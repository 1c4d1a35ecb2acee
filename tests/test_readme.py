"""The documented commands stay true: the README's quickstart is the two commands CI runs, and
every command the code blocks of README.md and of every page under docs/ show is one these tests
check, and parses as written (its configs and files exist, its options are known)."""

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
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# Each command once, however many pages show it.
COMMANDS = list({shlex.join(command): command for page in PAGES for block in bash_blocks(page.read_text()) for command in block}.values())


def split_environment(command: list[str]) -> tuple[dict[str, str], list[str]]:
    """`A=1 B=2 python ...` -> ({"A": "1", "B": "2"}, `python ...`)."""
    environment = {}
    while command and "=" in command[0] and not command[0].startswith("-"):
        name, _, value = command[0].partition("=")
        environment[name] = value
        command = command[1:]
    return environment, command


def with_environment(command: list[str], monkeypatch) -> list[str]:
    """The command without its environment prefix, once the part of it that decides how it parses
    is in effect here: its PYTHONPATH folders (relative to the repository root) go on sys.path.
    The rest (a multi-node launch's rendezvous) does not change what parses."""
    environment, command = split_environment(command)
    for folder in reversed(environment.get("PYTHONPATH", "").split(":")):
        if folder:
            monkeypatch.syspath_prepend(str(REPO / folder))
    return command


def module_commands(module: str) -> list[list[str]]:
    """Every `python -m <module> ...` command, with its environment prefix."""
    return [command for command in COMMANDS if split_environment(command)[1][:3] == ["python", "-m", module]]


def module_args(command: list[str], monkeypatch) -> list[str]:
    """The arguments after `python -m <module>`, its environment in effect."""
    return with_environment(command, monkeypatch)[3:]


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


@pytest.mark.parametrize("command", module_commands("lm_moe"), ids=shlex.join)
def test_every_lm_moe_command_parses(command, tmp_path, monkeypatch, capsys):
    args = module_args(command, monkeypatch)
    for folder in ("configs", "docs"):
        (tmp_path / folder).symlink_to(REPO / folder)
    monkeypatch.chdir(tmp_path)
    for config in [args[i + 1] for i, arg in enumerate(args) if arg == "-c"]:
        if config.startswith("runs/"):  # the config.yaml a run wrote: make it as `fit` writes it
            task_config = "configs/vit/soft_moe.yaml" if "soft_moe" in config else "configs/lm/top2.yaml"
            with pytest.raises(SystemExit):
                cli.main(["fit", "-c", task_config, "--print_config"])
            Path(config).parent.mkdir(parents=True, exist_ok=True)
            Path(config).write_text(capsys.readouterr().out)
    shows_help = any(arg == "--help" or arg.endswith(".help") for arg in args)  # help exits 0 once what precedes it parsed
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args if shows_help else [*args, "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", module_commands("lm_moe.sample"), ids=shlex.join)
def test_every_sample_command_parses(command, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*module_args(command, monkeypatch), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", module_commands("lm_moe.causality"), ids=shlex.join)
def test_every_causality_command_parses_with_configs_that_exist(command, monkeypatch):
    options, overrides = report.parse_args(module_args(command, monkeypatch))
    assert all((REPO / config).is_file() for config in options.config)
    if options.config:  # the config overrides parse with the configs they go to
        later_configs = [item for config in options.config[1:] for item in ("-c", str(REPO / config))]
        resolved_config(REPO / options.config[0], [*later_configs, *overrides])


@pytest.mark.parametrize("command", module_commands("lm_moe.export"), ids=shlex.join)
def test_every_export_command_parses(command, monkeypatch):
    options = export.parse_args(module_args(command, monkeypatch))
    assert options.ckpt_path.suffix == ".ckpt"


def script_command(command: list[str]) -> list[str] | None:
    """`scripts/<name>.py` and its arguments of a `python scripts/...` command (also after a
    launcher such as `taskset -c 0`), else None."""
    for i, word in enumerate(command[:-1]):
        if word == "python" and command[i + 1].startswith("scripts/"):
            return command[i + 1 :]
    return None


def script_commands() -> list[list[str]]:
    return [script for script in map(script_command, COMMANDS) if script is not None]


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


PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_pytest_command_selects_registered_markers_and_test_files_that_exist():
    registered = {marker.split(":")[0] for marker in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
    commands = [command[3:] for command in module_commands("pytest")]
    expressions = [args[args.index("-m") + 1] for args in commands if "-m" in args]
    selected = {word for expression in expressions for word in expression.split()} - {"and", "or", "not"}
    assert selected and selected <= registered
    paths = [arg for args in commands for arg in args if arg.startswith("tests")]
    assert all((REPO / path).exists() for path in paths), paths


def pip_commands() -> list[list[str]]:
    """The arguments after `pip install` of every `pip install ...` or `python -m pip install ...`."""
    found = []
    for command in COMMANDS:
        for start in ([], ["python", "-m"]):
            if command[: len(start) + 2] == [*start, "pip", "install"]:
                found.append(command[len(start) + 2 :])
    return found


@pytest.mark.parametrize("args", pip_commands(), ids=shlex.join)
def test_every_pip_command_installs_files_and_extras_the_project_has(args):
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for option, value in zip(args, args[1:]):
        if option == "-r":
            assert (REPO / value).is_file()
        if option == "-e":
            package, _, wanted = value.partition("[")
            assert package == "." and set(filter(None, wanted.rstrip("]").split(","))) <= extras


TENSORBOARD_COMMANDS = [command for command in COMMANDS if command[:1] == ["tensorboard"]]


@pytest.mark.parametrize("command", TENSORBOARD_COMMANDS, ids=shlex.join)
def test_every_tensorboard_command_names_a_log_folder(command):
    assert command[1:2] == ["--logdir"] and len(command) == 3


def checked_by(command: list[str]) -> str | None:
    """Which test above checks this command, if any."""
    program = split_environment(command)[1]
    if program[:2] == ["python", "-m"] and program[2:3] in (["lm_moe"], ["lm_moe.sample"], ["lm_moe.causality"],
                                                             ["lm_moe.export"], ["pytest"], ["pip"]):
        return program[2]
    if script_command(command) is not None:
        return "scripts"
    if program[:2] == ["pip", "install"] or command in TENSORBOARD_COMMANDS:
        return program[0]
    return None


def test_every_documented_command_is_one_the_tests_check():
    assert [shlex.join(command) for command in COMMANDS if checked_by(command) is None] == []


def test_the_pages_show_commands_of_every_kind():
    # A guard on the parser above: were it to miss the blocks, the tests above would check nothing.
    assert len(module_commands("lm_moe")) >= 10
    assert module_commands("lm_moe.sample") and module_commands("lm_moe.causality") and module_commands("lm_moe.export")
    assert {command[0] for command in script_commands()} >= {"scripts/compare_lm.py", "scripts/profile_inference.py"}

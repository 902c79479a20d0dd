"""The command lines as users meet them: every flag explained, defaults shown; what the test extra must declare."""

import argparse
import ast
import configparser
import importlib.util
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import distill_conditional_ddpm
import evaluate_iclevr
import train_conditional_ddpm
from cond_ddpm import data as iclevr_data

ROOT = Path(__file__).resolve().parents[1]


class Parsed(Exception):
    """Raised in place of parsing, carrying the parser a command built."""


def benchmark_main(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # where the scripts find their sibling modules
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


COMMANDS = {
    "train_conditional_ddpm.py": lambda monkeypatch: train_conditional_ddpm.parse_args([]),
    "distill_conditional_ddpm.py": lambda monkeypatch: distill_conditional_ddpm.parse_args([]),
    "evaluate_iclevr.py": lambda monkeypatch: evaluate_iclevr.parse_args([]),
    "python -m cond_ddpm.data": lambda monkeypatch: iclevr_data.main([]),
    **{
        f"benchmarks/{name}.py": lambda monkeypatch, name=name: benchmark_main(name, monkeypatch)()
        for name in ("quality", "sampling", "throughput", "gpu_check")
    },
}


def parsers_of(parser, name):
    """The parser and, recursively, its subcommands' parsers, with their command names."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from parsers_of(sub, f"{name} {command}")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_every_command_has_help_and_shows_its_default(command, monkeypatch):
    def capture(parser, *args, **kwargs):
        raise Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed) as parsed:
        COMMANDS[command](monkeypatch)
    for name, parser in parsers_of(parsed.value.args[0], command):
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), name
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{name} {action.option_strings[0]} has no help"


def shown_help(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        train_conditional_ddpm.parse_args(argv)
    return " ".join(capsys.readouterr().out.split())


def test_training_help_shows_the_recipes_values_as_defaults(capsys):
    default = shown_help(["--help"], capsys)
    assert "the model size (PRESETS in pipeline_cond_ddpm.py) (default: gpu)" in default
    assert "--resolution RESOLUTION images are resized to this square size (default: 64)" in default
    assert "--use_ema, --no-use_ema keep and save EMA weights (default: True)" in default
    cpu = shown_help(["--recipe", "cpu", "--help"], capsys)
    assert "(PRESETS in pipeline_cond_ddpm.py) (default: cpu)" in cpu and "peak learning rate (default: 0.002)" in cpu


def test_the_test_extra_declares_every_package_the_tests_import():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requirements = setup["options"]["install_requires"] + setup["options.extras_require"]["test"]
    declared = {re.split(r"[<>=!~\[ ]", line.strip())[0].lower() for line in requirements.splitlines() if line.strip()}
    local = {path.stem for path in ROOT.glob("*.py")} | {"cond_ddpm", "conftest", "count_host_syncs"}
    imported = set()
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - local - set(sys.stdlib_module_names)
    distributions = packages_distributions()
    missing = {
        module for module in third_party if not {d.lower() for d in distributions.get(module, [module])} & declared
    }
    assert not missing, f"the tests import {sorted(missing)}, which setup.cfg's install_requires and test extra lack"

"""The README is the compatibility contract: every `saeflow ...` command it shows parses, every
import it shows works, and every function it names exists."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from saeflow.cli.main import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"```(\w*)\n(.*?)```", text, re.S)


def _commands(text: str) -> list[str]:
    out = []
    for _, body in _blocks(text):
        body = body.replace("\\\n", " ")
        for line in body.splitlines():
            line = line.strip()
            if line.startswith("saeflow "):
                out.append(line.split("  #")[0].split(" # ")[0].strip())
    return out


COMMANDS = _commands(README.read_text())


def test_readme_shows_commands():
    assert len(COMMANDS) >= 15, COMMANDS


def _expand(command: str) -> list[str]:
    """Usage lines: '[--a X]' -> '--a X'; '[--a N | --b]' -> each alternative; N -> 0."""
    m = re.search(r"\[([^\[\]]*)\]", command)
    if not m:
        return [command]
    return [v for alt in m.group(1).split(" | ")
            for v in _expand(command[:m.start()] + alt.strip() + command[m.end():])]


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    for variant in _expand(command):
        argv = ["0" if a == "N" else a for a in shlex.split(variant)[1:]]
        args = build_parser().parse_args(argv)  # SystemExit: a flag or command is gone
        assert callable(args.func)


def test_readme_python_imports_and_named_functions_exist():
    text = README.read_text()
    imports = [line.strip() for lang, body in _blocks(text) if lang == "python"
               for line in body.splitlines()
               if line.strip().startswith(("import saeflow", "from saeflow"))]
    assert imports
    for line in imports:
        exec(line, {})
    named = set(re.findall(r"`(saeflow(?:\.[a-z_]+)+)\(", text))
    assert named
    for dotted in named:
        module, _, attr = dotted.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), dotted

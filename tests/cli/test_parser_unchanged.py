"""Every command's options are a contract: flags, defaults, choices, help texts and how each
value is read stay as they were when the parser came from flat configs and class source
(parser_snapshot.json, written from that parser; `python tests/cli/test_parser_unchanged.py`
rewrites it, on purpose only)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("parser_snapshot.json")
# inputs each option's type reads; the results (or the refusal) are part of the contract
PROBES = ["300k", "2M", "12", "0-5", "1,3,7", "5-3", "-1", "2.5", "nan", "inf", "x", "",
          "wiki", "wiki=0.8,python=0.2", "a,b", "all"]


def _probe(conv) -> dict:
    out = {}
    for text in PROBES:
        try:
            out[text] = repr(conv(text))
        except Exception as e:  # noqa: BLE001 - the refusal is recorded
            out[text] = f"{type(e).__name__}: {e}"
    return out


def _plain(value):
    if isinstance(value, type):
        return f"class {value.__name__}"
    if callable(value):
        return f"callable {getattr(value, '__name__', '?')}"
    return repr(value)


def _action(a: argparse.Action, types: dict) -> dict:
    probed = None if a.type is None else json.dumps(_probe(a.type), ensure_ascii=False)
    if probed is not None:
        types.setdefault(probed, f"type{len(types)}")
    return {"flags": list(a.option_strings), "dest": a.dest, "kind": type(a).__name__,
            "default": _plain(a.default), "required": a.required, "nargs": repr(a.nargs),
            "choices": None if a.choices is None or isinstance(a, argparse._SubParsersAction)
            else [repr(c) for c in a.choices],
            "help": a.help, "metavar": repr(a.metavar),
            "type": None if probed is None else types[probed]}


def dump(parser: argparse.ArgumentParser, path: str, out: dict, types: dict) -> dict:
    """{command path: its help text, its defaults and every option} for the whole tree;
    `types`: {what a type makes of PROBES: its name in the snapshot}."""
    text = parser.format_help()  # also builds a parser whose options are added on first use
    out[path] = {"help": text, "defaults": {k: _plain(v) for k, v in
                                            sorted(parser._defaults.items())
                                            if not k.startswith("_config_")},  # internal
                 "actions": [_action(a, types) for a in parser._actions]}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                dump(sub, f"{path} {name}", out, types)
    return out


def current() -> dict:
    from saeflow.cli.main import build_parser

    types: dict = {}
    commands = dump(build_parser(), "saeflow", {}, types)
    return json.loads(json.dumps({"commands": commands,
                                  "types": {v: json.loads(k) for k, v in types.items()}}))


def test_every_command_parses_as_before(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    want = json.loads(SNAPSHOT.read_text())
    got = current()
    assert got["types"] == want["types"]
    assert sorted(got["commands"]) == sorted(want["commands"])
    for path, command in want["commands"].items():
        assert got["commands"][path] == command, path


if __name__ == "__main__":
    os.environ["COLUMNS"] = "100"
    SNAPSHOT.write_text(json.dumps(current(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {SNAPSHOT} ({len(current()['commands'])} commands)", file=sys.stderr)


def test_option_configs_keep_the_defaults_of_the_functions_they_feed():
    """`saeflow pack eval` and `saeflow trace` build EvalConfig / TraceConfig and pass them on:
    their defaults are the library functions' own."""
    import dataclasses
    import inspect

    from saeflow.cli.flow import TraceConfig
    from saeflow.cli.saes import EVAL_OPTIONS
    from saeflow.flow.graphs import trace
    from saeflow.pipeline.config import EvalConfig
    from saeflow.saes.evaluate import evaluate_pack

    for cls, fn, names in ((EvalConfig, evaluate_pack, EVAL_OPTIONS),
                           (TraceConfig, trace, [f.name for f in dataclasses.fields(TraceConfig)])):
        params = inspect.signature(fn).parameters
        for name in names:
            assert getattr(cls(), name) == params[name].default, (cls.__name__, name)


def test_top_level_help_imports_no_config_module():
    """`saeflow --help` adds each command's options only when that command is used, so it
    imports no config module, nor torch, pandas or networkx."""
    import subprocess

    code = ("import sys\n"
            "from saeflow.cli.main import build_parser\n"
            "build_parser().format_help()\n"
            "print(' '.join(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    heavy = [m for m in out if m.split(".")[0] in ("torch", "pandas", "networkx", "numpy")
             or m.startswith(("saeflow.saes", "saeflow.flow", "saeflow.features",
                              "saeflow.evolution", "saeflow.steering", "saeflow.pipeline"))]
    assert heavy == []

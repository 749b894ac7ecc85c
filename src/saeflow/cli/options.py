"""Command-line options generated from the config dataclasses, so that each default and each
help text lives in one place: the config field. A field's help is the comment on its line (or
the comment lines just above it); its default is the field's default; `Literal[...]` gives
choices. Token counts accept 300k / 2M, layer lists accept all / 0-5 / 1,3,7, and string lists
are comma-separated."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import math
import sys
import tokenize
import types
import typing
from typing import Any, Callable, Literal, get_args, get_origin

from saeflow.errors import ConfigError, SaeflowError
from saeflow.lm.corpora import check_corpus_spec, parse_tokens

CONFIG_KEY = "_config_"  # namespace keys that name the config classes a command builds


class Parser(argparse.ArgumentParser):
    """saeflow's argparse parser: no prefix matching (`--model` was taken as `--model-name`),
    and a usage error is one line on stderr and exit status 2, like every other bad input."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)",
              file=sys.stderr)
        sys.exit(2)


def one_line(text: object) -> str:
    """A message on one line (tracebacks and wrapped texts would break the one-line rule)."""
    return " ".join(str(text).split())


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the comment that documents it in the class body (or a base class's)}."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base) and base is not cls:
            docs.update(field_docs(base))
    docs.update(_own_field_docs(cls))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    src = inspect.getsource(cls)
    comments: dict[int, str] = {}  # trailing comments, by line
    alone: dict[int, str] = {}  # lines that hold only a comment
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (alone if tok.line.strip().startswith("#") else comments)[tok.start[0]] = text
    docs: dict[str, str] = {}
    body = ast.parse(src).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = comments.get(node.end_lineno or node.lineno, "")
            if not text:  # a block of comment lines right above the field
                above: list[str] = []
                line = node.lineno - 1
                while line in alone:
                    above.insert(0, alone[line])
                    line -= 1
                text = " ".join(above)
            if text:
                docs[node.target.id] = text
    return docs


def config_default(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def parse_layers_arg(text: str) -> list[int] | None:
    """'all' -> None; '0-5' -> [0..5]; '1,3,7' -> [1, 3, 7] (range checked by the library)."""
    text = str(text).strip()
    if text in ("", "all"):
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                if int(b) < int(a):
                    raise argparse.ArgumentTypeError(
                        f"the layer range {part} runs backwards; write {b}-{a}")
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"layers are all, a range like 0-5, or a list like 1,3,7; got {text!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(
            f"layers are all, a range like 0-5, or a list like 1,3,7 (0 or more); got {text!r}")
    return out


def parse_str_list(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_str_tuple(text: str) -> tuple[str, ...]:
    return tuple(parse_str_list(text))


def _number_list(kind: Callable[[str], Any], what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(t) for t in parse_str_list(text)]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") \
                from None
    return parse


def parse_float(text: str) -> float:
    """A number; nan is never a meaningful setting (inf may be: the config's rules decide)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def parse_corpus(text: str) -> str:
    """A corpus spec, checked (sources and shares) when the command line is read."""
    try:
        check_corpus_spec(text)
    except SaeflowError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


parse_int_list = _number_list(int, "integers")
parse_float_list = _number_list(parse_float, "numbers")


def _token_count(text: str) -> int:
    try:
        return parse_tokens(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None:
        return "none"
    return str(value)


def _with_default(help_: str, shown: str | None = None) -> str:
    """The help text (argparse's %-escaped), with the default unless the doc already says it."""
    if shown is not None and "default" not in help_:
        help_ = (f"{help_} " if help_ else "") + f"(default: {shown})"
    return help_.replace("%", "%%")


def _converter(name: str, tp: Any) -> tuple[Callable[[str], Any] | None, list | None]:
    """(argparse type, choices) for a field's annotation."""
    tp, _ = _strip_optional(tp)
    if get_origin(tp) is Literal:
        return None, list(get_args(tp))
    if tp is int and (name == "tokens" or name.endswith("_tokens")):
        return _token_count, None
    if get_origin(tp) is list:
        (item,) = get_args(tp) or (str,)
        if item is int:
            return (parse_layers_arg if name == "layers" else parse_int_list), None
        if item is float:
            return parse_float_list, None
        return parse_str_list, None
    if name == "corpus" and tp is str:
        return parse_corpus, None
    if tp is float:
        return parse_float, None
    if tp in (int, str):
        return tp, None
    return None, None


def _defaults_of(cls_or_preset: Any) -> tuple[type, dict[str, Any]]:
    """(the dataclass, {field: default}) from a class or from a preset instance of it."""
    if isinstance(cls_or_preset, type):
        return cls_or_preset, {}
    preset = cls_or_preset
    return type(preset), {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)}


def add_config_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: Any, *,
                       only: list[str] | None = None, skip: tuple[str, ...] = (),
                       flags: dict[str, list[str]] | None = None,
                       helps: dict[str, str] | None = None) -> list[str]:
    """Add one option per field of the dataclass `cls` (in field order, or `only`'s order).

    `flags` renames an option (e.g. {"checkpoint_every_s": ["--checkpoint-every"]}); `helps`
    adds CLI-only wording. The option's dest is always the field name, so `config_from_args`
    can build the config back. Returns the field names added."""
    cls, preset = _defaults_of(cls)
    # The command's config is built (and checked by its own rules) right after parsing,
    # before anything loads or writes: see check_configs.
    parser.set_defaults(**{CONFIG_KEY + cls.__name__: cls})
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    names = only or [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    for name in names:
        tp = hints[name]
        default = preset[name] if name in preset else config_default(cls, name)
        help_ = (helps or {}).get(name) or docs.get(name, "")
        opt = (flags or {}).get(name) or ["--" + name.replace("_", "-")]
        base, _ = _strip_optional(tp)
        f = {x.name: x for x in dataclasses.fields(cls)}[name]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            conv, choices = _converter(name, tp)
            req: dict[str, Any] = {"dest": name, "required": True, "help": _with_default(help_)}
            if conv is not None:
                req["type"] = conv
            if choices is not None:
                req["choices"] = choices
            parser.add_argument(*opt, **req)
            continue
        if base is bool:
            parser.add_argument(*opt, dest=name, action=argparse.BooleanOptionalAction,
                                default=default, help=_with_default(help_))
            continue
        conv, choices = _converter(name, tp)
        kw: dict[str, Any] = {"dest": name, "default": default}
        if conv is not None:
            kw["type"] = conv
        if choices is not None:
            kw["choices"] = choices
        shown = "all" if name == "layers" and default is None else _show(default)
        kw["help"] = _with_default(help_, shown)
        parser.add_argument(*opt, **kw)
    return names


def config_from_args(cls: type, args: argparse.Namespace, **override: Any) -> Any:
    """The config `cls` with every field the parser set, then `override`."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    kw.update(override)
    return cls(**kw)


def check_configs(args: argparse.Namespace) -> None:
    """Build every config class the command's options came from, so that the class's own
    rules (its __post_init__) refuse bad values before the command loads or writes anything.
    A class with fields the options do not give is left to the command."""
    for key in sorted(vars(args)):
        if key.startswith(CONFIG_KEY):
            cls = getattr(args, key)
            required = [f.name for f in dataclasses.fields(cls)
                        if f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING]
            if all(hasattr(args, n) for n in required):
                config_from_args(cls, args)


def add_overrides(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  names: list[str], *, flags: dict[str, list[str]] | None = None,
                  shown: str = "the profile's") -> None:
    """Options that override a preset config (a profile) only when given: default None, and the
    help names the field's default in `cls`."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for name in names:
        conv, choices = _converter(name, hints[name])
        opt = (flags or {}).get(name) or ["--" + name.replace("_", "-")]
        kw: dict[str, Any] = {"dest": name, "default": None,
                              "help": _with_default(docs.get(name, ""), shown)}
        if conv is not None:
            kw["type"] = conv
        if choices is not None:
            kw["choices"] = choices
        parser.add_argument(*opt, **kw)


def given_overrides(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def signature_default(fn: Callable, name: str) -> Any:
    """The default of parameter `name` of `fn`: options that feed a function take it from there."""
    return inspect.signature(fn).parameters[name].default


def add_signature_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                          fn: Callable, helps: dict[str, str], *,
                          flags: dict[str, list[str]] | None = None) -> None:
    """One option per parameter named in `helps`, typed and defaulted by `fn`'s signature."""
    hints = typing.get_type_hints(fn)
    for name, help_ in helps.items():
        default = signature_default(fn, name)
        tp = hints.get(name, type(default))
        conv, choices = _converter(name, tp)
        if conv is None and get_origin(_strip_optional(tp)[0]) is tuple:
            conv = parse_str_tuple
        opt = (flags or {}).get(name) or ["--" + name.replace("_", "-")]
        if _strip_optional(tp)[0] is bool:
            parser.add_argument(*opt, dest=name, action=argparse.BooleanOptionalAction,
                                default=default, help=_with_default(help_))
            continue
        kw: dict[str, Any] = {"dest": name, "default": default,
                              "help": _with_default(help_, _show(default))}
        if conv is not None:
            kw["type"] = conv
        if choices is not None:
            kw["choices"] = choices
        parser.add_argument(*opt, **kw)


def signature_kwargs(args: argparse.Namespace, names) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names}

"""Command-line options generated from the config dataclasses, so that each default and each
help text lives in one place: the config field. A field's help is its metadata
(`saeflow.configs.setting`); its default is the field's default; its type says how text is read
(`Literal[...]` gives choices; `Tokens` accepts 300k / 2M, `Layers` all / 0-5 / 1,3,7, list
fields comma-separated values). No source is read and no field name decides anything.

Each command's options are added when the command is parsed or its help is shown
(`Parser.defer`), so `saeflow --help` imports no config module, and with it no torch."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys
import types
import typing
from typing import Annotated, Any, Callable, Literal, get_args, get_origin

from saeflow.configs import CORPUS, LAYERS, TOKENS, ReadAs, field_help, read_as
from saeflow.errors import ConfigError, SaeflowError

CONFIG_KEY = "_config_"  # namespace keys that name the config classes a command builds


class Parser(argparse.ArgumentParser):
    """saeflow's argparse parser: no prefix matching (`--model` was taken as `--model-name`),
    a usage error is one line on stderr and exit status 2, like every other bad input, and
    options can be added on first use (`defer`)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self._pending: list[Callable[[Parser], None]] = []
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def defer(self, build: Callable[["Parser"], None]) -> None:
        """Add options with `build(self)` only when this parser parses or shows its help."""
        self._pending.append(build)

    def _build(self) -> None:
        while self._pending:
            self._pending.pop(0)(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._build()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._build()
        return super().format_help()

    def format_usage(self) -> str:
        self._build()
        return super().format_usage()

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)",
              file=sys.stderr)
        sys.exit(2)


def command(sub, name: str, help: str, build: Callable[[Parser], None]) -> Parser:
    """A subcommand whose options `build` adds when it is used (its imports wait till then)."""
    p = sub.add_parser(name, help=help)
    p.defer(build)
    return p


def one_line(text: object) -> str:
    """A message on one line (tracebacks and wrapped texts would break the one-line rule)."""
    return " ".join(str(text).split())


def field_settings(cls: type) -> dict[str, tuple[str, ReadAs | None]]:
    """{field name: (help, how its text is read)} from each field's metadata and annotation.
    Every field of a config the CLI reads carries its help (`configs.setting`)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, tuple[str, ReadAs | None]] = {}
    for f in dataclasses.fields(cls):
        help_ = field_help(f)
        reads = read_as(hints[f.name])
        if help_ is None:
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with "
                            f"saeflow.configs.setting(default, help)")
        out[f.name] = (help_, reads)
    return out


def config_default(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _base_type(tp: Any) -> Any:
    """The plain type under `X | None` and `Annotated[X, ...]`."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            tp = args[0]
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


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
    from saeflow.lm.corpora import check_corpus_spec

    try:
        check_corpus_spec(text)
    except SaeflowError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


parse_int_list = _number_list(int, "integers")
parse_float_list = _number_list(parse_float, "numbers")
STR_TUPLE = ReadAs("str_tuple")  # a signature's tuple[str, ...] parameter: a comma list


def _token_count(text: str) -> int:
    from saeflow.lm.corpora import parse_tokens

    try:
        return parse_tokens(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# how text is read for each ReadAs marker
READERS: dict[ReadAs, Callable[[str], Any]] = {
    TOKENS: _token_count, LAYERS: parse_layers_arg, CORPUS: parse_corpus,
    STR_TUPLE: parse_str_tuple}


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


def _converter(tp: Any, reads: ReadAs | None = None
               ) -> tuple[Callable[[str], Any] | None, list | None]:
    """(argparse type, choices) for a field's annotation and its ReadAs marker."""
    tp = _base_type(tp)
    if get_origin(tp) is Literal:
        return None, list(get_args(tp))
    if reads is not None:
        return READERS[reads], None
    if get_origin(tp) is list:
        (item,) = get_args(tp) or (str,)
        if item is int:
            return parse_int_list, None
        if item is float:
            return parse_float_list, None
        return parse_str_list, None
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


def _option(parser, opt: list[str], name: str, tp: Any, reads: ReadAs | None, help_: str, *,
            default: Any = None, shown: str | None = None, required: bool = False) -> None:
    """One option read as `tp` / `reads` says: a flag pair for a bool, a checked value else."""
    if not required and _base_type(tp) is bool:
        parser.add_argument(*opt, dest=name, action=argparse.BooleanOptionalAction,
                            default=default, help=_with_default(help_))
        return
    conv, choices = _converter(tp, reads)
    kw: dict[str, Any] = {"dest": name}
    kw.update({"required": True} if required else {"default": default})
    if conv is not None:
        kw["type"] = conv
    if choices is not None:
        kw["choices"] = choices
    kw["help"] = _with_default(help_, None if required else shown)
    parser.add_argument(*opt, **kw)


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
    hints = typing.get_type_hints(cls, include_extras=True)
    settings = field_settings(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = only or [name for name in fields if name not in skip]
    for name in names:
        doc, reads = settings[name]
        f = fields[name]
        default = preset[name] if name in preset else config_default(cls, name)
        shown = "all" if reads == LAYERS and default is None else _show(default)
        _option(parser, (flags or {}).get(name) or ["--" + name.replace("_", "-")], name,
                hints[name], reads, (helps or {}).get(name) or doc, default=default,
                shown=shown, required=f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING)
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


def field_at(cls: type, path: str) -> tuple[type, str]:
    """(the dataclass that holds the field, its name) at a dotted `path` into nested configs."""
    *outer, name = path.split(".")
    for key in outer:
        cls = typing.get_type_hints(cls)[key]
    return cls, name


def add_overrides(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  names: list[str], *, flags: dict[str, list[str]] | None = None,
                  shown: str = "the profile's", paths: dict[str, str] | None = None,
                  helps: dict[str, str] | None = None) -> None:
    """Options that override a preset config (a profile) only when given: default None, and the
    help names the field's default in `cls`. `paths` places an option on a nested config's
    field (e.g. {"index_tokens": "index.tokens"}); `helps` words it for this command."""
    for name in names:
        owner, field_name = field_at(cls, (paths or {}).get(name, name))
        doc, reads = field_settings(owner)[field_name]
        tp = typing.get_type_hints(owner, include_extras=True)[field_name]
        conv, choices = _converter(tp, reads)
        opt = (flags or {}).get(name) or ["--" + name.replace("_", "-")]
        help_ = (helps or {}).get(name) or doc
        kw: dict[str, Any] = {"dest": name, "default": None, "help": _with_default(help_, shown)}
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
                          flags: dict[str, list[str]] | None = None,
                          reads: dict[str, ReadAs] | None = None) -> None:
    """One option per parameter named in `helps`, typed and defaulted by `fn`'s signature;
    `reads` marks parameters read as token counts, layer lists or corpus specs."""
    hints = typing.get_type_hints(fn, include_extras=True)
    for name, help_ in helps.items():
        default = signature_default(fn, name)
        tp = hints.get(name, type(default))
        marker = (reads or {}).get(name) or read_as(tp)
        opt = (flags or {}).get(name) or ["--" + name.replace("_", "-")]
        if get_origin(_base_type(tp)) is tuple:
            tp = Annotated[tuple, STR_TUPLE]
            marker = STR_TUPLE
        _option(parser, opt, name, tp, marker, help_, default=default, shown=_show(default))


def signature_kwargs(args: argparse.Namespace, names) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names}

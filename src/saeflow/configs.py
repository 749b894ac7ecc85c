"""What a config field says about itself: its help text and how a command line reads it.

The CLI generates one option per field from these (saeflow.cli.options), so a setting's default,
help and reading live on the field:

    tokens: Tokens = setting(200_000, "tokens to read (e.g. 200k, 2M)")
    layers: Layers | None = setting(None, "all, 0-5, or 1,3,7")

`Tokens`, `Layers` and `CorpusSpec` are the plain types annotated with how text becomes a value
(300k / 2M; all / 0-5 / 1,3,7; a checked corpus spec); every other field is read by its type
(`Literal[...]` gives the choices). This module imports nothing heavy: config modules use it,
and `saeflow --help` must stay fast.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any


@dataclass(frozen=True)
class ReadAs:
    """How a command line reads a field's text (beyond its type)."""
    kind: str  # "tokens", "layers" or "corpus"


TOKENS = ReadAs("tokens")
LAYERS = ReadAs("layers")
CORPUS = ReadAs("corpus")

Tokens = Annotated[int, TOKENS]  # a token count: 300k, 2M or 4096
Layers = Annotated[list[int], LAYERS]  # layers: all (None), 0-5 or 1,3,7
CorpusSpec = Annotated[str, CORPUS]  # text sources with shares, e.g. wiki=0.8,python=0.2

HELP = "help"


def setting(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with its help text; a list or dict default is copied per instance."""
    meta = {HELP: help}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=meta,
                                 **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def field_help(f: dataclasses.Field) -> str | None:
    """The help a field carries in its metadata (None: it carries none)."""
    return f.metadata.get(HELP)


def read_as(tp: Any) -> ReadAs | None:
    """The ReadAs marker of an annotation (`Tokens`, `Layers | None`, ...), if any."""
    for arg in (tp, *getattr(tp, "__args__", ())):
        for meta in getattr(arg, "__metadata__", ()):
            if isinstance(meta, ReadAs):
                return meta
    return None

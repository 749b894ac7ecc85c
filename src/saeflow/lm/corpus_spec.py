"""How a corpus is written on the command line and in configs: the spec ("wiki=0.8,python=0.2")
and token counts ("300k"). Kept apart from corpora.py (which needs torch and the tokenizers) so
that the config classes, and the CLI that reads them, check a spec without importing either."""
from __future__ import annotations

import math
import re
from pathlib import Path

from saeflow.errors import CorpusError

DEFAULT_SPEC = "wiki=0.8,python=0.2"
BUILTIN_SOURCES = ("wiki", "python")
SPEC_HINT = "write sources with shares, e.g. wiki=0.8,python=0.2 (or a file, or hf:NAME)"


def parse_corpus_spec(spec: str) -> list[tuple[str, float]]:
    """"wiki=0.8,python=0.2" -> [("wiki", 0.8), ("python", 0.2)]; a source without a share
    weighs 1. CorpusError for a share that is not a positive finite number, an empty spec, or
    a source that is neither built in, hf:NAME, nor an existing file or folder."""
    items: list[tuple[str, float]] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, share = part.rpartition("=") if "=" in part else (part, "", "1")
        name = name.strip()
        if not name:
            raise CorpusError(f"corpus part {part!r} names no source; {SPEC_HINT}")
        try:
            weight = float(share)
        except ValueError:
            raise CorpusError(f"the share of {name!r} in the corpus, {share!r}, is not a number; "
                              f"{SPEC_HINT}") from None
        if not (math.isfinite(weight) and weight > 0):
            raise CorpusError(f"the share of {name!r} in the corpus must be a positive number, "
                              f"not {share!r}; {SPEC_HINT}")
        if name not in BUILTIN_SOURCES and not name.startswith("hf:") and not Path(name).exists():
            raise CorpusError(f"unknown corpus source {name!r}: not wiki, python, hf:NAME or an "
                              f"existing file or folder")
        items.append((name, weight))
    if not items:
        raise CorpusError(f"the corpus spec {spec!r} is empty; {SPEC_HINT}")
    return items


def check_corpus_spec(spec: str) -> str:
    """`spec` when parse_corpus_spec accepts it (for config rules); CorpusError otherwise."""
    parse_corpus_spec(spec)
    return spec


def parse_tokens(text: str | int) -> int:
    """'300k' -> 300000, '1.5M' -> 1500000."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise CorpusError(f"cannot read a token count from {text!r}; use e.g. 300k or 2M")
    mult = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)

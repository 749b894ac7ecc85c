"""FALLBACK, for config fields that carry no metadata yet (saeflow.configs.setting): their help
is the comment on the field's line (or the comment lines just above it), read from the class
source, and a few field names say how their text is read (`tokens` / `*_tokens`: token counts,
`layers`: layer lists, `corpus`: a corpus spec). Fields with metadata never come here; when every
config field carries it, this module goes."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize
import types
import typing
from typing import Any, get_args, get_origin

from saeflow.configs import CORPUS, LAYERS, TOKENS, ReadAs


@functools.lru_cache(maxsize=None)
def comment_docs(cls: type) -> dict[str, str]:
    """{field name: the comment that documents it in the class body (or a base class's)}."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base) and base is not cls:
            docs.update(comment_docs(base))
    docs.update(_own_comment_docs(cls))
    return docs


def _own_comment_docs(cls: type) -> dict[str, str]:
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


def read_by_name(name: str, tp: Any) -> ReadAs | None:
    """How an unannotated field's text is read, from its name."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    if tp is int and (name == "tokens" or name.endswith("_tokens")):
        return TOKENS
    if name == "layers" and get_origin(tp) is list and get_args(tp) == (int,):
        return LAYERS
    if name == "corpus" and tp is str:
        return CORPUS
    return None

"""What every format reader shares: `SAEInfo` (what a folder holds), JSON and safetensors
readers that turn any damage into one SAEFormatError, dtype names, and an SAE's site from its
hook name."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saeflow.errors import SAEFormatError
from saeflow.lm.hookpoints import parse_hook_name


@dataclass
class SAEInfo:
    """What a folder holds, read from configs and tensor headers only."""

    format: str
    path: Path  # the SAE's folder (or the npz file's folder)
    d_in: int
    d_sae: int
    architecture: str
    dtype: str
    position: str | None = None
    layer: int | None = None
    hook_name: str | None = None
    model_name: str | None = None
    width: str | None = None  # variant labels (Gemma Scope): "16k"
    l0: str | None = None  # "82", "medium"
    extra: dict[str, Any] = field(default_factory=dict)
    refused: str | None = None  # why `load` will refuse this SAE (None: it loads)

    def summary(self) -> dict:
        return {"refused": self.refused, "options": self.extra.get("options", []),
                "variant": self.extra.get("variant"),"position": self.position, "layer": self.layer, "d_in": self.d_in,
                "d_sae": self.d_sae, "architecture": self.architecture, "dtype": self.dtype,
                "format": self.format, "hook_name": self.hook_name, "width": self.width,
                "l0": self.l0, "path": str(self.path)}


@dataclass
class ExpectedTensors:
    """What a format's config says its tensors are, for `check_files`: read from configs and
    tensor headers only."""

    header: dict[str, tuple[tuple[int, ...], str]]  # {name: (shape, dtype)} as stored
    shapes: dict[str, tuple]  # {name: the shape the config implies}; a None dim: not said
    d_sae: int | None
    cfg_dtype: str | None = None  # the dtype the config names, if any
    k: int | None = None
    matrices: tuple[str, ...] = ()  # the weight matrices a cfg dtype must not contradict
    k_groups: bool = False  # GroupMax: k groups must divide d_sae


# --- helpers --------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SAEFormatError(f"{path} is missing") from None
    except ValueError as e:
        raise SAEFormatError(f"{path} is not valid JSON ({e}); re-download or re-convert it") from e


def require(cfg: dict, key: str, path: Path):
    if key not in cfg:
        raise SAEFormatError(f"{path} is missing the key {key!r}; it is needed to load this SAE")
    return cfg[key]


def safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} from a safetensors header, without reading tensor data."""
    from safetensors import safe_open

    if not path.is_file():
        raise SAEFormatError(f"{path} is missing")
    try:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        # A truncated file can still have an intact header: check the data length too.
        _check_safetensors_length(path)
        return out
    except SAEFormatError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise SAEFormatError(f"{path} is truncated or corrupt ({e}); re-download or re-convert it") from e


def _check_safetensors_length(path: Path) -> None:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    have = path.stat().st_size - 8 - n
    if have < end:
        raise SAEFormatError(f"{path} is truncated: {have} data bytes, header says {end}; "
                             f"re-download or re-convert it")


def load_safetensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a file; with `sha256` (a saeflow pack's manifest), the bytes read are
    hashed too, and a file edited after the pack was written is refused."""
    from safetensors.torch import load as load_bytes

    safetensors_header(path)
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise SAEFormatError(f"{path} was changed after the pack was written (its sha256 differs "
                             f"from pack.json); re-convert the SAE, or restore the file")
    try:
        return load_bytes(data)
    except Exception as e:
        raise SAEFormatError(f"{path} is truncated or corrupt ({e}); re-download or re-convert it") from e


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
              "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
              "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def dtype_name(st_dtype: str) -> str:
    return _ST_DTYPES.get(st_dtype, st_dtype.lower())


def hook_position(hook: str | None, where: Path, family: str | None = None):
    if hook is None:
        return None, None
    try:
        return parse_hook_name(hook, family)
    except ValueError as e:
        raise SAEFormatError(f"{where}: {e}") from e


def family_of(model_name: str | None) -> str | None:
    """The family a model name says for sure (None when it does not: Gemma 1 and Gemma 2
    place `post_attention_layernorm` differently, so a bare 'gemma' decides nothing)."""
    if not model_name:
        return None
    m = model_name.lower()
    if re.search(r"gemma-?3", m):
        return "gemma3"
    if re.search(r"gemma-?2(?![0-9.]*b)", m):  # gemma-2-2b, gemma2; not Gemma 1's gemma-2b
        return "gemma2"
    for fam in ("llama", "qwen", "gpt2", "smollm"):
        if fam in m:
            return "llama" if fam == "smollm" else fam
    return None


def placed(hook: str | None, where: Path, family: str | None):
    """(position, layer, refusal): an SAE whose site cannot be known is refused, not guessed."""
    try:
        position, layer = hook_position(hook, where, family)
    except SAEFormatError as e:
        return None, None, str(e).removeprefix(f"{where}: ")
    return position, layer, None

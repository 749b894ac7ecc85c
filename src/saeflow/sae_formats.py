"""Read and write single SAEs in the formats users already have.

Each reader has two entry points: `describe_*` reads only configs and tensor headers (cheap,
used by `pack inspect`), and `load_*` reads the weights. Formats:

    saelens      cfg.json + sae_weights.safetensors (6.x nested metadata, and pre-6.0 flat)
    gemmascope   params.npz                         (Gemma Scope, Gemma 2)
    gemmascope2  params.safetensors + config.json   (Gemma Scope 2, Gemma 3)
    sparsify     cfg.json + sae.safetensors         (EleutherAI sparsify, one dir per hookpoint)
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .hookpoints import parse_hook_name
from .sae import SAE

FORMATS = ("saelens", "gemmascope", "gemmascope2", "sparsify")
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"


class SAEFormatError(ValueError):
    """A file or config that cannot be read as the format it claims to be."""


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

    def summary(self) -> dict:
        return {"position": self.position, "layer": self.layer, "d_in": self.d_in,
                "d_sae": self.d_sae, "architecture": self.architecture, "dtype": self.dtype,
                "format": self.format, "hook_name": self.hook_name, "width": self.width,
                "l0": self.l0, "path": str(self.path)}


# --- helpers --------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SAEFormatError(f"{path} is missing") from None
    except ValueError as e:
        raise SAEFormatError(f"{path} is not valid JSON ({e}); re-download or re-convert it") from e


def _require(cfg: dict, key: str, path: Path):
    if key not in cfg:
        raise SAEFormatError(f"{path} is missing the key {key!r}; it is needed to load this SAE")
    return cfg[key]


def _safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
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


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as e:
        raise SAEFormatError(f"{path} is truncated or corrupt ({e}); re-download or re-convert it") from e


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _dtype_name(st_dtype: str) -> str:
    return _ST_DTYPES.get(st_dtype, st_dtype.lower())


def _hook_position(hook: str | None, where: Path, family: str | None = None):
    if hook is None:
        return None, None
    try:
        return parse_hook_name(hook, family)
    except ValueError as e:
        raise SAEFormatError(f"{where}: {e}") from e


def _family_of(model_name: str | None) -> str | None:
    if not model_name:
        return None
    m = model_name.lower()
    for fam in ("gemma", "llama", "qwen", "gpt2", "smollm"):
        if fam in m:
            return "llama" if fam == "smollm" else fam
    return None


# --- SAELens --------------------------------------------------------------------------------
_SAELENS_ARCH = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk",
                 "batchtopk": "batchtopk", "jump_relu": "jumprelu"}


def _saelens_arch(cfg: dict, path: Path) -> tuple[str, int | None]:
    meta = cfg.get("metadata") or {}
    saeflow_arch = (meta.get("saeflow") or {}).get("architecture")
    if "architecture" in cfg:
        raw = cfg["architecture"]
    else:  # pre-6.0 flat configs: activation_fn_str decides
        act = cfg.get("activation_fn_str", "relu")
        raw = {"relu": "standard", "topk": "topk"}.get(act, act)
    if raw not in _SAELENS_ARCH:
        raise SAEFormatError(f"{path}: architecture {raw!r} is not supported "
                             f"(supported: standard/relu, jumprelu, topk, batchtopk)")
    arch = _SAELENS_ARCH[raw]
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if saeflow_arch == "batchtopk":
        arch = "batchtopk"
        k = k or (meta.get("saeflow") or {}).get("k")
    return arch, (int(k) if k else None)


def _saelens_hook(cfg: dict) -> str | None:
    meta = cfg.get("metadata") or {}
    return meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")


def _check_norm(cfg: dict, path: Path) -> None:
    norm = cfg.get("normalize_activations", "none") or "none"
    # expected_average_only_in: SAELens folds the scaling factor into the weights on save.
    if norm not in ("none", "expected_average_only_in"):
        raise SAEFormatError(f"{path}: normalize_activations={norm!r} is not supported "
                             f"(supported: none, expected_average_only_in)")


def describe_saelens(folder: Path) -> SAEInfo:
    cfg = _read_json(folder / SAELENS_CFG)
    header = _safetensors_header(folder / SAELENS_WEIGHTS)
    arch, _ = _saelens_arch(cfg, folder / SAELENS_CFG)
    d_in = int(_require(cfg, "d_in", folder / SAELENS_CFG))
    d_sae = int(cfg.get("d_sae") or header.get("W_enc", ((0, 0), ""))[0][1])
    if "W_enc" not in header:
        raise SAEFormatError(f"{folder / SAELENS_WEIGHTS} has no W_enc tensor")
    if header["W_enc"][0] != (d_in, d_sae):
        raise SAEFormatError(f"{folder}: cfg.json says d_in={d_in}, d_sae={d_sae} but W_enc has "
                             f"shape {header['W_enc'][0]}")
    meta = cfg.get("metadata") or {}
    model_name = meta.get("model_name") or cfg.get("model_name")
    hook = _saelens_hook(cfg)
    position, layer = _hook_position(hook, folder / SAELENS_CFG, _family_of(model_name))
    sf = meta.get("saeflow") or {}
    position, layer = sf.get("position", position), sf.get("layer", layer)
    return SAEInfo("saelens", folder, d_in, d_sae, arch, _dtype_name(header["W_enc"][1]),
                   position, layer, hook, model_name,
                   extra={"neuronpedia_id": meta.get("neuronpedia_id") or cfg.get("neuronpedia_id")})


def load_saelens(folder: Path) -> SAE:
    cfg_path = folder / SAELENS_CFG
    cfg = _read_json(cfg_path)
    _require(cfg, "d_in", cfg_path)
    _check_norm(cfg, cfg_path)
    arch, k = _saelens_arch(cfg, cfg_path)
    t = _load_safetensors(folder / SAELENS_WEIGHTS)
    if "threshold" not in t and "log_threshold" in t:
        t["threshold"] = t.pop("log_threshold").exp()
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec") if n not in t]
    if missing:
        raise SAEFormatError(f"{folder / SAELENS_WEIGHTS} lacks tensors {missing}")
    meta = cfg.get("metadata") or {}
    sf = meta.get("saeflow") or {}
    apply_b_dec = cfg.get("apply_b_dec_to_input")
    if apply_b_dec is None:
        apply_b_dec = arch != "jumprelu"
    sae = SAE(W_enc=t["W_enc"], W_dec=t["W_dec"], b_enc=t["b_enc"], b_dec=t["b_dec"],
              architecture=arch, threshold=t.get("threshold"), k=k,
              apply_b_dec_to_input=bool(apply_b_dec),
              input_scale=float(sf.get("input_scale", 1.0)),
              batchtopk_inference="jumprelu" if "threshold" in t else "topk",
              metadata={"source_format": "saelens", "cfg": cfg})
    if sae.d_in != int(cfg["d_in"]):
        raise SAEFormatError(f"{cfg_path} says d_in={cfg['d_in']} but W_enc has d_in={sae.d_in}")
    return sae


def save_saelens(sae: SAE, folder: Path, *, position: str, layer: int, hook_name: str,
                 model_name: str | None = None, extra_metadata: dict | None = None) -> None:
    """Write one SAE as a SAELens 6.x folder that SAELens itself can load.

    input_scale is folded into the weights (exact), since SAELens has no field for it.
    BatchTopK is written as the inference form SAELens knows (jumprelu or topk), with the
    training architecture kept under metadata.saeflow.
    """
    from safetensors.torch import save_file

    original_arch = sae.architecture
    sae = sae.fold_input_scale()
    act = sae.activation
    sl_arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[act]
    saeflow_meta = {"position": position, "layer": layer, "architecture": original_arch}
    if original_arch == "batchtopk" and sae.k:
        saeflow_meta["k"] = sae.k
    if "input_scale_folded" in sae.metadata:
        saeflow_meta["input_scale_folded"] = sae.metadata["input_scale_folded"]
    cfg = {
        "architecture": sl_arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if position == "attn_z" else "none",
        "metadata": {
            "model_name": model_name,
            "hook_name": hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            **(extra_metadata or {}),
            "saeflow": saeflow_meta,
        },
    }
    if act == "topk":
        cfg["k"] = sae.k
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.tensors().items()}
    save_file(tensors, str(folder / SAELENS_WEIGHTS), metadata={"format": "pt"})
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")


# --- Gemma Scope (params.npz) ---------------------------------------------------------------
_GS_PATH = re.compile(r"layer_(\d+)/width_([^/]+)/(average_l0_(\d+)|canonical)")


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                with zf.open(name) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if major == 1
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                    out[name.removesuffix(".npy")] = (tuple(shape), str(dtype))
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise SAEFormatError(f"{path} is truncated or corrupt ({e}); re-download it") from e
    return out


def gemmascope_position_from_path(path: Path) -> str | None:
    """Gemma Scope repos are named ...-res / -mlp / -att; the npz itself does not say."""
    s = str(path).lower()
    for token, pos in (("-att", "attn_z"), ("-mlp", "mlp_out"), ("-res", "resid_post"),
                       ("/attn_z/", "attn_z"), ("/mlp_out/", "mlp_out"),
                       ("/resid_post/", "resid_post"), ("/attn_out/", "attn_z")):
        if token in s:
            return pos
    return None


def describe_gemmascope(npz: Path, position: str | None = None) -> SAEInfo:
    h = _npz_headers(npz)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        if name not in h:
            raise SAEFormatError(f"{npz} lacks array {name!r} (Gemma Scope params.npz needs "
                                 f"W_enc, W_dec, b_enc, b_dec, threshold)")
    d_in, d_sae = h["W_enc"][0]
    m = _GS_PATH.search(npz.as_posix())
    layer = int(m.group(1)) if m else None
    width = m.group(2) if m else None
    l0 = (m.group(4) or "canonical") if m else None
    position = position or gemmascope_position_from_path(npz)
    return SAEInfo("gemmascope", npz.parent, d_in, d_sae, "jumprelu", h["W_enc"][1], position,
                   layer, None, None, width, l0, extra={"file": npz.name})


def load_gemmascope(npz: Path) -> SAE:
    _npz_headers(npz)
    try:
        with np.load(npz) as p:
            arrays = {k: torch.from_numpy(np.array(p[k])) for k in p.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise SAEFormatError(f"{npz} is truncated or corrupt ({e}); re-download it") from e
    return SAE(W_enc=arrays["W_enc"], W_dec=arrays["W_dec"], b_enc=arrays["b_enc"],
               b_dec=arrays["b_dec"], threshold=arrays["threshold"], architecture="jumprelu",
               apply_b_dec_to_input=False, metadata={"source_format": "gemmascope"})


# --- Gemma Scope 2 (params.safetensors + config.json) ----------------------------------------
_GS2_NAME = re.compile(r"layer_(\d+)_width_([^_]+)_l0_([^_/]+)")


def describe_gemmascope2(folder: Path) -> SAEInfo:
    cfg = _read_json(folder / "config.json")
    header = _safetensors_header(folder / "params.safetensors")
    if "w_enc" not in header:
        raise SAEFormatError(f"{folder / 'params.safetensors'} has no w_enc tensor")
    d_in, d_sae = header["w_enc"][0]
    hook = _require(cfg, "hf_hook_point_in", folder / "config.json")
    position, layer = _hook_position(hook, folder / "config.json", "gemma3")
    if cfg.get("type") not in (None, "sae"):
        raise SAEFormatError(f"{folder}: Gemma Scope 2 type {cfg.get('type')!r} is not an SAE "
                             f"(transcoders and crosscoders are not supported here)")
    m = _GS2_NAME.search(folder.name)
    return SAEInfo("gemmascope2", folder, d_in, d_sae, "jumprelu",
                   _dtype_name(header["w_enc"][1]), position, layer, hook,
                   cfg.get("model_name"), str(cfg.get("width") or (m.group(2) if m else "")),
                   str(cfg.get("l0") or (m.group(3) if m else "")) or None)


def load_gemmascope2(folder: Path) -> SAE:
    cfg = _read_json(folder / "config.json")
    arch = cfg.get("architecture", "jump_relu")
    if arch not in ("jump_relu", "jumprelu"):
        raise SAEFormatError(f"{folder}: architecture {arch!r} is not supported (expected jump_relu)")
    t = _load_safetensors(folder / "params.safetensors")
    missing = [n for n in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold") if n not in t]
    if missing:
        raise SAEFormatError(f"{folder / 'params.safetensors'} lacks tensors {missing}")
    return SAE(W_enc=t["w_enc"], W_dec=t["w_dec"], b_enc=t["b_enc"], b_dec=t["b_dec"],
               threshold=t["threshold"], architecture="jumprelu", apply_b_dec_to_input=False,
               metadata={"source_format": "gemmascope2", "cfg": cfg})


# --- EleutherAI sparsify --------------------------------------------------------------------
def describe_sparsify(folder: Path, family: str | None = None) -> SAEInfo:
    cfg = _read_json(folder / "cfg.json")
    header = _safetensors_header(folder / "sae.safetensors")
    if "encoder.weight" not in header:
        raise SAEFormatError(f"{folder / 'sae.safetensors'} has no encoder.weight tensor")
    d_sae, d_in = header["encoder.weight"][0]
    if cfg.get("d_in") is not None and int(cfg["d_in"]) != d_in:
        raise SAEFormatError(f"{folder}: cfg.json d_in={cfg['d_in']} but encoder.weight is "
                             f"{header['encoder.weight'][0]}")
    position, layer = _hook_position(folder.name, folder, family)
    return SAEInfo("sparsify", folder, d_in, d_sae, "topk",
                   _dtype_name(header["encoder.weight"][1]), position, layer, folder.name)


def load_sparsify(folder: Path) -> SAE:
    cfg = _read_json(folder / "cfg.json")
    if cfg.get("skip_connection") or cfg.get("transcode"):
        raise SAEFormatError(f"{folder}: sparsify transcoders / skip connections are not SAEs; "
                             f"not supported")
    k = int(_require(cfg, "k", folder / "cfg.json"))
    t = _load_safetensors(folder / "sae.safetensors")
    missing = [n for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if n not in t]
    if missing:
        raise SAEFormatError(f"{folder / 'sae.safetensors'} lacks tensors {missing}")
    return SAE(W_enc=t["encoder.weight"].T.contiguous(), W_dec=t["W_dec"], b_enc=t["encoder.bias"],
               b_dec=t["b_dec"], architecture="topk", k=k, apply_b_dec_to_input=True,
               metadata={"source_format": "sparsify", "cfg": cfg})


def detect_format(folder: Path) -> str | None:
    """Which format a single SAE folder is in, from its file names."""
    if (folder / SAELENS_WEIGHTS).is_file() or ((folder / SAELENS_CFG).is_file()
                                                and not (folder / "sae.safetensors").is_file()):
        return "saelens"
    if (folder / "params.npz").is_file():
        return "gemmascope"
    if (folder / "params.safetensors").is_file():
        return "gemmascope2"
    if (folder / "sae.safetensors").is_file():
        return "sparsify"
    return None


def describe(folder: Path, fmt: str, position: str | None = None,
             family: str | None = None) -> SAEInfo:
    if fmt == "saelens":
        return describe_saelens(folder)
    if fmt == "gemmascope":
        return describe_gemmascope(folder / "params.npz", position)
    if fmt == "gemmascope2":
        return describe_gemmascope2(folder)
    if fmt == "sparsify":
        return describe_sparsify(folder, family)
    raise SAEFormatError(f"unknown SAE format {fmt!r}; known: {', '.join(FORMATS)}")


def load(folder: Path, fmt: str) -> SAE:
    if fmt == "saelens":
        return load_saelens(folder)
    if fmt == "gemmascope":
        return load_gemmascope(folder / "params.npz")
    if fmt == "gemmascope2":
        return load_gemmascope2(folder)
    if fmt == "sparsify":
        return load_sparsify(folder)
    raise SAEFormatError(f"unknown SAE format {fmt!r}; known: {', '.join(FORMATS)}")

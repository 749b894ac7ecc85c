"""Gemma Scope: params.npz (Gemma 2), and Gemma Scope 2: params.safetensors + config.json
(Gemma 3). Both are JumpReLU SAEs that do not subtract b_dec before encoding."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from saeflow.errors import SAEFormatError
from saeflow.saes.formats.common import (
    ExpectedTensors,
    SAEInfo,
    dtype_name,
    hook_position,
    load_safetensors,
    read_json,
    require,
    safetensors_header,
)
from saeflow.saes.sae import SAE

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
               apply_b_dec_to_input=False, metadata={"source_format": "gemmascope"}).same_dtype()


# --- Gemma Scope 2 (params.safetensors + config.json) ----------------------------------------
_GS2_NAME = re.compile(r"layer_(\d+)_width_([^_]+)_l0_([^_/]+)")


def describe_gemmascope2(folder: Path) -> SAEInfo:
    cfg = read_json(folder / "config.json")
    header = safetensors_header(folder / "params.safetensors")
    if "w_enc" not in header:
        raise SAEFormatError(f"{folder / 'params.safetensors'} has no w_enc tensor")
    d_in, d_sae = header["w_enc"][0]
    hook = require(cfg, "hf_hook_point_in", folder / "config.json")
    refused = _gemmascope2_refusal(cfg)
    try:
        position, layer = hook_position(hook, folder / "config.json", "gemma3")
    except SAEFormatError:
        if not refused:
            raise
        position, layer = None, None  # listed as refused; its site does not matter
    m = _GS2_NAME.search(folder.name)
    return SAEInfo("gemmascope2", folder, d_in, d_sae, "jumprelu",
                   dtype_name(header["w_enc"][1]), position, layer, hook,
                   cfg.get("model_name"), str(cfg.get("width") or (m.group(2) if m else "")),
                   str(cfg.get("l0") or (m.group(3) if m else "")) or None, refused=refused)


def _gemmascope2_refusal(cfg: dict) -> str | None:
    if cfg.get("type") not in (None, "sae"):
        return (f"Gemma Scope 2 type {cfg.get('type')!r} is not an SAE (transcoders and "
                f"crosscoders are not supported)")
    if cfg.get("affine_connection"):
        return "affine_connection (a skip transcoder) is not supported"
    if cfg.get("hf_hook_point_out") not in (None, cfg.get("hf_hook_point_in")):
        return "reads one site and writes another (a transcoder); not supported"
    return None


def load_gemmascope2(folder: Path, sha256: str | None = None) -> SAE:
    cfg = read_json(folder / "config.json")
    if refused := _gemmascope2_refusal(cfg):
        raise SAEFormatError(f"{folder}: {refused}")
    arch = cfg.get("architecture", "jump_relu")
    if arch not in ("jump_relu", "jumprelu"):
        raise SAEFormatError(f"{folder}: architecture {arch!r} is not supported (expected jump_relu)")
    t = load_safetensors(folder / "params.safetensors", sha256)
    missing = [n for n in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold") if n not in t]
    if missing:
        raise SAEFormatError(f"{folder / 'params.safetensors'} lacks tensors {missing}")
    return SAE(W_enc=t["w_enc"], W_dec=t["w_dec"], b_enc=t["b_enc"], b_dec=t["b_dec"],
               threshold=t["threshold"], architecture="jumprelu", apply_b_dec_to_input=False,
               metadata={"source_format": "gemmascope2", "cfg": cfg}).same_dtype()


def expected_tensors_gemmascope(folder: Path) -> ExpectedTensors:
    h = _npz_headers(folder / "params.npz")
    d_in, d_sae = h.get("W_enc", ((None, None), ""))[0]
    names = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
             "threshold": (d_sae,)}
    return ExpectedTensors(h, names, d_sae, matrices=("W_enc", "W_dec"))


def expected_tensors_gemmascope2(folder: Path) -> ExpectedTensors:
    h = safetensors_header(folder / "params.safetensors")
    d_in, d_sae = h.get("w_enc", ((None, None), ""))[0]
    names = {"w_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
             "threshold": (d_sae,)}
    return ExpectedTensors(h, names, d_sae, matrices=("w_enc", "w_dec"))

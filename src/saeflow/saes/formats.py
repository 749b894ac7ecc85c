"""Read and write single SAEs in the formats users already have.

Each reader has two entry points: `describe_*` reads only configs and tensor headers (cheap,
used by `pack inspect`), and `load_*` reads the weights. Formats:

    saelens      cfg.json + sae_weights.safetensors (6.x nested metadata, and pre-6.0 flat)
    gemmascope   params.npz                         (Gemma Scope, Gemma 2)
    gemmascope2  params.safetensors + config.json   (Gemma Scope 2, Gemma 3)
    sparsify     cfg.json + sae.safetensors         (EleutherAI sparsify, one dir per hookpoint)
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeflow._version import __version__
from saeflow.errors import ConfigError, SAEFormatError, SAEShapeError
from saeflow.lm.hookpoints import parse_hook_name
from saeflow.saes.sae import SAE

FORMATS = ("saelens", "gemmascope", "gemmascope2", "sparsify")
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"


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


def _load_safetensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a file; with `sha256` (a saeflow pack's manifest), the bytes read are
    hashed too, and a file edited after the pack was written is refused."""
    from safetensors.torch import load as load_bytes

    _safetensors_header(path)
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


# --- SAELens --------------------------------------------------------------------------------
# Every option saeflow reads is implemented exactly or refused with one line (README's table).
_SAELENS_ARCH = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk",
                 "batchtopk": "batchtopk", "jump_relu": "jumprelu"}
_SAELENS_REFUSED = {
    "gated": "gated SAEs (separate gate and magnitude paths) are not supported",
    "abstopk": "abs-TopK SAEs are not supported",
    "transcoder": "this is a transcoder (it maps one site to another), not an SAE",
    "skip_transcoder": "this is a skip transcoder, not an SAE",
    "jumprelu_transcoder": "this is a transcoder, not an SAE",
    "jumprelu_skip_transcoder": "this is a skip transcoder, not an SAE",
    "temporal": "temporal SAEs are not supported",
    "matching_pursuit": "matching-pursuit SAEs are not supported",
    "matryoshka_batchtopk": "Matryoshka BatchTopK training checkpoints are not supported; "
                            "export the inference SAE (jumprelu) with SAELens first",
}
# The format version written in metadata: SAELens reads configs without one as pre-6.0 flat
# configs and drops their metadata (hook_name, model_name).
SAELENS_FORMAT_VERSION = "6.0.0"
# Written under metadata.saeflow for the record and carried through loads and conversions, never
# applied: the trainer's per-dimension input scale, already folded exactly into the weights.
SAEFLOW_RECORD_KEYS = ("input_norm", "dim_cap", "dim_scale", "dim_scale_note")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


@dataclass
class _SAELensPlan:
    """How a SAELens cfg maps onto saeflow's SAE, or why it cannot."""

    arch: str | None
    k: int | None
    apply_b_dec: bool
    rescale_by_decoder_norm: bool
    dtype: str | None
    refused: str | None
    # BatchTopK training checkpoint: its running threshold is the inference threshold.
    topk_threshold: bool = False


def _is_pre_6(cfg: dict) -> bool:
    """SAELens reads a cfg as pre-6.0 when neither it nor its metadata names a version >= 6."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    m = re.match(r"\s*(\d+)", str(version or ""))
    return m is None or int(m.group(1)) < 6


def _saelens_arch_and_k(cfg: dict) -> tuple[str, Any, str | None]:
    """(architecture name, k, refusal) as SAELens's loader resolves them."""
    k = cfg.get("k")
    if not _is_pre_6(cfg):
        return str(cfg.get("architecture", "standard")), k, None
    # Pre-6.0 configs: `activation_fn_str` (or `activation_fn`) decides; SAELens 6 turns
    # architecture "standard" with a topk activation and activation_fn_kwargs.k into TopK.
    act = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    raw = str(cfg.get("architecture", "standard"))
    if act == "topk" and raw in ("standard", "topk"):
        k = (cfg.get("activation_fn_kwargs") or {}).get("k", k)
        if k is None:
            return raw, None, "a pre-6.0 TopK config without activation_fn_kwargs.k"
        return "topk", k, None
    if raw == "standard" and act != "relu":
        return raw, k, f"pre-6.0 activation_fn {act!r} is not supported (relu, topk)"
    return raw, k, None


def _saelens_plan(cfg: dict, tensor_names, path: Path) -> _SAELensPlan:
    meta = cfg.get("metadata") or {}
    sf = meta.get("saeflow") or {}
    raw, k, refused = _saelens_arch_and_k(cfg)
    arch = _SAELENS_ARCH.get(raw)
    if refused is None:
        if raw in _SAELENS_REFUSED:
            refused = _SAELENS_REFUSED[raw]
        elif arch is None:
            refused = (f"architecture {raw!r} is not supported (supported: standard/relu, "
                       f"jumprelu, topk, batchtopk)")
        elif "W_skip" in tensor_names or cfg.get("d_out") not in (None, cfg.get("d_in")) \
                or meta.get("hook_name_out"):
            refused = "this is a transcoder (it has a separate output site), not an SAE"
    if sf.get("architecture") == "batchtopk" and arch in ("jumprelu", "topk"):
        arch, k = "batchtopk", k or sf.get("k")
    norm = cfg.get("normalize_activations", "none")
    # Legacy booleans: SAELens maps true to expected_average_only_in, whose scaling factor is
    # folded into the weights on save (identity at inference).
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    if refused is None and norm not in ("none", "expected_average_only_in"):
        why = {"layer_norm": "normalises each input by its own mean and std at run time",
               "constant_norm_rescale": "rescales each input to norm sqrt(d_in) at run time",
               "covariance_whitening": "whitens inputs with a stored covariance"}.get(norm, "")
        refused = (f"normalize_activations={norm!r} is not supported{f' (it {why})' if why else ''}"
                   f"; supported: none, expected_average_only_in")
    head = meta.get("hook_head_index", cfg.get("hook_head_index", cfg.get("hook_point_head_index")))
    if refused is None and head is not None:
        refused = f"hook_head_index={head}: SAEs on a single attention head are not supported"
    if refused is None and cfg.get("finetuning_scaling_factor"):
        refused = "finetuning_scaling_factor is not supported"
    if refused is None and arch == "topk" and not k:
        refused = "a TopK SAE config needs k"
    # A BatchTopK training checkpoint runs as SAELens's inference export does: JumpReLU with
    # the learned threshold, so its (possibly fractional) k is a training target only.
    topk_threshold = raw == "batchtopk" and "topk_threshold" in tensor_names
    if refused is None and k is not None and not topk_threshold and float(k) != int(float(k)):
        refused = (f"k={k} is fractional and there is no topk_threshold to run it by; export the "
                   f"inference SAE with SAELens's save_inference_model")
    k_int = int(float(k)) if k is not None and not topk_threshold else None
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm")) and arch in ("topk", "batchtopk")
    # SAELens defaults apply_b_dec_to_input to true for every architecture, old and new.
    apply_b_dec = cfg.get("apply_b_dec_to_input")
    dtype = cfg.get("dtype")
    if refused is None and dtype is not None and dtype.removeprefix("torch.") not in _TORCH_DTYPES:
        refused = f"dtype {dtype!r} is not supported (float32, float16, bfloat16, float64)"
    return _SAELensPlan(arch, k_int, True if apply_b_dec is None else bool(apply_b_dec), rescale,
                        dtype.removeprefix("torch.") if dtype else None, refused, topk_threshold)


def _saelens_hook(cfg: dict) -> str | None:
    meta = cfg.get("metadata") or {}
    return meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")


def describe_saelens(folder: Path, family: str | None = None) -> SAEInfo:
    cfg = _read_json(folder / SAELENS_CFG)
    header = _safetensors_header(folder / SAELENS_WEIGHTS)
    plan = _saelens_plan(cfg, header, folder / SAELENS_CFG)
    d_in = int(_require(cfg, "d_in", folder / SAELENS_CFG))
    meta = cfg.get("metadata") or {}
    model_name = meta.get("model_name") or cfg.get("model_name")
    hook = _saelens_hook(cfg)
    arch = plan.arch or str(cfg.get("architecture"))
    dtype = plan.dtype or (_dtype_name(header["W_enc"][1]) if "W_enc" in header else "?")
    if plan.refused:  # listed by its reason; its tensors and site do not matter
        return SAEInfo("saelens", folder, d_in, int(cfg.get("d_sae") or 0), arch, dtype,
                       None, None, hook, model_name, refused=plan.refused)
    if "W_enc" not in header:
        raise SAEFormatError(f"{folder / SAELENS_WEIGHTS} has no W_enc tensor")
    d_sae = int(cfg.get("d_sae") or header["W_enc"][0][1])
    position, layer, refused = _placed(hook, folder / SAELENS_CFG, family or _family_of(model_name))
    sf = meta.get("saeflow") or {}
    if "position" in sf and "layer" in sf:  # saeflow's own record of the site
        position, layer, refused = sf["position"], sf["layer"], None
    options = []
    if plan.rescale_by_decoder_norm:
        options.append("rescale_acts_by_decoder_norm (folded into the weights)")
    if plan.topk_threshold:
        options.append("BatchTopK training checkpoint: runs as JumpReLU at its topk_threshold")
    extra: dict[str, Any] = {
        "neuronpedia_id": meta.get("neuronpedia_id") or cfg.get("neuronpedia_id"),
        **({"options": options} if options else {})}
    return SAEInfo("saelens", folder, d_in, d_sae, arch, dtype, position, layer, hook,
                   model_name, extra=extra, refused=refused)


def _placed(hook: str | None, where: Path, family: str | None):
    """(position, layer, refusal): an SAE whose site cannot be known is refused, not guessed."""
    try:
        position, layer = _hook_position(hook, where, family)
    except SAEFormatError as e:
        return None, None, str(e).removeprefix(f"{where}: ")
    return position, layer, None


def load_saelens(folder: Path, sha256: str | None = None) -> SAE:
    cfg_path = folder / SAELENS_CFG
    cfg = _read_json(cfg_path)
    _require(cfg, "d_in", cfg_path)
    t = _load_safetensors(folder / SAELENS_WEIGHTS, sha256)
    plan = _saelens_plan(cfg, t, cfg_path)
    if plan.refused:
        raise SAEFormatError(f"{folder}: {plan.refused}")
    assert plan.arch is not None  # a plan without an architecture is refused
    if "threshold" not in t and "log_threshold" in t:
        t["threshold"] = t.pop("log_threshold").exp()
    scale = t.pop("scaling_factor", None)
    if scale is not None and not torch.all(scale == 1):
        raise SAEFormatError(f"{folder}: a scaling_factor tensor other than ones is not supported")
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec") if n not in t]
    if missing:
        raise SAEFormatError(f"{folder / SAELENS_WEIGHTS} lacks tensors {missing}")
    # SAELens casts every tensor to the cfg's dtype on load; so does saeflow, for equal numbers.
    dtype = _TORCH_DTYPES[plan.dtype] if plan.dtype else t["W_enc"].dtype
    topk_threshold = t.pop("topk_threshold", None)  # [] float64, BatchTopK training only
    t = {n: v.to(dtype) for n, v in t.items()}
    if plan.topk_threshold:
        assert topk_threshold is not None
        # As SAELens's save_inference_model: one threshold for every latent, in b_enc's dtype.
        t["threshold"] = torch.ones_like(t["b_enc"]) * topk_threshold.item()
    if plan.arch == "jumprelu" and "threshold" not in t:
        raise SAEFormatError(f"{folder / SAELENS_WEIGHTS}: a JumpReLU SAE needs a threshold tensor")
    sf = (cfg.get("metadata") or {}).get("saeflow") or {}
    sae_kw = {"input_scale": float(sf.get("input_scale", 1.0))}
    record = {k: sf[k] for k in SAEFLOW_RECORD_KEYS if k in sf}
    if plan.topk_threshold:
        record["batchtopk_k"] = cfg.get("k")  # the training target; inference uses the threshold
    try:
        sae = SAE(W_enc=t["W_enc"], W_dec=t["W_dec"], b_enc=t["b_enc"], b_dec=t["b_dec"],
                  architecture=plan.arch, threshold=t.get("threshold"), k=plan.k,
                  apply_b_dec_to_input=plan.apply_b_dec,
                  batchtopk_inference="jumprelu" if "threshold" in t else "topk",
                  metadata={"source_format": "saelens", "cfg": cfg, **record}, **sae_kw)
    except ValueError as e:
        raise SAEFormatError(f"{folder}: {e}") from e
    if sae.d_in != int(cfg["d_in"]):
        raise SAEFormatError(f"{cfg_path} says d_in={cfg['d_in']} but W_enc has d_in={sae.d_in}")
    if plan.rescale_by_decoder_norm:
        sae = sae.fold_decoder_norm_into_selection()
    return sae


def save_saelens(sae: SAE, folder: Path, *, position: str, layer: int, hook_name: str,
                 model_name: str | None = None, extra_metadata: dict | None = None,
                 provenance: dict | None = None) -> None:
    """Write one SAE as a SAELens 6.x folder that SAELens itself loads with its metadata.

    input_scale is folded into the weights (exact), since SAELens has no field for it. A
    per-dimension training scale (metadata dim_scale) was folded by the trainer; it is written
    under metadata.saeflow for the record, and no loader applies it.
    BatchTopK is written as the inference form SAELens knows (jumprelu or topk), with the
    training architecture kept under metadata.saeflow. Every tensor is written in one dtype,
    the one cfg.json names. attn_z SAEs get reshape_activations "hook_z": SAELens then expects
    inputs shaped [..., n_heads, d_head] (TransformerLens's hook_z), not [..., n_heads*d_head].
    """
    from safetensors.torch import save_file

    if sae.activation == "groupmax":
        raise SAEFormatError(f"{position} layer {layer}: a GroupMax SAE has no SAELens form; "
                             f"read the sparsify run directly (saeflow loads it as it is)")
    original_arch = sae.architecture
    sae = sae.fold_input_scale().same_dtype()
    act = sae.activation
    sl_arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[act]
    saeflow_meta = {"position": position, "layer": layer, "architecture": original_arch,
                    "saeflow_version": __version__, **(provenance or {})}
    if original_arch == "batchtopk" and sae.k:
        saeflow_meta["k"] = sae.k
    for key in ("input_scale_folded", "rescale_acts_by_decoder_norm", "source_format",
                *SAEFLOW_RECORD_KEYS):
        if key in sae.metadata:
            saeflow_meta[key] = sae.metadata[key]
    dtype = str(sae.dtype).removeprefix("torch.")
    cfg = {
        "architecture": sl_arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if position == "attn_z" else "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
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
        cfg["rescale_acts_by_decoder_norm"] = False  # any rescale is folded in the weights
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.tensors().items()}
    if act != "jumprelu" and tensors.pop("threshold", None) is not None:
        # SAELens refuses unexpected tensors; a BatchTopK threshold is unused by TopK inference.
        saeflow_meta["threshold_dropped"] = True
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
               apply_b_dec_to_input=False, metadata={"source_format": "gemmascope"}).same_dtype()


# --- Gemma Scope 2 (params.safetensors + config.json) ----------------------------------------
_GS2_NAME = re.compile(r"layer_(\d+)_width_([^_]+)_l0_([^_/]+)")


def describe_gemmascope2(folder: Path) -> SAEInfo:
    cfg = _read_json(folder / "config.json")
    header = _safetensors_header(folder / "params.safetensors")
    if "w_enc" not in header:
        raise SAEFormatError(f"{folder / 'params.safetensors'} has no w_enc tensor")
    d_in, d_sae = header["w_enc"][0]
    hook = _require(cfg, "hf_hook_point_in", folder / "config.json")
    refused = _gemmascope2_refusal(cfg)
    try:
        position, layer = _hook_position(hook, folder / "config.json", "gemma3")
    except SAEFormatError:
        if not refused:
            raise
        position, layer = None, None  # listed as refused; its site does not matter
    m = _GS2_NAME.search(folder.name)
    return SAEInfo("gemmascope2", folder, d_in, d_sae, "jumprelu",
                   _dtype_name(header["w_enc"][1]), position, layer, hook,
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
    cfg = _read_json(folder / "config.json")
    if refused := _gemmascope2_refusal(cfg):
        raise SAEFormatError(f"{folder}: {refused}")
    arch = cfg.get("architecture", "jump_relu")
    if arch not in ("jump_relu", "jumprelu"):
        raise SAEFormatError(f"{folder}: architecture {arch!r} is not supported (expected jump_relu)")
    t = _load_safetensors(folder / "params.safetensors", sha256)
    missing = [n for n in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold") if n not in t]
    if missing:
        raise SAEFormatError(f"{folder / 'params.safetensors'} lacks tensors {missing}")
    return SAE(W_enc=t["w_enc"], W_dec=t["w_dec"], b_enc=t["b_enc"], b_dec=t["b_dec"],
               threshold=t["threshold"], architecture="jumprelu", apply_b_dec_to_input=False,
               metadata={"source_format": "gemmascope2", "cfg": cfg}).same_dtype()


# --- EleutherAI sparsify --------------------------------------------------------------------
# A run is RUN/<hookpoint>/ (cfg.json + sae.safetensors), RUN/<hookpoint>/seed<N>/ when it
# trained several seeds; with save_best, RUN/best/<name>/<name>/ (per-hookpoint losses) or
# RUN/best/<name>/ (one overall loss). RUN/config.json holds the training config (with
# `model` when run from sparsify's command line).
_SEED_DIR = re.compile(r"seed(\d+)")


def sparsify_layout(folder: Path) -> dict:
    """{hookpoint, seed, best, run}: where an SAE folder sits in a sparsify run."""
    hookpoint, seed, up = folder.name, None, folder.parent
    m = _SEED_DIR.fullmatch(folder.name)
    if m:
        hookpoint, seed, up = folder.parent.name, int(m.group(1)), folder.parent.parent
    name = [hookpoint] + ([folder.name] if seed is not None else [])
    # best/<name>/<name>: the checkpoint folder repeats the SAE's name above it.
    above = [up.parent.name, up.name] if seed is not None else [up.name]
    if above == name and (up.parent.parent if seed is not None else up.parent).name == "best":
        return {"hookpoint": hookpoint, "seed": seed, "best": True,
                "run": (up.parent.parent if seed is not None else up.parent).parent}
    best = up.name == "best"
    return {"hookpoint": hookpoint, "seed": seed, "best": best,
            "run": up.parent if best else up}


def _sparsify_run_model(run: Path) -> str | None:
    try:
        cfg = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return model if isinstance(model, str) else None


def _sparsify_refusal(cfg: dict) -> str | None:
    if cfg.get("transcode"):
        return "this sparsify coder is a transcoder (transcode: true), not an SAE"
    if cfg.get("skip_connection"):
        return "this sparsify coder has a skip connection (W_skip); not supported"
    act = cfg.get("activation", "topk")
    if act not in ("topk", "groupmax"):
        return f"sparsify activation {act!r} is not supported (topk, groupmax)"
    return None


def describe_sparsify(folder: Path, family: str | None = None) -> SAEInfo:
    cfg = _read_json(folder / "cfg.json")
    header = _safetensors_header(folder / "sae.safetensors")
    if "encoder.weight" not in header:
        raise SAEFormatError(f"{folder / 'sae.safetensors'} has no encoder.weight tensor")
    d_sae, d_in = header["encoder.weight"][0]
    if cfg.get("d_in") is not None and int(cfg["d_in"]) != d_in:
        raise SAEFormatError(f"{folder}: cfg.json d_in={cfg['d_in']} but encoder.weight is "
                             f"{header['encoder.weight'][0]}")
    lay = sparsify_layout(folder)
    model_name = _sparsify_run_model(lay["run"])
    position, layer, unplaced = _placed(lay["hookpoint"], folder,
                                        family or _family_of(model_name))
    variant = ", ".join(([f"seed {lay['seed']}"] if lay["seed"] is not None else [])
                        + (["best"] if lay["best"] else []))
    return SAEInfo("sparsify", folder, d_in, d_sae, cfg.get("activation", "topk"),
                   _dtype_name(header["encoder.weight"][1]), position, layer, lay["hookpoint"],
                   model_name, extra={"seed": lay["seed"], "best": lay["best"],
                                      "variant": variant or None},
                   refused=_sparsify_refusal(cfg) or unplaced)


def load_sparsify(folder: Path, sha256: str | None = None) -> SAE:
    cfg = _read_json(folder / "cfg.json")
    refused = _sparsify_refusal(cfg)
    if refused:
        raise SAEFormatError(f"{folder}: {refused}")
    k = int(_require(cfg, "k", folder / "cfg.json"))
    t = _load_safetensors(folder / "sae.safetensors", sha256)
    missing = [n for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if n not in t]
    if missing:
        raise SAEFormatError(f"{folder / 'sae.safetensors'} lacks tensors {missing}")
    # sparsify loads every tensor in the dtype of the file's first tensor.
    dtype = next(iter(t.values())).dtype
    t = {n: v.to(dtype) for n, v in t.items()}
    try:
        return SAE(W_enc=t["encoder.weight"].T.contiguous(), W_dec=t["W_dec"],
                   b_enc=t["encoder.bias"], b_dec=t["b_dec"],
                   architecture=cfg.get("activation", "topk"), k=k, apply_b_dec_to_input=True,
                   metadata={"source_format": "sparsify", "cfg": cfg})
    except ValueError as e:
        raise SAEFormatError(f"{folder}: {e}") from e


# --- the checks every path runs: inspect, --verify, convert and load -----------------------
# Floating dtypes by precision; a cfg dtype narrower than the stored weight matrices would
# change the weights on load, so the cfg contradicts the file.
_FLOAT_RANK = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}


def check_files(folder: Path, fmt: str) -> list[str]:
    """Problems that configs and tensor headers show without reading the weights (empty: none).

    Shapes against the config, dtypes (a non-float tensor; a cfg dtype that the weight
    matrices contradict), k within 1..d_sae and, for GroupMax, k dividing d_sae. A dtype the
    loader casts exactly, as the format's own library does, is not a problem.
    """
    k_groups = False
    try:
        if fmt == "saelens":
            cfg, h = _read_json(folder / SAELENS_CFG), _safetensors_header(folder / SAELENS_WEIGHTS)
            d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
            names = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,),
                     "b_dec": (d_in,), "threshold": (d_sae,), "log_threshold": (d_sae,),
                     "topk_threshold": ()}
            want_dtype = (cfg.get("dtype") or "").removeprefix("torch.") or None
            plan = _saelens_plan(cfg, h, folder / SAELENS_CFG)
            k = plan.k
            matrices = ("W_enc", "W_dec")
        elif fmt == "sparsify":
            cfg, h = _read_json(folder / "cfg.json"), _safetensors_header(folder / "sae.safetensors")
            d_in = cfg.get("d_in")
            d_sae = cfg.get("num_latents") or (d_in * cfg["expansion_factor"]
                                               if d_in and cfg.get("expansion_factor") else None)
            d_sae = d_sae or h.get("encoder.weight", ((None,), ""))[0][0]
            names = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                     "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
            want_dtype, k, matrices = None, cfg.get("k"), ("encoder.weight", "W_dec")
            k_groups = cfg.get("activation") == "groupmax"
        elif fmt == "gemmascope2":
            h = _safetensors_header(folder / "params.safetensors")
            d_in, d_sae = h.get("w_enc", ((None, None), ""))[0]
            names = {"w_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
                     "threshold": (d_sae,)}
            want_dtype, k, matrices = None, None, ("w_enc", "w_dec")
        elif fmt == "gemmascope":
            h = _npz_headers(folder / "params.npz")
            d_in, d_sae = h.get("W_enc", ((None, None), ""))[0]
            names = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
                     "threshold": (d_sae,)}
            want_dtype, k, matrices = None, None, ("W_enc", "W_dec")
        else:
            return [f"unknown format {fmt!r}"]
    except (SAEFormatError, KeyError, TypeError) as e:
        return [str(e)]
    problems = []
    for name, shape in names.items():
        if name in h and None not in shape and tuple(h[name][0]) != shape:
            problems.append(f"{name} has shape {tuple(h[name][0])}, the config implies {shape}")
    dtypes = {n: _dtype_name(v[1]) for n, v in h.items()}
    not_float = sorted(f"{n} is {d}" for n, d in dtypes.items() if d not in _FLOAT_RANK)
    if not_float:
        problems.append(f"non-float tensors ({', '.join(not_float)}); saeflow reads float16, "
                        f"bfloat16, float32 and float64 weights")
    elif want_dtype in _FLOAT_RANK:
        wider = sorted(n for n in matrices if n in dtypes and dtypes[n] != want_dtype
                       and _FLOAT_RANK[dtypes[n]] >= _FLOAT_RANK[want_dtype])
        if wider:
            have = ", ".join(sorted({dtypes[n] for n in wider}))
            problems.append(f"dtype {want_dtype!r} but the tensors are {have} ({', '.join(wider)}"
                            f"): the cfg contradicts the weights; set its dtype to {have}")
    if k is not None and d_sae:
        if not 0 < int(k) <= int(d_sae):
            problems.append(f"k={k} is not within 1..d_sae={d_sae}")
        elif k_groups and int(d_sae) % int(k):
            problems.append(f"GroupMax k={k} groups do not divide d_sae={d_sae}")
    return problems


def load(folder: Path, fmt: str, *, sha256: str | None = None) -> SAE:
    """One SAE, after the checks `check_files` makes and with every weight finite; anything
    else is refused in one SAEFormatError. `sha256`: the weights file's hash in pack.json."""
    problems = check_files(folder, fmt)
    if problems:
        raise SAEFormatError(f"{folder}: {'; '.join(problems)}")
    if fmt == "saelens":
        sae = load_saelens(folder, sha256)
    elif fmt == "gemmascope":
        sae = load_gemmascope(folder / "params.npz")
    elif fmt == "gemmascope2":
        sae = load_gemmascope2(folder, sha256)
    elif fmt == "sparsify":
        sae = load_sparsify(folder, sha256)
    else:
        raise SAEFormatError(f"unknown SAE format {fmt!r}; known: {', '.join(FORMATS)}")
    bad = sae.nonfinite()
    if bad:
        raise SAEFormatError(f"{folder}: the weights hold NaN or Inf ({'; '.join(bad)}); "
                             f"re-download or re-train this SAE")
    return sae


def _manifest_problems(info: SAEInfo) -> list[str]:
    """A saeflow pack's SAE: pack.json's d_in, d_sae and dtype against the SAE's cfg.json."""
    if "sha256" not in info.extra:  # described from its own files, not from a manifest
        return []
    try:
        cfg = _read_json(info.path / SAELENS_CFG)
    except SAEFormatError as e:
        return [str(e)]
    return [f"cfg.json {key}={cfg.get(key)!r} but pack.json says {have!r}"
            for key, have in (("d_in", info.d_in), ("d_sae", info.d_sae), ("dtype", info.dtype))
            if cfg.get(key) != have]


def load_checked(info: SAEInfo) -> SAE:
    """The SAE an SAEInfo describes, through every check: why it was refused when described,
    the file checks, pack.json's shapes and hash, finite weights. `Pack.sae`, convert,
    inspect and --verify all run this one function."""
    problems = [info.refused] if info.refused else _manifest_problems(info)
    if problems:
        raise SAEFormatError(f"{info.path}: {'; '.join(problems)}")
    return load(info.path, info.format, sha256=info.extra.get("sha256"))


def check_sae(info: SAEInfo) -> list[str]:
    """Why `load_checked` refuses this SAE, one line per problem (empty: it loads). Reads the
    weights when configs and headers are sound."""
    if info.refused:
        return [info.refused]
    problems = check_files(info.path, info.format) + _manifest_problems(info)
    if problems:
        return problems
    try:
        load_checked(info)
    except (SAEFormatError, SAEShapeError, ConfigError) as e:
        return [str(e).removeprefix(f"{info.path}: ")]
    return []


def detect_format(folder: Path, names: set[str] | None = None) -> str | None:
    """Which format a single SAE folder is in, from its file names (`names`: the folder's
    listing, when the caller has it). None: no SAE here."""
    if names is None:
        names = {p.name for p in folder.iterdir() if p.is_file()}
    if SAELENS_WEIGHTS in names or (SAELENS_CFG in names and "sae.safetensors" not in names
                                    and "params.npz" not in names):
        if SAELENS_WEIGHTS not in names:
            raise SAEFormatError(f"{folder} has {SAELENS_CFG} but no {SAELENS_WEIGHTS}")
        return "saelens"
    if "params.npz" in names:
        return "gemmascope"
    if "params.safetensors" in names:
        return "gemmascope2"
    if "sae.safetensors" in names:
        return "sparsify"
    return None


def describe(folder: Path, fmt: str, position: str | None = None,
             family: str | None = None) -> SAEInfo:
    """What a folder holds, from configs and headers; `refused` says why it cannot load."""
    if fmt == "saelens":
        info = describe_saelens(folder, family)
    elif fmt == "gemmascope":
        info = describe_gemmascope(folder / "params.npz", position)
    elif fmt == "gemmascope2":
        info = describe_gemmascope2(folder)
    elif fmt == "sparsify":
        info = describe_sparsify(folder, family)
    else:
        raise SAEFormatError(f"unknown SAE format {fmt!r}; known: {', '.join(FORMATS)}")
    if info.refused is None:
        info.refused = "; ".join(check_files(folder, fmt)) or None
    return info

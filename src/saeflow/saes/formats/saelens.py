"""SAELens: cfg.json + sae_weights.safetensors (6.x nested metadata, and pre-6.0 flat).

Every option saeflow reads is implemented exactly or refused with one line (README's table);
`save_saelens` writes the 6.x form SAELens itself loads with its metadata."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saeflow._version import __version__
from saeflow.errors import SAEFormatError
from saeflow.saes.formats.common import (
    ExpectedTensors,
    SAEInfo,
    dtype_name,
    family_of,
    load_safetensors,
    placed,
    read_json,
    require,
    safetensors_header,
)
from saeflow.saes.sae import SAE

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
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
    cfg = read_json(folder / SAELENS_CFG)
    header = safetensors_header(folder / SAELENS_WEIGHTS)
    plan = _saelens_plan(cfg, header, folder / SAELENS_CFG)
    d_in = int(require(cfg, "d_in", folder / SAELENS_CFG))
    meta = cfg.get("metadata") or {}
    model_name = meta.get("model_name") or cfg.get("model_name")
    hook = _saelens_hook(cfg)
    arch = plan.arch or str(cfg.get("architecture"))
    dtype = plan.dtype or (dtype_name(header["W_enc"][1]) if "W_enc" in header else "?")
    if plan.refused:  # listed by its reason; its tensors and site do not matter
        return SAEInfo("saelens", folder, d_in, int(cfg.get("d_sae") or 0), arch, dtype,
                       None, None, hook, model_name, refused=plan.refused)
    if "W_enc" not in header:
        raise SAEFormatError(f"{folder / SAELENS_WEIGHTS} has no W_enc tensor")
    d_sae = int(cfg.get("d_sae") or header["W_enc"][0][1])
    position, layer, refused = placed(hook, folder / SAELENS_CFG, family or family_of(model_name))
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



def load_saelens(folder: Path, sha256: str | None = None) -> SAE:
    cfg_path = folder / SAELENS_CFG
    cfg = read_json(cfg_path)
    require(cfg, "d_in", cfg_path)
    t = load_safetensors(folder / SAELENS_WEIGHTS, sha256)
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


def expected_tensors(folder: Path) -> ExpectedTensors:
    cfg, h = read_json(folder / SAELENS_CFG), safetensors_header(folder / SAELENS_WEIGHTS)
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    names = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,),
             "b_dec": (d_in,), "threshold": (d_sae,), "log_threshold": (d_sae,),
             "topk_threshold": ()}
    want_dtype = (cfg.get("dtype") or "").removeprefix("torch.") or None
    plan = _saelens_plan(cfg, h, folder / SAELENS_CFG)
    return ExpectedTensors(h, names, d_sae, cfg_dtype=want_dtype, k=plan.k,
                           matrices=("W_enc", "W_dec"))

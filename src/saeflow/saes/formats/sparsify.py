"""EleutherAI sparsify: cfg.json + sae.safetensors, one folder per hookpoint."""
from __future__ import annotations

import re
from pathlib import Path

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
    """The model the run names (it decides the family, so the site); None when the run has no
    config.json or it names none. A config.json that is not JSON is refused, not ignored."""
    if not (run / "config.json").is_file():
        return None
    cfg = read_json(run / "config.json")
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
    cfg = read_json(folder / "cfg.json")
    header = safetensors_header(folder / "sae.safetensors")
    if "encoder.weight" not in header:
        raise SAEFormatError(f"{folder / 'sae.safetensors'} has no encoder.weight tensor")
    d_sae, d_in = header["encoder.weight"][0]
    if cfg.get("d_in") is not None and int(cfg["d_in"]) != d_in:
        raise SAEFormatError(f"{folder}: cfg.json d_in={cfg['d_in']} but encoder.weight is "
                             f"{header['encoder.weight'][0]}")
    lay = sparsify_layout(folder)
    model_name = _sparsify_run_model(lay["run"])
    position, layer, unplaced = placed(lay["hookpoint"], folder,
                                        family or family_of(model_name))
    variant = ", ".join(([f"seed {lay['seed']}"] if lay["seed"] is not None else [])
                        + (["best"] if lay["best"] else []))
    return SAEInfo("sparsify", folder, d_in, d_sae, cfg.get("activation", "topk"),
                   dtype_name(header["encoder.weight"][1]), position, layer, lay["hookpoint"],
                   model_name, extra={"seed": lay["seed"], "best": lay["best"],
                                      "variant": variant or None},
                   refused=_sparsify_refusal(cfg) or unplaced)


def load_sparsify(folder: Path, sha256: str | None = None) -> SAE:
    cfg = read_json(folder / "cfg.json")
    refused = _sparsify_refusal(cfg)
    if refused:
        raise SAEFormatError(f"{folder}: {refused}")
    k = int(require(cfg, "k", folder / "cfg.json"))
    t = load_safetensors(folder / "sae.safetensors", sha256)
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


def expected_tensors(folder: Path) -> ExpectedTensors:
    cfg, h = read_json(folder / "cfg.json"), safetensors_header(folder / "sae.safetensors")
    d_in = cfg.get("d_in")
    d_sae = cfg.get("num_latents") or (d_in * cfg["expansion_factor"]
                                       if d_in and cfg.get("expansion_factor") else None)
    d_sae = d_sae or h.get("encoder.weight", ((None,), ""))[0][0]
    names = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
             "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    return ExpectedTensors(h, names, d_sae, k=cfg.get("k"), matrices=("encoder.weight", "W_dec"),
                           k_groups=cfg.get("activation") == "groupmax")

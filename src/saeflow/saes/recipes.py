"""Named packs: `embedded` (the default family for the embedded model) and its quick profile.

`open_pack("embedded")` trains the pack into the cache on first use (with a progress bar) and
reuses it afterwards; any other spec is a path given to `load_pack`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from saeflow.errors import ConfigError
from saeflow.lm.model import load_model
from saeflow.saes.packs import PACK_MANIFEST, Pack, load_pack
from saeflow.saes.train import TrainConfig, train_family
from saeflow.store import cache_dir

PROFILES: dict[str, TrainConfig] = {
    # The recipe (docs/decisions.md, "Training recipe"; timings in docs/benchmarks.md): inputs
    # standardised per dimension with the massive dimensions capped at 10x the median sd,
    # lr 4e-3, TopK (cheaper than BatchTopK on a CPU), AuxK on signed pre-activations over
    # latents silent for 16 steps.
    "default": TrainConfig(positions=["resid_post", "mlp_out", "attn_out"], layers=None,
                           width=4096, k=32, architecture="topk", tokens=300_000,
                           batch_size=1024, lr=4e-3, input_norm="dim", dim_cap=10.0,
                           aux_activation="linear", dead_tokens=16_384),
    # A couple of minutes: tests and first looks.
    "quick": TrainConfig(positions=["resid_post", "mlp_out", "attn_out"], layers=None,
                         width=1024, k=16, tokens=49_152, batch_size=256, lr=4e-3,
                         chunk_tokens=8192, input_norm="dim", dim_cap=10.0,
                         aux_activation="linear"),
}
EMBEDDED_NAMES = {"embedded": "default", "embedded-quick": "quick"}


def embedded_pack_dir(profile: str = "default") -> Path:
    cfg = PROFILES[profile]
    digest = hashlib.sha1(json.dumps(cfg.identity(), sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir("packs") / f"embedded-{profile}-{digest}"


def ensure_embedded_pack(profile: str = "default", model=None, progress: bool = True) -> Pack:
    """The embedded model's pack for `profile`, trained into the cache if it is not there."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    out = embedded_pack_dir(profile)
    if (out / PACK_MANIFEST).is_file():
        return load_pack(out)

    model = model or load_model("embedded")
    if model.name != "gemma-3-270m":
        raise ConfigError("the embedded pack is trained on the embedded model")
    print(f"[saeflow] training the embedded '{profile}' SAE pack once into {out} "
          f"(it is cached after this; Ctrl-C is safe, the same command resumes)", flush=True)
    return train_family(model, PROFILES[profile], out, progress=progress).pack


def open_pack(spec: str, model=None, **kw) -> Pack:
    """'embedded' / 'embedded-quick' (trained on first use) or a path to any supported pack."""
    if spec in EMBEDDED_NAMES:
        return ensure_embedded_pack(EMBEDDED_NAMES[spec], model=model)
    # The model's family places HF hook names by what the module is in that model.
    family = kw.pop("family", None) or (model.arch.family if model is not None else None)
    return load_pack(spec, family=family, **kw)

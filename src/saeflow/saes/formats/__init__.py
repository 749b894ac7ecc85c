"""Read and write single SAEs in the formats users already have.

Each reader has two entry points: `describe_*` reads only configs and tensor headers (cheap,
used by `pack inspect`), and `load_*` reads the weights. Formats, one module each:

    saelens      cfg.json + sae_weights.safetensors (6.x nested metadata, and pre-6.0 flat)
    gemmascope   params.npz                         (Gemma Scope, Gemma 2)
    gemmascope2  params.safetensors + config.json   (Gemma Scope 2, Gemma 3)
    sparsify     cfg.json + sae.safetensors         (EleutherAI sparsify, one dir per hookpoint)

`common` holds what they share (`SAEInfo`, the safetensors and JSON readers); `checks` the
checks every path runs and the dispatch by format name (`describe`, `load`, `load_checked`).
"""
from __future__ import annotations

from saeflow.saes.formats.checks import (
    FORMATS,
    check_files,
    check_sae,
    describe,
    detect_format,
    load,
    load_checked,
)
from saeflow.saes.formats.common import ExpectedTensors, SAEInfo
from saeflow.saes.formats.gemmascope import (
    describe_gemmascope,
    describe_gemmascope2,
    gemmascope_position_from_path,
    load_gemmascope,
    load_gemmascope2,
)
from saeflow.saes.formats.saelens import (
    SAEFLOW_RECORD_KEYS,
    SAELENS_CFG,
    SAELENS_FORMAT_VERSION,
    SAELENS_WEIGHTS,
    describe_saelens,
    load_saelens,
    save_saelens,
)
from saeflow.saes.formats.sparsify import describe_sparsify, load_sparsify, sparsify_layout

__all__ = [
    "FORMATS", "SAEFLOW_RECORD_KEYS", "SAELENS_CFG", "SAELENS_FORMAT_VERSION", "SAELENS_WEIGHTS",
    "ExpectedTensors", "SAEInfo", "check_files", "check_sae", "describe", "describe_gemmascope",
    "describe_gemmascope2", "describe_saelens", "describe_sparsify", "detect_format",
    "gemmascope_position_from_path", "load", "load_checked", "load_gemmascope",
    "load_gemmascope2", "load_saelens", "load_sparsify", "save_saelens", "sparsify_layout",
]

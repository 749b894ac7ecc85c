"""The checks every path runs (inspect, --verify, convert and load), and the dispatch from a
format's name to its reader: `detect_format`, `describe`, `load`, `load_checked`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from saeflow.errors import ConfigError, SAEFormatError, SAEShapeError
from saeflow.saes.formats import gemmascope, saelens, sparsify
from saeflow.saes.formats.common import ExpectedTensors, SAEInfo, dtype_name, read_json
from saeflow.saes.formats.saelens import SAELENS_CFG, SAELENS_WEIGHTS
from saeflow.saes.sae import SAE

FORMATS = ("saelens", "gemmascope", "gemmascope2", "sparsify")
_EXPECTED: dict[str, Callable[[Path], ExpectedTensors]] = {
    "saelens": saelens.expected_tensors,
    "sparsify": sparsify.expected_tensors,
    "gemmascope2": gemmascope.expected_tensors_gemmascope2,
    "gemmascope": gemmascope.expected_tensors_gemmascope,
}
# Floating dtypes by precision; a cfg dtype narrower than the stored weight matrices would
# change the weights on load, so the cfg contradicts the file.
_FLOAT_RANK = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}


def check_files(folder: Path, fmt: str) -> list[str]:
    """Problems that configs and tensor headers show without reading the weights (empty: none).

    Shapes against the config, dtypes (a non-float tensor; a cfg dtype that the weight
    matrices contradict), k within 1..d_sae and, for GroupMax, k dividing d_sae. A dtype the
    loader casts exactly, as the format's own library does, is not a problem.
    """
    if fmt not in _EXPECTED:
        return [f"unknown format {fmt!r}"]
    try:
        want = _EXPECTED[fmt](folder)
    except (SAEFormatError, KeyError, TypeError) as e:
        return [str(e)]
    h, k, d_sae = want.header, want.k, want.d_sae
    problems = []
    for name, shape in want.shapes.items():
        if name in h and None not in shape and tuple(h[name][0]) != shape:
            problems.append(f"{name} has shape {tuple(h[name][0])}, the config implies {shape}")
    dtypes = {n: dtype_name(v[1]) for n, v in h.items()}
    not_float = sorted(f"{n} is {d}" for n, d in dtypes.items() if d not in _FLOAT_RANK)
    if not_float:
        problems.append(f"non-float tensors ({', '.join(not_float)}); saeflow reads float16, "
                        f"bfloat16, float32 and float64 weights")
    elif want.cfg_dtype in _FLOAT_RANK:
        cfg_dtype = want.cfg_dtype
        wider = sorted(n for n in want.matrices if n in dtypes and dtypes[n] != cfg_dtype
                       and _FLOAT_RANK[dtypes[n]] >= _FLOAT_RANK[cfg_dtype])
        if wider:
            have = ", ".join(sorted({dtypes[n] for n in wider}))
            problems.append(f"dtype {cfg_dtype!r} but the tensors are {have} ({', '.join(wider)}"
                            f"): the cfg contradicts the weights; set its dtype to {have}")
    if k is not None and d_sae:
        if not 0 < int(k) <= int(d_sae):
            problems.append(f"k={k} is not within 1..d_sae={d_sae}")
        elif want.k_groups and int(d_sae) % int(k):
            problems.append(f"GroupMax k={k} groups do not divide d_sae={d_sae}")
    return problems


def load(folder: Path, fmt: str, *, sha256: str | None = None) -> SAE:
    """One SAE, after the checks `check_files` makes and with every weight finite; anything
    else is refused in one SAEFormatError. `sha256`: the weights file's hash in pack.json."""
    problems = check_files(folder, fmt)
    if problems:
        raise SAEFormatError(f"{folder}: {'; '.join(problems)}")
    if fmt == "saelens":
        sae = saelens.load_saelens(folder, sha256)
    elif fmt == "gemmascope":
        sae = gemmascope.load_gemmascope(folder / "params.npz")
    elif fmt == "gemmascope2":
        sae = gemmascope.load_gemmascope2(folder, sha256)
    elif fmt == "sparsify":
        sae = sparsify.load_sparsify(folder, sha256)
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
        cfg = read_json(info.path / SAELENS_CFG)
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
        info = saelens.describe_saelens(folder, family)
    elif fmt == "gemmascope":
        info = gemmascope.describe_gemmascope(folder / "params.npz", position)
    elif fmt == "gemmascope2":
        info = gemmascope.describe_gemmascope2(folder)
    elif fmt == "sparsify":
        info = sparsify.describe_sparsify(folder, family)
    else:
        raise SAEFormatError(f"unknown SAE format {fmt!r}; known: {', '.join(FORMATS)}")
    if info.refused is None:
        info.refused = "; ".join(check_files(folder, fmt)) or None
    return info

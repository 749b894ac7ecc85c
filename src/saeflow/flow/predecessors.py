"""Data-free feature flow: predecessors and successors of every residual feature, thresholds, classes.

For every layer L and every feature of the residual SAE R_L (resid_post L) we match its direction
against three predecessor dictionaries: R_{L-1} (resid_post L-1, or resid_pre L), M_L (mlp_out L)
and A_L (attn_out L, or attn_z L mapped into the residual through W_O). One blocked pass per pair
(see match.py) gives both directions: R_L -> P (predecessors) and P -> R_L (successors).

Outputs (a RUN directory, shared with later stages):
    RUN/flow.json              manifest: pack fingerprint, config, mappings, per-slot widths
    RUN/predecessors.parquet   one row per (layer, feature) of resid_post
    RUN/successors.parquet     one row per (layer, position, feature): its top matches downstream
    RUN/thresholds.json        the class thresholds per layer, and where each came from
    RUN/plots/                 figures, drawn by the caller (flow/plots.py)

The expensive part (the matches and null samples) is cached per layer under
$SAEFLOW_CACHE/flow/<key>, keyed by the pack's content hash and the matching settings; a repeated
run, or a run with other thresholds, reuses it. A killed run resumes at the next layer.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import saeflow.saes.formats as sae_formats
from saeflow._version import __version__
from saeflow.errors import FlowError, MatchError, MissingResultError
from saeflow.flow.match import (
    MATCH_METHODS,
    NULL_MODELS,
    Directions,
    SafetensorsRows,
    TensorDirections,
    gather_rows,
    null_top1,
    permutation_match,
    top_k_pairs,
)
from saeflow.flow.tables import predecessor_table, successor_table
from saeflow.ids import CLASSES, PRED_KINDS
from saeflow.lm.model import (
    MAPPED_POSITIONS,
    RESIDUAL_SPACE,
    attn_z_mapping,
    describe_mapping,
    raw_mapping,
    residual_mapping,
    resolve_device,
)
from saeflow.saes.packs import pack_fingerprint
from saeflow.scale.ray_backend import run_tasks, shippable
from saeflow.store import (
    cache_dir,
    file_digest,
    save_npz_atomic,
    write_json_atomic,
    write_parquet_atomic,
)

FLOW_MANIFEST = "flow.json"
FLOW_FORMAT = "saeflow-flow"
CACHE_VERSION = 1


@dataclass
class FlowConfig:
    k: int = 5  # matches kept per feature and predecessor kind
    method: Literal["decoder", "encoder", "folded", "permutation"] = "decoder"  # which directions are matched
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 ranks in bf16 and re-scores the candidates exactly in fp32
    # null model of the MLP / attention class thresholds: "columns" draws each coordinate from
    # its column (keeps the components all features share; chosen by the co-firing evidence,
    # docs/decisions.md); "rotation" turns the rows by a random orthogonal matrix; "shuffle"
    # permutes each row's coordinates; "gaussian" is isotropic
    null: Literal["columns", "rotation", "shuffle", "gaussian"] = "columns"
    null_samples: int = 2048  # null directions drawn per pair
    null_quantile: float = 0.99  # the null's quantile that becomes the default threshold
    seed: int = 0  # seed of the null model
    # which coordinates the matching compares: "no_massive" sets each layer's massive residual
    # dimensions (from the firing pass's variances) to zero before the cosine, "raw" keeps them;
    # "auto": no_massive when the variances are known, else raw (the manifest says which ran)
    geometry: Literal["auto", "no_massive", "raw"] = "auto"
    block_a: int | None = None  # rows of A per block; None: 1024 on a CPU, 8192 on a GPU
    block_b: int | None = None  # rows of B per block; None: 4096 on a CPU, 16384 on a GPU
    memory_budget_mb: int = 512  # dictionaries larger than this are streamed from disk in blocks
    # where the similarity products run: "auto" (cuda when present, else the CPU), or a device
    # name. Results are the same up to fp32 rounding, so it is not part of the cache key.
    device: str = "auto"

    def __post_init__(self):
        if self.method not in MATCH_METHODS:
            raise FlowError(f"unknown matching method {self.method!r}; use one of "
                            f"{', '.join(MATCH_METHODS)}")
        if self.k < 1:
            raise FlowError("k must be >= 1")
        if not 0.5 <= self.null_quantile < 1:
            raise FlowError("null_quantile must be in [0.5, 1)")
        if self.null not in NULL_MODELS:
            raise FlowError(f"unknown null model {self.null!r}; use one of {', '.join(NULL_MODELS)}")
        if self.geometry not in ("auto", "no_massive", "raw"):
            raise FlowError(f"unknown geometry {self.geometry!r}; use auto, no_massive or raw")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":  # not mps: the flow's top-k merges are not worth it there
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return resolve_device(self.device)

    def blocks(self) -> tuple[int, int]:
        """Block sizes: cache-sized on a CPU; large on a GPU, where one block's GEMM must
        outweigh its kernel launches and top-k merges."""
        gpu = self.resolved_device().type == "cuda"
        return (self.block_a or (8192 if gpu else 1024), self.block_b or (16384 if gpu else 4096))

    def match_kw(self, memory_budget: bool = True) -> dict:
        """The keyword arguments of top_k_pairs that say how (not what) to compute."""
        block_a, block_b = self.blocks()
        kw = dict(block_a=block_a, block_b=block_b, device=self.resolved_device())
        if memory_budget:
            kw["memory_budget"] = self.memory_budget_mb << 20
        return kw

    def identity(self) -> dict:
        """The settings that change the matches (block sizes do not)."""
        k = 1 if self.method == "permutation" else self.k
        return {"k": k, "method": self.method, "precision": self.precision, "null": self.null,
                "null_samples": self.null_samples, "seed": self.seed, "geometry": self.geometry}


@dataclass
class LayerPlan:
    layer: int
    resid: tuple[str, int]
    preds: dict[str, tuple[str, int] | None]  # kind -> slot


# --- which SAEs feed which ------------------------------------------------------------------
def plan_layers(pack, layers: list[int] | None = None) -> list[LayerPlan]:
    """Residual SAE and predecessor slots per layer; clear errors for gaps and width mismatches."""
    res_layers = pack.layers("resid_post")
    if not res_layers:
        raise FlowError(f"the pack at {pack.root} has no resid_post SAEs; feature flow matches "
                        f"residual features to their predecessors (it has: "
                        f"{', '.join(pack.positions) or 'nothing'})")
    want = sorted(set(layers)) if layers else res_layers
    missing = [L for L in want if ("resid_post", L) not in pack]
    if missing:
        raise FlowError(f"the pack has no resid_post SAE at layers {missing}; choose layers among "
                        f"{res_layers} (--layers)")
    attn_pos = next((p for p in ("attn_out", "attn_z", "attn_raw") if p in pack.positions), None)
    mlp_pos = next((p for p in ("mlp_out", "mlp_raw") if p in pack.positions), None)
    gaps = []
    for pos in (mlp_pos, attn_pos):
        if pos is None or pos not in pack.positions:
            continue
        gaps += [f"{pos} {L}" for L in want if (pos, L) not in pack]
    if gaps:
        raise FlowError(f"the pack lacks SAEs at: {', '.join(gaps)}; every chosen layer needs the "
                        f"same predecessor positions (restrict --layers, or add the SAEs)")
    plans = []
    for L in want:
        res = ("resid_post", L - 1) if ("resid_post", L - 1) in pack else (
            ("resid_pre", L) if ("resid_pre", L) in pack else None)
        preds = {"res": res,
                 "mlp": (mlp_pos, L) if mlp_pos and (mlp_pos, L) in pack else None,
                 "attn": (attn_pos, L) if attn_pos and (attn_pos, L) in pack else None}
        plans.append(LayerPlan(L, ("resid_post", L), preds))
    d_in = {}
    for p in plans:
        for slot in [p.resid, *p.preds.values()]:
            if slot and slot[0] in RESIDUAL_SPACE:
                d_in[slot] = pack.info(*slot).d_in
    if len(set(d_in.values())) > 1:
        by: dict[int, list[str]] = {}
        for (pos, L), d in d_in.items():
            by.setdefault(d, []).append(f"{pos} {L}")
        detail = "; ".join(f"d_in {d}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}"
                           for d, v in by.items())
        raise FlowError(f"the residual-space SAEs of this pack disagree on d_model ({detail}); "
                        f"they cannot come from one model")
    return plans


# --- directions -----------------------------------------------------------------------------
_LAZY = {"saelens": ("sae_weights.safetensors", "W_dec"),
         "gemmascope2": ("params.safetensors", "w_dec"),
         "sparsify": ("sae.safetensors", "W_dec")}


def slot_directions(pack, slot: tuple[str, int], method: str = "decoder",
                    model=None, drop_dims: list[int] | None = None) -> Directions:
    """The slot's feature directions in residual space, for `method`, readable in blocks;
    `drop_dims`: residual coordinates set to zero before the rows are normalised."""
    pos, L = slot
    info = pack.info(pos, L)
    project = None
    if pos == "attn_z":
        if model is None:
            raise FlowError("the pack's attention SAEs sit at attn_z (head space); mapping them "
                            "into the residual needs the model's W_O: pass --model")
        if info.d_in != model.width("attn_z"):
            raise FlowError(f"attn_z SAE at layer {L} has d_in {info.d_in}, but the model's "
                            f"n_heads*d_head is {model.width('attn_z')}")
        project = attn_z_mapping(model, L)
    elif pos in ("mlp_raw", "attn_raw"):
        if model is None:
            raise FlowError(f"the pack has {pos} SAEs (the raw module output, before any "
                            f"post-norm); mapping them into the residual needs the model's norm "
                            f"weights: pass --model")
        project = raw_mapping(model, pos, L)
    label = f"{L}/{pos}"
    if method in ("decoder", "permutation") and info.format in _LAZY:
        fname, key = _LAZY[info.format]
        try:
            return SafetensorsRows(info.path / fname, key, label=label, project=project,
                                   drop_dims=drop_dims)
        except (MatchError, OSError):
            pass  # fall back to loading the SAE

    sae = sae_formats.load(info.path, info.format)
    if method == "encoder":
        return TensorDirections(sae.W_enc.T, label=label, project=project, drop_dims=drop_dims)
    scale = None
    if method == "folded":
        # SAE Match: rank by the dot product of threshold-folded decoder rows theta * W_dec.
        # Divided by the target's mean folded norm, so scores stay on a cosine-like scale.
        norms = sae.decoder_norms()
        if sae.threshold is not None and sae.activation == "jumprelu":
            norms = norms * sae.threshold.float()
        scale = norms / norms.mean().clamp_min(1e-12)
    return TensorDirections(sae.W_dec, label=label, project=project, row_scale=scale,
                            drop_dims=drop_dims)


def _mapping_fingerprint(pack, model) -> str | None:
    mapped = [p for p in MAPPED_POSITIONS if p in pack.positions]
    if not mapped or model is None:
        return None
    h = hashlib.sha256()
    for pos in mapped:
        for L in pack.layers(pos):
            m = residual_mapping(model, pos, L)
            h.update(pos.encode() + (m.numpy().tobytes() if m is not None else b"identity"))
    return h.hexdigest()


WEIGHT_FILES = {"saelens": sae_formats.SAELENS_WEIGHTS, "gemmascope2": "params.safetensors",
                "sparsify": "sae.safetensors"}


def check_pack_files(pack) -> None:
    """Refuse a pack whose SAE files are not what its manifest says, before any cached match is
    reused: the cache is keyed by pack.json's hashes, so a garbage or changed weights file
    would otherwise be reported as "reused cached matches". Tensor headers are parsed, and
    each weights file's sha256 is compared with pack.json's (memoised by size and mtime, so a
    pack is hashed once, not on every run)."""
    for slot, info in sorted(pack.entries.items()):
        problems = sae_formats.check_files(Path(info.path), info.format)
        want = info.extra.get("sha256")
        weights = Path(info.path) / WEIGHT_FILES.get(info.format, "")
        if not problems and want and weights.is_file() and file_digest(weights) != want:
            problems = [f"{weights.name} was changed after the pack was written (its sha256 "
                        f"differs from pack.json's)"]
        if problems:
            raise FlowError(f"the SAE at {slot[1]}/{slot[0]} ({info.path}) is corrupt: "
                            f"{'; '.join(problems)}; run `saeflow pack inspect {pack.root} "
                            f"--verify`, then retrain, re-fetch or re-convert the pack")


# --- the computation ------------------------------------------------------------------------
def _layer_cache_file(cache: Path, layer: int) -> Path:
    return cache / f"layer_{layer}.npz"


def _live_subset(D, mask: np.ndarray | None):
    """(the live rows of D as unit rows in memory, their indices in D) or (D, None) when all
    rows count (no mask, every row live, or none live: nothing sensible to leave out)."""

    if mask is None or mask.all() or not mask.any():
        return D, None
    idx = np.flatnonzero(mask)
    rows = gather_rows(D, torch.from_numpy(idx))  # [n_live, d] the rows the matching uses
    return TensorDirections(rows, normalized=True, label=D.label), idx


def _scatter(i: np.ndarray, v: np.ndarray, rows: np.ndarray | None, targets: np.ndarray | None,
             n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k lists of a live subset back to full size: rows of dead latents get -1 / nan, and
    indices into the target subset become indices into the full target SAE."""
    if targets is not None:
        i = np.where(i >= 0, targets[np.clip(i, 0, None)], -1)
    if rows is None:
        return i, v
    full_i = np.full((n, i.shape[1]), -1, i.dtype)
    full_v = np.full((n, v.shape[1]), np.nan, np.float32)
    full_i[rows], full_v[rows] = i, v
    return full_i, full_v


def compute_layer(pack, plan: LayerPlan, cfg: FlowConfig, model=None,
                  directions=None, live: dict | None = None, drop: list[int] | None = None,
                  alt_drop: list[int] | None = None) -> dict[str, np.ndarray]:
    """Matches of one layer's residual SAE against its predecessors (both directions), + nulls.

    `directions(slot, drop_dims) -> Directions` overrides where directions come from
    (benchmarks). `live` ({slot: [d_sae] bool}) leaves latents that never fire out of every
    list, on both sides: they keep their random initial directions and would only add noise.
    `drop`: the residual coordinates the matching leaves out (the layer's massive dimensions);
    `alt_drop` (None: skip): the other geometry, whose top-1 residual match is kept beside
    (`res_alt_row_*`) so that the s_res share can be shown both ways.
    """
    budget = cfg.memory_budget_mb << 20
    live = live or {}
    if directions is None:
        def directions(slot, drop_dims=None):
            return slot_directions(pack, slot, cfg.method, model, drop_dims=drop_dims)
    A_all = directions(plan.resid, drop).materialize(budget)
    A, a_idx = _live_subset(A_all, live.get(plan.resid))
    out: dict[str, np.ndarray] = {"n_resid": np.array(A_all.n)}
    kw = cfg.match_kw()
    for kind, slot in plan.preds.items():
        if slot is None:
            continue
        B_all = directions(slot, drop).materialize(budget)
        B, b_idx = _live_subset(B_all, live.get(slot))
        out[f"{kind}_n"] = np.array(B_all.n)
        if cfg.method == "permutation":
            rows, cols, cos = permutation_match(A, B, **kw)
            row_i = np.full((A.n, 1), -1, np.int64)
            row_v = np.full((A.n, 1), np.nan, np.float32)
            col_i = np.full((B.n, 1), -1, np.int64)
            col_v = np.full((B.n, 1), np.nan, np.float32)
            row_i[rows, 0], row_v[rows, 0] = cols, cos
            col_i[cols, 0], col_v[cols, 0] = rows, cos
        else:
            m = top_k_pairs(A, B, k=min(cfg.k, A.n, B.n), cols=True, precision=cfg.precision, **kw)
            assert m.col_indices is not None and m.col_values is not None  # cols=True
            row_i, row_v = m.row_indices.numpy(), m.row_values.numpy()
            col_i, col_v = m.col_indices.numpy(), m.col_values.numpy()
        row_i, row_v = _scatter(row_i, row_v, a_idx, b_idx, A_all.n)
        col_i, col_v = _scatter(col_i, col_v, b_idx, a_idx, B_all.n)
        out.update({f"{kind}_row_i": row_i.astype(np.int32), f"{kind}_row_v": row_v,
                    f"{kind}_col_i": col_i.astype(np.int32), f"{kind}_col_v": col_v})
        out[f"{kind}_null"] = null_top1(A, B, n=cfg.null_samples, kind=cfg.null,
                                        seed=cfg.seed + plan.layer, precision=cfg.precision,
                                        **kw)
        if kind == "res" and alt_drop is not None and cfg.method != "permutation":
            A_alt, _ = _live_subset(directions(plan.resid, alt_drop).materialize(budget),
                                    live.get(plan.resid))
            B_alt, _ = _live_subset(directions(slot, alt_drop).materialize(budget),
                                    live.get(slot))
            m = top_k_pairs(A_alt, B_alt, k=1, precision=cfg.precision, **kw)
            i, v = _scatter(m.row_indices.numpy(), m.row_values.numpy(), a_idx, b_idx, A_all.n)
            out["res_alt_row_i"], out["res_alt_row_v"] = i.astype(np.int32), v
    return out


@dataclass
class FlowRun:
    """A finished flow in a RUN directory (what `saeflow flow` wrote)."""

    root: Path
    manifest: dict
    thresholds: dict
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    def check_pack(self, pack, name: str | None = None) -> None:
        """Refuse a pack other than the one this flow was computed from."""
        if pack_fingerprint(pack) != self.manifest["pack"]["fingerprint"]:
            raise FlowError(f"{self.root} was computed from a different pack than "
                            f"{name or pack.root} ({self.manifest['pack']['root']}); rerun "
                            f"`saeflow flow`")

    def n_features(self, position: str, layer: int) -> int | None:
        return self.manifest["slots"].get(f"{layer}/{position}")

    def table(self, name: str):
        """'predecessors' or 'successors' as a pyarrow Table (cached)."""
        import pyarrow.parquet as pq

        if name not in self._tables:
            self._tables[name] = pq.read_table(self.root / f"{name}.parquet")
        return self._tables[name]

    def predecessors(self):
        return self.table("predecessors").to_pandas()

    def successors(self):
        return self.table("successors").to_pandas()

    def live_mask(self) -> np.ndarray:
        """[rows of predecessors.parquet] bool: False for latents flagged dead or rare (all
        True when the flow was computed without firing counts)."""
        t = self.table("predecessors")
        if "live" not in t.column_names:
            return np.ones(t.num_rows, bool)
        return np.asarray(t.column("live").to_numpy(zero_copy_only=False), bool)

    def class_counts(self, include_dead: bool = False) -> dict[int, dict[str, int]]:
        """{layer: {class: count}} over the live residual features (dead and rare latents are
        left out unless include_dead)."""
        t = self.table("predecessors")
        layers = t.column("layer").to_numpy()
        classes = np.asarray(t.column("class").to_pylist())
        keep = np.ones(len(layers), bool) if include_dead else self.live_mask()
        return {int(L): {c: int(((layers == L) & (classes == c) & keep).sum()) for c in CLASSES}
                for L in self.layers}

    def check_feature(self, layer: int, position: str, feature: int) -> None:
        n = self.n_features(position, layer)
        if n is None:
            have = sorted({k.split("/")[1] for k in self.manifest["slots"]})
            raise FlowError(f"this flow has no SAE at {position} layer {layer} (positions: "
                            f"{', '.join(have)}; layers {self.layers[0]}..{self.layers[-1]})")
        if not 0 <= feature < n:
            raise FlowError(f"feature {feature} is out of range for {layer}/{position}: it has "
                            f"{n} features (0..{n - 1})")


def _read_json(path: Path, what: str) -> dict:
    """A JSON object of a flow result; FlowError when it is unreadable (not when absent)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FlowError(f"{path} is unreadable ({e}); rerun `saeflow flow` ({what})") from None
    if not isinstance(doc, dict):
        raise FlowError(f"{path} is not a saeflow {what}")
    return doc


def open_flow(run: str | os.PathLike) -> FlowRun:
    """The flow in the RUN directory `run`. MissingResultError when none was computed there
    (no flow.json); FlowError when one is there but corrupt or not a saeflow flow."""
    root = Path(run)
    mf = root / FLOW_MANIFEST
    if not mf.is_file():
        raise MissingResultError(f"{root} holds no flow results ({FLOW_MANIFEST} missing); run "
                                 f"`saeflow flow PACK --out {root}` first")
    manifest = _read_json(mf, "flow manifest")
    if manifest.get("format") != FLOW_FORMAT:
        raise FlowError(f"{mf} is not a saeflow flow manifest")
    thresholds = _read_json(root / "thresholds.json", "flow thresholds file")
    return FlowRun(root, manifest, thresholds)


def default_thresholds(nulls: dict[int, dict[str, np.ndarray]], q: float) -> dict:
    """Per layer and kind: the q-quantile of the null top-1 similarity ("far above chance")."""
    return {L: {kind: float(np.quantile(v, q)) for kind, v in per.items()}
            for L, per in nulls.items()}


def resolve_thresholds(defaults: dict, overrides: dict | None) -> dict:
    """Apply user thresholds: {"res": t, ...} globally and/or {"layers": {L: {"res": t}}}.

    Returns {L: {kind: {"value": t, "source": "null q=..." | "user"}}}.
    """
    overrides = overrides or {}
    unknown = set(overrides) - set(PRED_KINDS) - {"layers"}
    if unknown:
        raise FlowError(f"unknown threshold keys {sorted(unknown)}; use res, mlp, attn or layers")
    per_layer = {int(L): v for L, v in (overrides.get("layers") or {}).items()}
    bad_layers = sorted(set(per_layer) - set(defaults))
    if bad_layers:
        raise FlowError(f"thresholds given for layers {bad_layers}, which this flow does not have")
    out: dict[int, dict] = {}
    for L, kinds in defaults.items():
        out[L] = {}
        for kind, (value, source) in kinds.items():
            for scope in (per_layer.get(L, {}), overrides):
                if kind in scope and scope[kind] is not None:
                    t = float(scope[kind])
                    if not -1.0 <= t <= 1.0:
                        raise FlowError(f"threshold {kind}={t} must be a similarity in [-1, 1]")
                    value, source = t, "user"
                    break
            out[L][kind] = {"value": value, "source": source}
    return out


def resolve_geometry(plans, asked: str, liveness) -> tuple[str, dict[int, list[int]]]:
    """("no_massive" | "raw", {layer: massive residual dims}) for the flow's matching.

    A layer's massive set is the union over its residual-stream SAEs (R_L and R_{L-1}) of the
    dimensions that eval's rule names on their inputs (the firing pass's variances); every pair
    of the layer (M_L and A_L too) is compared without them, so both sides share one space."""
    known: dict[int, list[int]] = {}
    for p in plans:
        dims: set[int] = set()
        seen = False
        for slot in (p.resid, p.preds.get("res")):
            if slot is None or slot[0] not in ("resid_post", "resid_pre") or liveness is None:
                continue
            m = liveness.massive(slot)
            if m is not None:
                seen = True
                dims |= set(m)
        if seen:
            known[p.layer] = sorted(dims)
    have_all = bool(plans) and len(known) == len(plans)
    if asked == "no_massive" and not have_all:
        raise FlowError("geometry 'no_massive' needs each input's variance per dimension, which "
                        "a firing pass measures: pass --model (or use --geometry raw)")
    geometry = "no_massive" if asked == "no_massive" or (asked == "auto" and have_all) else "raw"
    return geometry, known


def s_res_shares(plans, results: dict, resolved: dict, live: dict | None,
                 geometry: str) -> dict[int, dict]:
    """Per layer: the share of live residual features whose top-1 residual predecessor reaches
    the residual threshold, in the flow's geometry, in the other one (when measured), and for
    the null directions (what chance alone gives)."""
    other = "raw" if geometry == "no_massive" else "no_massive"
    out: dict[int, dict] = {}
    for p in plans:
        r = results[p.layer]
        if "res_row_v" not in r:
            continue
        t = resolved[p.layer]["res"]["value"]
        mask = (live or {}).get(p.resid)
        keep = np.ones(int(r["n_resid"]), bool) if mask is None else np.asarray(mask, bool)

        def share(v) -> float:
            with np.errstate(invalid="ignore"):
                return round(float((v[keep, 0] >= t).mean()), 4) if keep.any() else float("nan")

        row = {geometry: share(r["res_row_v"]),
               "null": round(float((r["res_null"] >= t).mean()), 4)}
        if "res_alt_row_v" in r:
            row[other] = share(r["res_alt_row_v"])
        out[p.layer] = row
    return out


def run_flow(pack, out: str | os.PathLike, cfg: FlowConfig | None = None, *,
             layers: list[int] | None = None, thresholds: dict | None = None, model=None,
             t_res: float = 0.5, force: bool = False,
             progress: bool = True, liveness=None, scale=None) -> FlowRun:
    """Compute (or reuse) the flow of `pack` and write it into the RUN directory `out`.

    `scale` (saeflow.scale.ScaleConfig) with workers: the layers fan out to Ray workers (GPUs
    when the cluster has them); the cache and the tables are the same as in one process.

    `liveness` (liveness.Liveness): latents that never or rarely fire are flagged (`live`
    column) and left out of the candidate lists, class shares and similarity figures."""

    cfg = cfg or FlowConfig()
    t0 = time.time()
    out = Path(out)
    plans = plan_layers(pack, layers)
    if model is not None and any(p in pack.positions for p in MAPPED_POSITIONS):
        pack.check_model(model)
    fingerprint = pack_fingerprint(pack)
    check_pack_files(pack)  # the fingerprint trusts pack.json: check the files themselves
    prior = out / FLOW_MANIFEST
    if prior.is_file() and not force:
        old = json.loads(prior.read_text())
        if old.get("pack", {}).get("fingerprint") != fingerprint:
            raise FlowError(f"{out} holds the flow of a different pack "
                            f"({old.get('pack', {}).get('root')}); use another --out, or --force "
                            f"to replace it")
    live = {}
    if liveness is not None:
        live = {s: m for s in pack.entries if (m := liveness.live(s)) is not None}
    geometry, massive = resolve_geometry(plans, cfg.geometry, liveness)
    key_src = {"pack": fingerprint, "config": cfg.identity(), "cache_version": CACHE_VERSION,
               "mapping": _mapping_fingerprint(pack, model), "geometry": geometry,
               "massive": {str(L): v for L, v in massive.items()}}
    if live:
        key_src["live"] = liveness.digest()
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
    request = {"layers": [p.layer for p in plans], "thresholds": thresholds or {},
               "t_res": t_res, "live": key_src.get("live")}
    if prior.is_file() and not force:
        old = json.loads(prior.read_text())
        if old.get("cache_key") == key and old.get("request") == json.loads(json.dumps(request)) \
                and all((out / f).is_file() for f in ("predecessors.parquet", "successors.parquet",
                                                      "thresholds.json")):
            return open_flow(out)  # the same pack and settings: nothing to do
    cache = cache_dir("flow", key)
    write_json_atomic(cache / "key.json", key_src)

    todo = [p for p in plans if not _layer_cache_file(cache, p.layer).is_file()]
    _match_layers(pack, todo, cfg, model, live, geometry, massive, cache, scale, progress)
    results = {p.layer: dict(np.load(_layer_cache_file(cache, p.layer))) for p in plans}

    nulls = {p.layer: {k: results[p.layer][f"{k}_null"] for k in PRED_KINDS
                       if f"{k}_null" in results[p.layer]} for p in plans}
    defaults = {L: {k: ((t_res, f"t_res={t_res} (the paper's residual threshold)")
                        if k == "res" else (v, f"null {cfg.null} q={cfg.null_quantile}"))
                    for k, v in ts.items()} for L, ts in
                default_thresholds(nulls, cfg.null_quantile).items()}
    resolved = resolve_thresholds(defaults, thresholds)
    shares = s_res_shares(plans, results, resolved, live, geometry)

    pred = predecessor_table(plans, results, resolved, live)
    succ = successor_table(plans, results, pack, live)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(pred, out / "predecessors.parquet")
    write_parquet_atomic(succ, out / "successors.parquet")
    thr_doc = _thresholds_doc(cfg, t_res, geometry, massive, shares, resolved, nulls)
    write_json_atomic(out / "thresholds.json", thr_doc)
    manifest = _manifest(pack, plans, results, cfg, model, key, fingerprint, geometry, massive,
                         request, liveness if live else None,
                         seconds=time.time() - t0, reused=not todo)
    write_json_atomic(out / FLOW_MANIFEST, manifest)
    return open_flow(out)


def _thresholds_doc(cfg: FlowConfig, t_res: float, geometry: str, massive: dict, shares: dict,
                    resolved: dict, nulls: dict) -> dict:
    """thresholds.json: how "high" was decided, each layer's values, the nulls' quantiles and
    the s_res share in both geometries and under the null."""
    return {"method": (f"The residual predecessor is 'high' at s_res >= t_res = {t_res}. An "
                          f"MLP or attention predecessor is 'high' when its similarity is at or "
                          f"above the {cfg.null_quantile} quantile of the top-1 similarities "
                          f"that {cfg.null_samples} '{cfg.null}' null directions reach against "
                          f"the same predecessor SAE (see docs/method.md); user values replace "
                          f"either. Geometry: {geometry}."),
               "null": cfg.null, "null_quantile": cfg.null_quantile, "geometry": geometry,
               "t_res": t_res,
               "massive_dims": {str(L): v for L, v in massive.items()},
               "s_res_share": {str(L): v for L, v in shares.items()},
               "layers": {str(L): v for L, v in resolved.items()},
               "null_quantiles": {str(L): {k: {q: float(np.quantile(v, q))
                                               for q in (0.5, 0.9, 0.99, 0.999)}
                                           for k, v in per.items()} for L, per in nulls.items()}}


def _manifest(pack, plans, results, cfg: FlowConfig, model, key: str, fingerprint: str,
              geometry: str, massive: dict, request: dict, liveness, seconds: float,
              reused: bool) -> dict:
    """flow.json: the pack, the settings, the slots and widths, how attention was mapped."""
    slots = {}
    for p in plans:
        slots[f"{p.layer}/resid_post"] = int(results[p.layer]["n_resid"])
        for kind, slot in p.preds.items():
            if slot:
                slots[f"{slot[1]}/{slot[0]}"] = int(results[p.layer][f"{kind}_n"])
    mapping = {}
    for p in plans:
        s = p.preds["attn"]
        if s:
            mapping[str(p.layer)] = (describe_mapping(model, s[0]) if s[0] in MAPPED_POSITIONS
                                     else s[0])
    return {
        "format": FLOW_FORMAT, "saeflow_version": __version__,
        "pack": {"root": str(pack.root), "fingerprint": fingerprint, "model": pack.model_name,
                 "source_format": pack.source_format,
                 "neuronpedia_ids": {f"{L}/{p}": i.extra["neuronpedia_id"]
                                     for (p, L), i in pack.entries.items()
                                     if i.extra.get("neuronpedia_id")}},
        "config": cfg.identity(), "cache_key": key, "layers": [p.layer for p in plans],
        "geometry": geometry, "massive_dims": {str(L): v for L, v in massive.items()},
        "predecessor_slots": {str(p.layer): {k: (f"{s[1]}/{s[0]}" if s else None)
                                             for k, s in p.preds.items()} for p in plans},
        "attention_mapping": mapping, "slots": slots, "request": request,
        "dead_latents": (liveness.summary() if liveness is not None else
                         {"source": "unknown", "note": "no firing counts: dead latents are in"}),
        "seconds": round(seconds, 2), "reused_cache": reused,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _match_layers(pack, todo: list[LayerPlan], cfg: FlowConfig, model, live: dict,
                  geometry: str, massive: dict, cache: Path, scale, progress: bool) -> None:
    """Match the layers not in the cache yet (in this process, or one Ray task per layer);
    each finished layer lands in the cache at once, so a stopped job resumes at the others."""
    from tqdm.auto import tqdm

    def drops(L: int) -> tuple[list[int] | None, list[int] | None]:
        """(dims the matching leaves out, dims of the other geometry or None: no other)."""
        m = massive.get(L) or []
        if not m:
            return None, None
        return (m, []) if geometry == "no_massive" else (None, m)

    work = {p.layer: sum(1 for s in p.preds.values() if s) for p in todo}
    if scale is not None and scale.distributed and todo:
        # One task per layer (its up to three pairs share the residual SAE's directions); each
        # finished layer lands in the cache at once, so a stopped job resumes at the others.

        shipped = shippable(pack)
        mapped = model if any(p in pack.positions for p in MAPPED_POSITIONS) else None
        run_tasks(compute_layer, [(shipped, p, cfg, mapped, None, live, *drops(p.layer))
                                  for p in todo], scale,
                  desc="flow: matching", progress=progress, weights=[work[p.layer] for p in todo],
                  on_result=lambda i, arrays: save_npz_atomic(
                      _layer_cache_file(cache, todo[i].layer), arrays))
    else:
        bar = tqdm(total=sum(work.values()), desc="flow: matching", unit="pair",
                   disable=not progress or not todo)
        for p in todo:
            bar.set_postfix_str(f"layer {p.layer}")
            drop, alt_drop = drops(p.layer)
            arrays = compute_layer(pack, p, cfg, model, live=live, drop=drop, alt_drop=alt_drop)
            save_npz_atomic(_layer_cache_file(cache, p.layer), arrays)
            bar.update(work[p.layer])
        bar.close()

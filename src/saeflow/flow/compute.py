"""Data-free feature flow: predecessors and successors of every residual feature, thresholds, classes.

For every layer L and every feature of the residual SAE R_L (resid_post L) we match its direction
against three predecessor dictionaries: R_{L-1} (resid_post L-1, or resid_pre L), M_L (mlp_out L)
and A_L (attn_out L, or attn_z L mapped into the residual through W_O). One blocked pass per pair
(see match.py) gives both directions: R_L -> P (predecessors) and P -> R_L (successors).

Outputs (a RUN directory, shared with later stages; read them with flow/run.py):
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeflow._version import __version__
from saeflow.errors import FlowError
from saeflow.flow.config import FlowConfig
from saeflow.flow.inputs import (
    LayerSlots,
    check_pack_files,
    layer_slots,
    mapping_fingerprint,
    slot_directions,
)
from saeflow.flow.match import (
    TensorDirections,
    device_budget,
    gather_rows,
    null_top1,
    permutation_match,
    top_k_pairs,
)
from saeflow.flow.run import (
    FLOW_FORMAT,
    FLOW_MANIFEST,
    TABLE_FILES,
    THRESHOLDS_FILE,
    FlowRun,
    open_flow,
    read_manifest,
)
from saeflow.flow.tables import predecessor_table, successor_table
from saeflow.flow.thresholds import (
    flow_defaults,
    resolve_geometry,
    resolve_thresholds,
    s_res_shares,
    thresholds_doc,
)
from saeflow.ids import PRED_ORIGINS, Slot
from saeflow.lm.model import MAPPED_POSITIONS, describe_mapping
from saeflow.saes.packs import pack_fingerprint
from saeflow.scale.ray_backend import run_tasks, shippable
from saeflow.store import cache_dir, save_npz_atomic, write_json_atomic, write_parquet_atomic

CACHE_VERSION = 1


@dataclass
class FlowJob:
    """One flow computation: what is matched, how, and what identifies its cached matches."""

    pack: Any
    chosen: list[LayerSlots]
    cfg: FlowConfig
    model: Any  # None, or the model that maps attn_z / raw SAEs into the residual stream
    live: dict  # {slot: [d_sae] bool}: latents kept in the matching; empty: all of them
    liveness: Any  # the firing counts behind `live` (None when `live` is empty)
    geometry: str  # "no_massive" or "raw"
    massive: dict[int, list[int]]  # layer -> the massive residual dimensions
    key_source: dict  # what the cache key digests (written as key.json)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.key_source, sort_keys=True).encode()).hexdigest()[:20]

    def drops(self, layer: int) -> tuple[list[int] | None, list[int] | None]:
        """(dims the matching leaves out, dims of the other geometry or None: no other)."""
        m = self.massive.get(layer) or []
        if not m:
            return None, None
        return (m, []) if self.geometry == "no_massive" else (None, m)


def _job(pack, chosen: list[LayerSlots], cfg: FlowConfig, *, model, liveness,
         fingerprint: str) -> FlowJob:
    """The job's settings resolved: live latents, geometry and massive dims, the cache key."""
    live = {}
    if liveness is not None:
        live = {s: m for s in pack.entries if (m := liveness.live(s)) is not None}
    geometry, massive = resolve_geometry(chosen, cfg.geometry, liveness)
    key_source = {"pack": fingerprint, "config": cfg.identity(), "cache_version": CACHE_VERSION,
                  "mapping": mapping_fingerprint(pack, model), "geometry": geometry,
                  "massive": {str(L): v for L, v in massive.items()}}
    if live:
        key_source["live"] = liveness.digest()
    return FlowJob(pack=pack, chosen=chosen, cfg=cfg, model=model, live=live,
                   liveness=liveness if live else None, geometry=geometry, massive=massive,
                   key_source=key_source)


def run_flow(pack, out: str | os.PathLike, cfg: FlowConfig | None = None, *,
             layers: list[int] | None = None, thresholds: dict | None = None, model=None,
             t_res: float = 0.5, force: bool = False,
             progress: bool = True, liveness=None, scale=None) -> FlowRun:
    """Compute (or reuse) the flow of `pack` and write it into the RUN directory `out`.

    `scale` (saeflow.scale.ScaleConfig) with workers: the layers fan out to Ray workers (GPUs
    when the cluster has them); the cache and the tables are the same as in one process.

    `liveness` (liveness.Liveness): latents that never or rarely fire are flagged (`live`
    column) and left out of the candidate lists, class shares and similarity figures."""
    t0 = time.time()
    out = Path(out)
    chosen = layer_slots(pack, layers)
    if model is not None and any(p in pack.positions for p in MAPPED_POSITIONS):
        pack.check_model(model)
    fingerprint = pack_fingerprint(pack)
    check_pack_files(pack)  # the fingerprint trusts pack.json: check the files themselves
    prior = None if force else read_manifest(out)
    if prior is not None and prior.get("pack", {}).get("fingerprint") != fingerprint:
        raise FlowError(f"{out} holds the flow of a different pack "
                        f"({prior.get('pack', {}).get('root')}); use another --out, or --force "
                        f"to replace it")
    job = _job(pack, chosen, cfg or FlowConfig(), model=model, liveness=liveness,
               fingerprint=fingerprint)
    request = {"layers": [entry.layer for entry in chosen], "thresholds": thresholds or {},
               "t_res": t_res, "live": job.key_source.get("live")}
    if prior is not None and prior.get("cache_key") == job.key \
            and prior.get("request") == json.loads(json.dumps(request)) \
            and all((out / f).is_file() for f in (*TABLE_FILES, THRESHOLDS_FILE)):
        return open_flow(out)  # the same pack and settings: nothing to do
    cache = cache_dir("flow", job.key)
    write_json_atomic(cache / "key.json", job.key_source)

    todo = [entry for entry in chosen if not _layer_cache_file(cache, entry.layer).is_file()]
    _match_layers(job, todo, cache, scale, progress)
    results = {entry.layer: dict(np.load(_layer_cache_file(cache, entry.layer)))
               for entry in chosen}
    _write_results(job, results, out, thresholds, t_res)
    manifest = _manifest(job, results, request, seconds=time.time() - t0, reused=not todo)
    write_json_atomic(out / FLOW_MANIFEST, manifest)
    return open_flow(out)


def _write_results(job: FlowJob, results: dict, out: Path, thresholds: dict | None,
                   t_res: float) -> None:
    """predecessors.parquet, successors.parquet and thresholds.json of the matched layers."""
    nulls = {entry.layer: {origin: results[entry.layer][f"{origin}_null"] for origin in PRED_ORIGINS
                           if f"{origin}_null" in results[entry.layer]}
             for entry in job.chosen}
    resolved = resolve_thresholds(flow_defaults(nulls, job.cfg, t_res), thresholds)
    shares = s_res_shares(job.chosen, results, resolved, job.live, job.geometry)
    pred = predecessor_table(job.chosen, results, resolved, job.live)
    succ = successor_table(job.chosen, results, job.pack, job.live)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(pred, out / "predecessors.parquet")
    write_parquet_atomic(succ, out / "successors.parquet")
    write_json_atomic(out / THRESHOLDS_FILE,
                      thresholds_doc(job.cfg, t_res=t_res, geometry=job.geometry,
                                     massive=job.massive, shares=shares, resolved=resolved,
                                     nulls=nulls))


def _manifest(job: FlowJob, results: dict, request: dict, seconds: float, reused: bool) -> dict:
    """flow.json: the pack, the settings, the slots and widths, how attention was mapped."""
    pack, chosen = job.pack, job.chosen
    slots = {}
    for entry in chosen:
        slots[str(entry.resid)] = int(results[entry.layer]["n_resid"])
        for origin, slot in entry.preds.items():
            if slot:
                slots[str(slot)] = int(results[entry.layer][f"{origin}_n"])
    mapping = {}
    for entry in chosen:
        attn = entry.preds["attn"]
        if attn:
            mapping[str(entry.layer)] = (describe_mapping(job.model, attn.position)
                                         if attn.position in MAPPED_POSITIONS else attn.position)
    return {
        "format": FLOW_FORMAT, "saeflow_version": __version__,
        "pack": {"root": str(pack.root), "fingerprint": job.key_source["pack"],
                 "model": pack.model_name, "source_format": pack.source_format,
                 "neuronpedia_ids": {str(Slot.of(key)): info.extra["neuronpedia_id"]
                                     for key, info in pack.entries.items()
                                     if info.extra.get("neuronpedia_id")}},
        "config": job.cfg.identity(), "cache_key": job.key,
        "layers": [entry.layer for entry in chosen],
        "geometry": job.geometry, "massive_dims": {str(L): v for L, v in job.massive.items()},
        "predecessor_slots": {str(entry.layer): {origin: (str(s) if s else None)
                                                 for origin, s in entry.preds.items()}
                              for entry in chosen},
        "attention_mapping": mapping, "slots": slots, "request": request,
        "dead_latents": (job.liveness.summary() if job.liveness is not None else
                         {"source": "unknown", "note": "no firing counts: dead latents are in"}),
        "seconds": round(seconds, 2), "reused_cache": reused,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- the matching ---------------------------------------------------------------------------
def _layer_cache_file(cache: Path, layer: int) -> Path:
    return cache / f"layer_{layer}.npz"


def _match_layers(job: FlowJob, todo: list[LayerSlots], cache: Path, scale,
                  progress: bool) -> None:
    """Match the layers not in the cache yet (in this process, or one Ray task per layer: its
    up to three pairs share the residual SAE's directions); each finished layer lands in the
    cache at once, so a stopped job resumes at the others."""
    from tqdm.auto import tqdm

    pack = job.pack
    work = {entry.layer: sum(1 for s in entry.preds.values() if s) for entry in todo}
    if scale is not None and scale.distributed and todo:
        shipped = shippable(pack)
        mapped = job.model if any(p in pack.positions for p in MAPPED_POSITIONS) else None
        run_tasks(compute_layer,
                  [(shipped, entry, job.cfg, mapped, None, job.live, *job.drops(entry.layer))
                   for entry in todo], scale,
                  desc="flow: matching", progress=progress,
                  weights=[work[entry.layer] for entry in todo],
                  on_result=lambda i, arrays: save_npz_atomic(
                      _layer_cache_file(cache, todo[i].layer), arrays))
        return
    bar = tqdm(total=sum(work.values()), desc="flow: matching", unit="pair",
               disable=not progress or not todo)
    for entry in todo:
        bar.set_postfix_str(f"layer {entry.layer}")
        drop, alt_drop = job.drops(entry.layer)
        arrays = compute_layer(pack, entry, job.cfg, job.model, live=job.live, drop=drop,
                               alt_drop=alt_drop)
        save_npz_atomic(_layer_cache_file(cache, entry.layer), arrays)
        bar.update(work[entry.layer])
    bar.close()


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


def _match_pair(A, B, cfg: FlowConfig, kw: dict) -> tuple[np.ndarray, ...]:
    """(row_i [n_a, k], row_v [n_a, k], col_i [n_b, k], col_v [n_b, k]): each row's best
    matches in B and each column's best in A (k = 1 and one-to-one for "permutation")."""
    if cfg.method == "permutation":
        rows, cols, cos = permutation_match(A, B, **kw)
        row_i = np.full((A.n, 1), -1, np.int64)
        row_v = np.full((A.n, 1), np.nan, np.float32)
        col_i = np.full((B.n, 1), -1, np.int64)
        col_v = np.full((B.n, 1), np.nan, np.float32)
        row_i[rows, 0], row_v[rows, 0] = cols, cos
        col_i[cols, 0], col_v[cols, 0] = rows, cos
        return row_i, row_v, col_i, col_v
    m = top_k_pairs(A, B, k=min(cfg.k, A.n, B.n), cols=True, precision=cfg.precision, **kw)
    assert m.col_indices is not None and m.col_values is not None  # cols=True
    return (m.row_indices.numpy(), m.row_values.numpy(), m.col_indices.numpy(),
            m.col_values.numpy())


def compute_layer(pack, plan: LayerSlots, cfg: FlowConfig, model=None,
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
    dev = cfg.resolved_device()
    budget = device_budget(dev, cfg.memory_budget_mb << 20)  # held where the matching runs
    live = live or {}
    if directions is None:
        def directions(slot, drop_dims=None):
            return slot_directions(pack, slot, cfg.method, model, drop_dims=drop_dims)
    A_all = directions(plan.resid, drop).materialize(budget, device=dev)
    A, a_idx = _live_subset(A_all, live.get(plan.resid))
    out: dict[str, np.ndarray] = {"n_resid": np.array(A_all.n)}
    kw = cfg.match_kw()
    for origin, slot in plan.preds.items():
        if slot is None:
            continue
        B_all = directions(slot, drop).materialize(budget, device=dev)
        B, b_idx = _live_subset(B_all, live.get(slot))
        out[f"{origin}_n"] = np.array(B_all.n)
        row_i, row_v, col_i, col_v = _match_pair(A, B, cfg, kw)
        row_i, row_v = _scatter(row_i, row_v, a_idx, b_idx, A_all.n)
        col_i, col_v = _scatter(col_i, col_v, b_idx, a_idx, B_all.n)
        out.update({f"{origin}_row_i": row_i.astype(np.int32), f"{origin}_row_v": row_v,
                    f"{origin}_col_i": col_i.astype(np.int32), f"{origin}_col_v": col_v})
        out[f"{origin}_null"] = null_top1(A, B, n=cfg.null_samples, null=cfg.null,
                                          seed=cfg.seed + plan.layer, precision=cfg.precision,
                                          **kw)
        if origin == "res" and alt_drop is not None and cfg.method != "permutation":
            A_alt, _ = _live_subset(
                directions(plan.resid, alt_drop).materialize(budget, device=dev),
                live.get(plan.resid))
            B_alt, _ = _live_subset(directions(slot, alt_drop).materialize(budget, device=dev),
                                    live.get(slot))
            m = top_k_pairs(A_alt, B_alt, k=1, precision=cfg.precision, **kw)
            i, v = _scatter(m.row_indices.numpy(), m.row_values.numpy(), a_idx, b_idx, A_all.n)
            out["res_alt_row_i"], out["res_alt_row_v"] = i.astype(np.int32), v
    return out

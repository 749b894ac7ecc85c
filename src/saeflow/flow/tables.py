"""Arrow tables of the flow results (predecessors.parquet, successors.parquet), written atomically.

A missing predecessor (layer 0 has no residual one; a pack without MLP SAEs has no MLP one) is a
null in the table, never a magic number. Top-k lists are list<struct<feature, similarity>>.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from saeflow.ids import PRED_ORIGINS, Slot

if TYPE_CHECKING:
    from saeflow.flow.inputs import LayerSlots

TOPK_TYPE = pa.list_(pa.struct([("feature", pa.int32()), ("similarity", pa.float32())]))


def top1_columns(idx: np.ndarray | None, val: np.ndarray | None, n: int) -> tuple[pa.Array, pa.Array]:
    if idx is None or val is None:
        return pa.nulls(n, pa.float32()), pa.nulls(n, pa.int32())
    i, v = idx[:, 0], val[:, 0].astype(np.float32)
    missing = (i < 0) | np.isnan(v)
    return (pa.array(v, type=pa.float32(), mask=missing),
            pa.array(i.astype(np.int32), type=pa.int32(), mask=missing))


def topk_column(idx: np.ndarray | None, val: np.ndarray | None, n: int) -> pa.Array:
    if idx is None or val is None:
        return pa.nulls(n, TOPK_TYPE)
    k = idx.shape[1]
    values = pa.StructArray.from_arrays(
        [pa.array(idx.ravel().astype(np.int32)), pa.array(val.ravel().astype(np.float32))],
        names=["feature", "similarity"])
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    missing = pa.array((idx[:, 0] < 0) | np.isnan(val[:, 0]))
    return pa.ListArray.from_arrays(offsets, values, mask=missing, type=TOPK_TYPE)


def _live_column(live: dict | None, slot, n: int) -> pa.Array:
    mask = (live or {}).get(slot)
    return pa.array(np.ones(n, bool) if mask is None else np.asarray(mask, bool))


def predecessor_table(chosen: list[LayerSlots], results: dict, thresholds: dict,
                      live: dict | None = None) -> pa.Table:
    """One row per (layer, resid_post feature): top-1 and top-k per predecessor origin (res,
    mlp, attn), class, and `live` (False: a latent flagged dead or rare, left out of the
    statistics). `results`: {layer: compute_layer's arrays}."""
    tables = []
    for entry in chosen:
        r = results[entry.layer]
        n = int(r["n_resid"])
        cols = {"layer": pa.array(np.full(n, entry.layer, np.int16)),
                "feature": pa.array(np.arange(n, dtype=np.int32))}
        scores = {}
        for origin in PRED_ORIGINS:
            has = entry.preds[origin] is not None
            idx = r[f"{origin}_row_i"] if has else None
            val = r[f"{origin}_row_v"] if has else None
            s, i = top1_columns(idx, val, n)
            cols[f"s_{origin}"], cols[f"pred_{origin}"] = s, i
            cols[f"top_{origin}"] = topk_column(idx, val, n)
            scores[origin] = (val[:, 0].astype(np.float64) if val is not None
                              else np.full(n, np.nan))
        t = thresholds[entry.layer]
        cols["class"] = pa.array(classify(scores["res"], scores["mlp"], scores["attn"],
                                          *(t[o]["value"] if o in t else np.inf
                                            for o in PRED_ORIGINS)), type=pa.string())
        cols["live"] = _live_column(live, entry.resid, n)
        tables.append(pa.table(cols))
    return pa.concat_tables(tables)


def successor_table(chosen: list[LayerSlots], results: dict, pack,
                    live: dict | None = None) -> pa.Table:
    """One row per (layer, position, feature) of every matched SAE: its best matches downstream.

    resid_post L -> resid_post L+1; mlp_out / attn_out (attn_z) L -> resid_post L. Residual
    features of the last layer are listed with null successors.
    """
    tables, seen = [], set()

    def add(slot: Slot, n, next_layer, idx, val):
        s, i = top1_columns(idx, val, n)
        nl = pa.nulls(n, pa.int16()) if next_layer is None else \
            pa.array(np.full(n, next_layer, np.int16))
        npos = pa.nulls(n, pa.string()) if next_layer is None else \
            pa.array(["resid_post"] * n, pa.string())
        tables.append(pa.table({
            "layer": pa.array(np.full(n, slot.layer, np.int16)),
            "position": pa.array([slot.position] * n, pa.string()),
            "feature": pa.array(np.arange(n, dtype=np.int32)),
            "next_layer": nl, "next_position": npos, "s_next": s, "next": i,
            "top_next": topk_column(idx, val, n), "live": _live_column(live, slot, n)}))
        seen.add(slot)

    for entry in chosen:
        r = results[entry.layer]
        for origin, slot in entry.preds.items():
            if slot is not None and slot not in seen:
                add(slot, int(r[f"{origin}_n"]), entry.layer, r[f"{origin}_col_i"],
                    r[f"{origin}_col_v"])
    for entry in chosen:
        if entry.resid not in seen:
            add(entry.resid, int(results[entry.layer]["n_resid"]), None, None, None)
    return pa.concat_tables(tables)


def classify(s_res: np.ndarray, s_mlp: np.ndarray, s_attn: np.ndarray,
             t_res: float, t_mlp: float, t_attn: float) -> np.ndarray:
    """Section 3.3 classes. NaN (no such predecessor) counts as low."""
    with np.errstate(invalid="ignore"):
        hr, hm, ha = s_res >= t_res, s_mlp >= t_mlp, s_attn >= t_attn
    mod = hm | ha
    out = np.full(s_res.shape, "unexplained", dtype=object)
    out[hr & ~mod] = "translated"
    out[hr & mod] = "processed"
    out[~hr & mod] = "newborn"
    return out

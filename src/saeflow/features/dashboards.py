"""Feature dashboards in Neuronpedia's JSON shape, written from RUN/index.

One object per feature, with the field names Neuronpedia's feature pages and uploads use
(the shape SAEDashboard's Neuronpedia runner writes):

    modelId, layer (the source id, "6-saeflow-resid_post"), index, saeflowId,
    frac_nonzero, maxActApprox, meanAct,
    pos_str / pos_values, neg_str / neg_values           the decoder direction's logit lens
    freq_hist_data_bar_values / _heights                  histogram of nonzero activations
    activations: [{tokens, values, maxValue, maxValueTokenIndex, bin_min, bin_max, kind}]
    explanations: [{description, explanationModelName}]
    neuronpediaUrl                                        for packs published there

`export_dashboards(RUN)` writes RUN/dashboards/{layer}-{position}.json (a JSON list per SAE,
read one SAE at a time, written atomically); the web app serves one feature at
/api/dashboard/{layer}/{position}/{index} and links it from each feature page.
"""
from __future__ import annotations

import os
from pathlib import Path

from saeflow.errors import FeatureIndexError
from saeflow.features.tables import open_index
from saeflow.store import write_json_atomic

DASHBOARD_DIR = "dashboards"


def _source_id(layer: int, position: str) -> str:
    return f"{layer}-saeflow-{position}"


def feature_dashboard(row: dict, hist_edges: list[float], model_id: str | None) -> dict:
    """One index row (FeatureIndex.feature / slot_features) -> a Neuronpedia-style feature."""
    L, pos, f = int(row["layer"]), str(row["position"]), int(row["feature"])
    centers = [(a + b) / 2 for a, b in zip(hist_edges[:-1], hist_edges[1:])]
    acts = []
    for kind in ("examples", "samples"):
        for e in row.get(kind) or []:
            vals = [float(v) for v in e["acts"]]
            toks = list(e["tokens"])
            keep = [i for i, t in enumerate(toks) if t is not None]  # drop window padding
            vals, toks = [vals[i] for i in keep], [toks[i] for i in keep]
            center = keep.index(int(e["center"])) if int(e["center"]) in keep else 0
            q = float(e["quantile"]) if e.get("quantile") is not None else None
            acts.append({"tokens": toks, "values": vals, "maxValue": float(e["activation"]),
                         "maxValueTokenIndex": center, "kind": "top" if kind == "examples"
                         else "sample", "bin_min": q, "bin_max": q})
    expl = []
    if row.get("explanation"):
        expl.append({"description": row["explanation"], "explanationModelName": "saeflow-explain"})
    if row.get("label"):
        expl.append({"description": row["label"], "explanationModelName": "saeflow-auto-label"})
    top, bottom = row.get("logit_top") or [], row.get("logit_bottom") or []
    return {
        "modelId": model_id, "layer": _source_id(L, pos), "index": f,
        "saeflowId": f"{L}/{pos}/{f}",
        "frac_nonzero": float(row["density"]), "maxActApprox": float(row["max_act"]),
        "meanAct": float(row["mean_act"]),
        "pos_str": [t["token"] for t in top], "pos_values": [float(t["logit"]) for t in top],
        "neg_str": [t["token"] for t in bottom],
        "neg_values": [float(t["logit"]) for t in bottom],
        "freq_hist_data_bar_values": centers,
        "freq_hist_data_bar_heights": [int(h) for h in row["hist"]],
        "activations": acts, "explanations": expl,
        "neuronpediaUrl": row.get("neuronpedia"),
    }


def dashboard(run: str | os.PathLike, layer: int, position: str, feature: int) -> dict:
    """The dashboard of one feature of RUN's index."""
    ix = open_index(run)
    row = ix.feature(layer, position, feature)
    return feature_dashboard(row, ix.manifest["hist_edges"], ix.manifest.get("model"))


def export_dashboards(run: str | os.PathLike, out: str | os.PathLike | None = None,
                      slots: list[str] | None = None) -> list[Path]:
    """Write one JSON list of feature dashboards per SAE ("6/resid_post"), one SAE at a time."""
    ix = open_index(run)
    have = ix.manifest["slots"]
    slots = slots or sorted(have, key=lambda s: (int(s.split("/")[0]), s))
    unknown = [s for s in slots if s not in have]
    if unknown:
        raise FeatureIndexError(f"the index has no SAE at {', '.join(unknown)}; it has "
                         f"{', '.join(sorted(have)[:12])}")
    out = Path(out) if out else Path(run) / DASHBOARD_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for slot in slots:
        L, pos = slot.split("/")
        rows = ix.slot_features(int(L), pos)
        feats = [feature_dashboard(r, ix.manifest["hist_edges"], ix.manifest.get("model"))
                 for r in rows]
        path = out / f"{L}-{pos}.json"
        write_json_atomic(path, feats)
        written.append(path)
    return written

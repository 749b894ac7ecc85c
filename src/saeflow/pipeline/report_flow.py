"""The report's flow sections: the flow against chance and data per layer, the classes per
layer, and example flow graphs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from saeflow.errors import MissingResultError
from saeflow.features.tables import add_labels, open_index
from saeflow.flow.graphs import FlowIndex, draw_graph, persistence, trace
from saeflow.flow.run import open_flow
from saeflow.ids import Slot, feature_id
from saeflow.pipeline.report_doc import Doc, png, read_json

PAPER_GROUPS = ("Gemma 2 2B with Gemma Scope (flow paper, section 5.1): early layers are dominated "
                "by \"From nowhere\" and \"From RES\", the middle layers are stable, and \"From RES\" "
                "rises again in late layers. The paper gives the classes (translated / processed / "
                "newborn) per layer as plots without numbers.")
CLASS_COLORS = (("translated", "#4c72b0"), ("processed", "#dd8452"), ("newborn", "#55a868"),
                ("unexplained", "#c44e52"))
NO_FLOW = "No flow in this run (stage flow)."


def open_flow_if_any(run: Path):
    """The run's flow, or None when none was computed (a corrupt one raises FlowError)."""
    try:
        return open_flow(run)
    except MissingResultError:
        return None


def _wordy(label: str | None) -> bool:
    """Whether a label's activating tokens (left of the arrow; the logit tokens are on its
    right) are words."""
    toks = [t.strip() for t in (label or "").split("→")[0].split(",")]
    return sum(t.isascii() and t.isalpha() and len(t) > 2 for t in toks) >= 2


def example_features(run: Path, n: int = 5, t_res: float = 0.5) -> list[str]:
    """Residual features with the longest chains at t_res whose labels are made of words,
    from different layers where possible."""
    flow = open_flow(run)
    per = persistence(FlowIndex(flow), t_res)
    cands = []  # (chain length, layer, feature), longest first
    for L, arr in per.items():
        for f in np.argsort(-arr)[:40]:
            cands.append((int(arr[f]), L, int(f)))
    cands.sort(reverse=True)
    try:
        idx = open_index(run)
        labels = idx.labels([feature_id(L, "resid_post", f) for _, L, f in cands])
    except MissingResultError:
        labels = {}
    picked, layers = [], set()
    for _, L, f in cands:
        fid = feature_id(L, "resid_post", f)
        if _wordy((labels.get(fid) or {}).get("label")) and L not in layers:
            picked.append(fid)
            layers.add(L)
        if len(picked) == n:
            break
    for _, L, f in cands:  # fill up when too few are labelled in words
        if len(picked) == n:
            break
        fid = feature_id(L, "resid_post", f)
        if fid not in picked:
            picked.append(fid)
    return picked


def flow_science_table(run: Path, flow) -> pd.DataFrame:
    """Per layer: the data-free classes (with the flow's thresholds), the s_res share in both
    geometries and under the null, and the empirical groups on real tokens (stats)."""
    counts = flow.class_counts()
    shares = flow.thresholds.get("s_res_share") or {}
    geometry = flow.thresholds.get("geometry", "raw")
    groups = (read_json(run / "stats" / "summary.json") or {}).get("groups") or {}
    rows = []
    for L, c in counts.items():
        n = max(sum(c.values()), 1)
        row = {"layer": L, **{f"{k[:5]} %": 100 * v / n for k, v in c.items()}}
        sh = shares.get(str(L)) or {}
        for g in (geometry, "raw" if geometry == "no_massive" else "no_massive", "null"):
            row[f"s_res {g} %"] = 100 * sh[g] if g in sh else float("nan")
        gr = groups.get(str(L)) or {}
        for name in ("From RES", "From MLP", "From ATT", "From nowhere"):
            row[f"{name} %"] = 100 * gr[name] if name in gr else float("nan")
        if gr:
            row["mixed %"] = 100 * sum(v for k, v in gr.items() if "&" in k)
        rows.append(row)
    return pd.DataFrame(rows)


def flow_science_section(doc: Doc, run: Path, flow) -> None:
    from saeflow.flow.plots import thresholds_caption

    doc.h("Feature flow against chance and data, layer by layer")
    if flow is None:
        doc.p(NO_FLOW)
        return
    t_res = flow.thresholds.get("t_res", 0.5)
    doc.p(f"Classes per layer ({thresholds_caption(flow)}); the share of live residual "
          f"features with s_res >= {t_res} in the flow's geometry, in the other one, and for "
          f"null directions (what chance alone reaches); and the empirical groups on real "
          f"tokens (which top-1 predecessors fire with the feature; 'mixed' = two or three). "
          f"The paper (Gemma 2 2B, Gemma Scope) shows classes only as plots; its groups: "
          f"'From nowhere' and 'From RES' lead early, a stable middle, 'From RES' rising late.")
    doc.table(flow_science_table(run, flow), "{:.1f}")
    co = (read_json(run / "stats" / "summary.json") or {}).get("cofire")
    if co and co.get("by_similarity"):
        _cofire_tables(doc, co)


def _cofire_tables(doc: Doc, co: dict) -> None:
    """How often top-1 predecessors co-fire with their targets, by cosine and by threshold."""
    df = pd.DataFrame(co["by_similarity"])
    df = df[df.pairs > 0]
    piv = df.pivot_table(index="similarity", columns="kind", values="cofire",
                         aggfunc="first").reset_index()
    doc.p("Evidence for the thresholds: how often a top-1 predecessor fires when its target "
          "fires, by the pair's cosine (pooled over layers; statistics tokens). Real links "
          "co-fire far above chance; a threshold should sit where co-firing rises.")
    doc.table(piv.rename(columns={k: f"co-firing {k}" for k in ("res", "mlp", "attn")}),
              "{:.3f}")
    bt = pd.DataFrame(co.get("by_threshold") or [])
    if len(bt):
        summ = bt.groupby("kind").agg(high_share=("high_share", "median"),
                                      cofire_high=("cofire_high", "median"),
                                      cofire_low=("cofire_low", "median")).reset_index()
        doc.p("Pairs the thresholds call high and low (median over layers): share called "
              "high, and the co-firing of each side.")
        doc.table(summ, "{:.3f}")


def classes_section(doc: Doc, run: Path, flow, files: Path) -> None:
    """The classes of residual features per layer: a stacked bar figure and its table, the
    dead latents left out, and the empirical groups next to the paper's."""
    doc.h("Feature classes per layer (data-free flow)")
    if flow is None:
        doc.p(NO_FLOW)
        return
    rows = []
    for L, c in flow.class_counts().items():
        n = max(sum(c.values()), 1)
        rows.append({"layer": L, **{k: 100 * v / n for k, v in c.items()}})
    df = pd.DataFrame(rows)
    image = _classes_figure(df)
    (files / "classes.png").write_bytes(image)
    doc.figure(image, "Classes of residual features per layer", "report_files/classes.png")
    doc.table(df.rename(columns={k: f"{k} %" for k, _ in CLASS_COLORS}), "{:.1f}")
    dead = flow.manifest.get("dead_latents") or {}
    if dead.get("slots"):
        res = {k: v for k, v in dead["slots"].items()
               if Slot.parse(k).position == "resid_post"}
        doc.p(f"Left out of the class shares and of every candidate list: "
              f"{sum(v['excluded'] for v in res.values())} of "
              f"{sum(v['n'] for v in res.values())} residual latents "
              f"({sum(v['excluded'] for v in dead['slots'].values())} of all latents) that "
              f"fired fewer than {dead['min_count']} times in {dead['tokens']} tokens "
              f"({dead['source']}); `saeflow flow --keep-dead` keeps them.")
    else:
        doc.p("Dead latents are included (no firing counts when the flow was computed).")
    groups = (read_json(run / "stats" / "summary.json") or {}).get("groups")
    if groups:
        doc.p("Empirical predecessor groups on real tokens (share of active residual "
              "features), next to the paper:")
        gdf = pd.DataFrame(groups).T.reset_index().rename(columns={"index": "layer"})
        doc.table(gdf, "{:.2f}")
    doc.p(PAPER_GROUPS)


def _classes_figure(df: pd.DataFrame) -> bytes:
    """Stacked bars: the % of residual features of each class, per layer."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    bottom = np.zeros(len(df))
    for k, col in CLASS_COLORS:
        ax.bar(df.layer, df[k], bottom=bottom, color=col, label=k)
        bottom += df[k].to_numpy()
    ax.set_xlabel("layer")
    ax.set_ylabel("% of residual features")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    return png(fig)


def example_graphs_section(doc: Doc, run: Path, flow, files: Path) -> None:
    """The flow graphs of a few example features (example_features), each a figure and a
    table of its nodes."""
    doc.h("Example flow graphs")
    if flow is None:
        return
    for fid in example_features(run):
        G = trace(flow, fid, t_res=0.5)
        add_labels(G, run)
        out = files / fid.replace("/", "_")  # a folder name: the id without slashes
        out.mkdir(exist_ok=True)
        pics = draw_graph(G, out, formats=("png",), title=fid)
        layers = sorted({d["layer"] for _, d in G.nodes(data=True)})
        doc.h(f"{fid}: {G.nodes[fid].get('label') or '(no label)'}", 3)
        doc.figure(pics["png"].read_bytes(), f"flow graph of {fid}, layers {layers[0]}-"
                   f"{layers[-1]}", f"report_files/{out.name}/{pics['png'].name}")
        nodes = sorted(G.nodes(data=True), key=lambda x: (x[1]["layer"], x[0]))
        doc.table(pd.DataFrame([{"feature": n, "class": d.get("class", ""),
                                 "label": d.get("explanation") or d.get("label") or ""}
                                for n, d in nodes]))

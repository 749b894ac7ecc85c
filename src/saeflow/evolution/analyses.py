"""Analyses of the co-activation statistics: pass-through, quasi-boolean gates, communities,
empirical predecessor groups, and agreement between data-free and data-driven links."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from saeflow.errors import ConfigError, MissingResultError
from saeflow.evolution.tables import COFIRE_FILE, GROUPS_FILE, StatsRun
from saeflow.features.tables import open_index
from saeflow.flow.plots import save_png_atomic, write_html_atomic
from saeflow.flow.run import open_flow
from saeflow.ids import GROUPS, Slot, parse_feature
from saeflow.store import atomic_path, write_json_atomic


def _alive(stats: StatsRun) -> pd.DataFrame:
    f = stats.features()
    return f[f.n_active > 0]


COFIRE_BINS = (-1.0, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.01)


def _cofire_joined(flow_run, co: pd.DataFrame) -> pd.DataFrame:
    """The flow's predecessor rows (live features) with their co-firing counts."""
    pred = flow_run.table("predecessors").select(
        ["layer", "feature", "s_res", "s_mlp", "s_attn", "live"]).to_pandas()
    d = pred.merge(co, on=["layer", "feature"], how="inner")
    return d[d.live.astype(bool)]


def cofire_by_similarity(flow_run, co: pd.DataFrame, bins=COFIRE_BINS) -> pd.DataFrame:
    """Per predecessor kind and similarity bin of the top-1 match: pairs, and how often the
    predecessor fires when the target fires (pooled: sum both-on / sum target-on). A data-free
    match that means something co-fires far above a random pair."""
    d = _cofire_joined(flow_run, co)
    rows = []
    for kind in ("res", "mlp", "attn"):
        s = d[f"s_{kind}"]
        for lo, hi in zip(bins[:-1], bins[1:]):
            sel = d[(s >= lo) & (s < hi)]
            n_on = int(sel.n_on.sum())
            rows.append({"kind": kind, "similarity": f"[{lo:.2f}, {min(hi, 1.0):.2f})",
                         "pairs": int(len(sel)), "target_on": n_on,
                         "cofire": (float(sel[f"both_{kind}"].sum()) / n_on) if n_on else None})
    return pd.DataFrame(rows)


def cofire_by_threshold(flow_run, co: pd.DataFrame) -> pd.DataFrame:
    """Per layer and kind: the co-firing of the pairs the flow's thresholds call "high" and of
    those they call "low" (how well the thresholds separate real links from chance ones)."""
    d = _cofire_joined(flow_run, co)
    thr = flow_run.thresholds.get("layers", {})
    rows = []
    for L, g in d.groupby("layer"):
        for kind in ("res", "mlp", "attn"):
            t = (thr.get(str(L)) or {}).get(kind)
            s = g[f"s_{kind}"]
            if t is None or s.isna().all():
                continue
            hi, lo = g[s >= t["value"]], g[s < t["value"]]

            def rate(x):
                n = x.n_on.sum()
                return round(float(x[f"both_{kind}"].sum() / n), 4) if n else None
            rows.append({"layer": int(L), "kind": kind, "threshold": round(t["value"], 4),
                         "high_share": round(float(len(hi) / max(len(g), 1)), 4),
                         "cofire_high": rate(hi), "cofire_low": rate(lo)})
    return pd.DataFrame(rows)


def pass_through(stats: StatsRun, threshold: float = 0.5, measure: str = "pearson") -> pd.DataFrame:
    """Per adjacent pair at one position: how many live upstream features pass through (best
    downstream partner >= threshold), disappear, and how many downstream features appear."""
    alive = _alive(stats)
    rows = []
    for u, d in stats.pairs:
        if u[0] != d[0]:
            continue
        e = stats.edges(u, d)
        up_alive = set(alive[(alive.position == u[0]) & (alive.layer == u[1])].feature)
        down_alive = set(alive[(alive.position == d[0]) & (alive.layer == d[1])].feature)
        strong = e[e[measure] >= threshold]
        passing = set(strong.up) & up_alive
        fed = set(strong.down) & down_alive
        n_up, n_down = max(len(up_alive), 1), max(len(down_alive), 1)
        rows.append({"position": u[0], "layer": u[1], "next_layer": d[1],
                     "alive": len(up_alive), "alive_next": len(down_alive),
                     "pass_through": len(passing), "disappearing": len(up_alive - passing),
                     "appearing": len(down_alive - fed),
                     "pass_through_pct": 100 * len(passing) / n_up,
                     "disappearing_pct": 100 * len(up_alive - passing) / n_up,
                     "appearing_pct": 100 * len(down_alive - fed) / n_down})
    return pd.DataFrame(rows)


def gates(stats: StatsRun, threshold: float = 0.999, min_count: int = 5,
          labels: dict[str, str] | None = None, max_up_density: float = 0.4,
          min_up_count: int = 20) -> pd.DataFrame:
    """AND: a downstream feature with exactly two upstream features of necessity >= threshold
    (whenever it fires, both fire); OR: exactly two of sufficiency >= threshold (either one
    firing makes it fire). Pairs seen fewer than `min_count` times do not count, nor upstream
    features active on more than `max_up_density` of the tokens (they are "necessary" for
    almost anything) or fewer than `min_up_count` times (they are "sufficient" by chance)."""
    labels = labels or {}
    counts = stats.features().set_index(["position", "layer", "feature"]).n_active
    n_tokens = max(int(stats.manifest.get("tokens", 0)), 1)
    out = []
    for u, d in stats.pairs:
        e = stats.edges(u, d)
        e = e[e["count"] >= min_count]
        up_n = np.array([counts.get((u[0], u[1], int(a)), 0) for a in e.up], dtype=float)
        e = e[(up_n <= max_up_density * n_tokens) & (up_n >= min_up_count)]
        for kind, measure in (("AND", "necessity"), ("OR", "sufficiency")):
            hits = e[e[measure] >= threshold]
            for j, grp in hits.groupby("down"):
                if len(grp) != 2:
                    continue
                a, b = grp.up.tolist()
                ids = [u.feature(a), u.feature(b), d.feature(j)]
                out.append({"gate": kind, "down": ids[2], "up_a": ids[0], "up_b": ids[1],
                            "down_count": int(counts.get((d[0], d[1], j), 0)),
                            "up_a_count": int(counts.get((u[0], u[1], a), 0)),
                            "up_b_count": int(counts.get((u[0], u[1], b), 0)),
                            "both_counts": grp["count"].astype(int).tolist(),
                            measure: grp[measure].round(4).tolist(),
                            "down_label": labels.get(ids[2]), "up_a_label": labels.get(ids[0]),
                            "up_b_label": labels.get(ids[1])})
    return pd.DataFrame(out)


def communities(stats: StatsRun, floor: float = 0.1, resolution: float = 1.0,
                method: str = "leiden", measure: str = "pearson", seed: int = 0):
    """Communities over the cross-layer graph of adjacent same-position pairs with
    measure > floor. Returns (membership DataFrame, per-community summary DataFrame)."""
    frames = [stats.edges(u, d) for u, d in stats.pairs if u[0] == d[0]]
    e = pd.concat(frames) if frames else pd.DataFrame()
    e = e[e[measure] > floor] if len(e) else e
    if len(e) == 0:
        return pd.DataFrame(columns=["id", "layer", "position", "feature", "community"]), \
            pd.DataFrame(columns=["community", "size", "first_layer", "last_layer", "span"])
    src = pd.Series(_feature_ids(e.up_layer, e.up_position, e.up), index=e.index)
    dst = pd.Series(_feature_ids(e.down_layer, e.down_position, e.down), index=e.index)
    names = pd.Index(pd.unique(pd.concat([src, dst])))
    s_idx, d_idx = names.get_indexer(src), names.get_indexer(dst)
    w = e[measure].to_numpy(float)
    if method == "leiden":
        import igraph as ig
        import leidenalg

        g = ig.Graph(n=len(names), edges=list(zip(s_idx.tolist(), d_idx.tolist())))
        part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, weights=w,
                                        resolution_parameter=resolution, seed=seed)
        member = np.asarray(part.membership)
    elif method == "louvain":
        import networkx as nx

        G = nx.Graph()
        G.add_weighted_edges_from(zip(s_idx.tolist(), d_idx.tolist(), w.tolist()))
        member = np.zeros(len(names), int)
        for c, nodes in enumerate(nx.community.louvain_communities(G, weight="weight",
                                                                   resolution=resolution,
                                                                   seed=seed)):
            member[list(nodes)] = c
    else:
        raise ConfigError("method must be leiden or louvain")
    layers, positions, features = zip(*map(parse_feature, names)) if len(names) else ((), (), ())
    df = pd.DataFrame({"id": names, "layer": np.array(layers, np.int64),
                       "position": pd.Series(positions, dtype="str"),
                       "feature": np.array(features, np.int64), "community": member})
    summary = df.groupby("community").agg(size=("id", "size"), first_layer=("layer", "min"),
                                          last_layer=("layer", "max")).reset_index()
    summary["span"] = summary.last_layer - summary.first_layer + 1
    return df, summary.sort_values("size", ascending=False)


def _feature_ids(layers: pd.Series, positions: pd.Series, features: pd.Series) -> list[str]:
    """Feature ids ('6/resid_post/12') of rows given by layer, position and index columns."""
    slots: dict[tuple[str, int], Slot] = {}
    return [slots.setdefault((p, L), Slot(p, L)).feature(f)
            for L, p, f in zip(layers.tolist(), positions.tolist(), features.tolist())]


def agreement(flow_run, stats: StatsRun, pack) -> pd.DataFrame:
    """Per layer: how often the top-1 cosine residual predecessor is also the top-1 Pearson
    predecessor, and the Spearman correlation of cosine and Pearson over the stored pairs."""
    from scipy.stats import spearmanr

    pred = flow_run.predecessors()
    rows = []
    for u, d in stats.pairs:
        if not (u[0] == d[0] == "resid_post" and d[1] - u[1] == 1):
            continue
        e = stats.edges(u, d)
        sel = pred[pred.layer == d[1]]
        if len(e) == 0 or len(sel) == 0:
            continue
        best = e.loc[e.groupby("down").pearson.idxmax()][["down", "up", "pearson"]]
        cos_pred = sel.set_index("feature").pred_res
        ok = best[best.down.isin(cos_pred.index)]
        same = (cos_pred.loc[ok.down].to_numpy() == ok.up.to_numpy())
        Wu = pack.sae(*u).unit_directions()
        Wd = pack.sae(*d).unit_directions()
        cos = (Wu[e.up.to_numpy().copy()] * Wd[e.down.to_numpy().copy()]).sum(1).numpy()
        rho = spearmanr(cos, e.pearson.to_numpy()).statistic if len(e) > 2 else np.nan
        rows.append({"layer": d[1], "features_compared": int(len(ok)),
                     "top1_agreement": float(same.mean()) if len(ok) else np.nan,
                     "spearman_cosine_pearson": float(rho), "pairs": int(len(e))})
    return pd.DataFrame(rows)


# --- outputs ----------------------------------------------------------------------------------
def _labels(run) -> dict[str, str]:
    try:
        index = open_index(run)
    except MissingResultError:
        return {}
    return index.label_map()


def sankey_figure(pt: pd.DataFrame, position: str):
    """Pass-through as a Sankey: layer L -> L+1 (passing), L -> gone, new -> L+1."""
    import plotly.graph_objects as go

    rows = pt[pt.position == position].sort_values("layer")
    labels: list[str] = []
    idx: dict[str, int] = {}

    def node(name):
        if name not in idx:
            idx[name] = len(labels)
            labels.append(name)
        return idx[name]

    src: list[int] = []
    dst: list[int] = []
    val: list[int] = []
    col: list[str] = []
    for _, r in rows.iterrows():
        a, b = node(f"L{r.layer}"), node(f"L{r.next_layer}")
        for s_, d_, v, c in ((a, b, r.pass_through, "rgba(76,114,176,0.5)"),
                             (a, node(f"disappear after L{r.layer}"), r.disappearing,
                              "rgba(200,80,80,0.5)"),
                             (node(f"appear at L{r.next_layer}"), b, r.appearing,
                              "rgba(85,168,104,0.5)")):
            src.append(s_); dst.append(d_); val.append(int(v)); col.append(c)
    fig = go.Figure(go.Sankey(node=dict(label=labels, pad=12),
                              link=dict(source=src, target=dst, value=val, color=col)))
    fig.update_layout(title=f"Pass-through of {position} features between adjacent layers")
    return fig


def write_evolution_outputs(run, stats: StatsRun, pack, *, pass_threshold: float = 0.5,
                            gate_threshold: float = 0.999, gate_min_count: int = 5,
                            gate_max_up_density: float = 0.4, gate_min_up_count: int = 20,
                            community_floor: float = 0.1, resolution: float = 1.0,
                            method: Literal["leiden", "louvain"] = "leiden") -> dict:
    """Tables, JSON and figures of every analysis into RUN/stats/; returns a summary."""
    import matplotlib

    matplotlib.use("Agg")

    root = stats.root
    plots = root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    summary["pass_through"] = _write_pass_through(stats, pass_threshold, plots)

    g = gates(stats, gate_threshold, gate_min_count, _labels(run), gate_max_up_density,
              gate_min_up_count)
    write_json_atomic(root / "gates.json", g.to_dict("records"))
    summary["gates"] = {"AND": int((g.gate == "AND").sum()) if len(g) else 0,
                        "OR": int((g.gate == "OR").sum()) if len(g) else 0}

    members, comm = communities(stats, community_floor, resolution, method)
    with atomic_path(root / "communities.parquet") as tmp:
        members.to_parquet(tmp)
    with atomic_path(root / "communities_summary.csv") as tmp:
        comm.to_csv(tmp, index=False)
    summary["communities"] = {"n": int(len(comm)),
                              "largest": comm.head(5).to_dict("records") if len(comm) else []}

    if (root / GROUPS_FILE).is_file():
        summary["groups"] = _write_groups_plot(root / GROUPS_FILE, plots)
    try:
        flow_run = open_flow(run)
    except MissingResultError:
        flow_run = None
    cpath = root / COFIRE_FILE
    if flow_run is not None and cpath.is_file():
        co = pd.read_parquet(cpath)
        summary["cofire"] = {"by_similarity": cofire_by_similarity(flow_run, co).to_dict("records"),
                             "by_threshold": cofire_by_threshold(flow_run, co).to_dict("records")}
    if flow_run is not None:
        ag = agreement(flow_run, stats, pack)
        with atomic_path(root / "agreement.csv") as tmp:
            ag.to_csv(tmp, index=False)
        summary["agreement"] = ag.round(4).to_dict("records")
        if len(ag):
            _write_agreement_plot(ag, plots)
    write_json_atomic(root / "summary.json", summary)
    return summary


def _write_pass_through(stats: StatsRun, threshold: float, plots: Path) -> list[dict]:
    """pass_through.csv, and per position its Sankey (HTML) and line plot (PNG); returns the
    rows for the summary."""
    import matplotlib.pyplot as plt

    pt = pass_through(stats, threshold)
    with atomic_path(stats.root / "pass_through.csv") as tmp:
        pt.to_csv(tmp, index=False)
    for pos in pt.position.unique() if len(pt) else []:
        write_html_atomic(sankey_figure(pt, pos), plots / f"pass_through_{pos}.html")
        rows = pt[pt.position == pos]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for col, c in (("pass_through_pct", "#4c72b0"), ("disappearing_pct", "#c44e52"),
                       ("appearing_pct", "#55a868")):
            ax.plot(rows.layer, rows[col], marker="o", color=c, label=col.replace("_pct", ""))
        ax.set_xlabel("layer L (pair L -> L+1)")
        ax.set_ylabel("% of live features")
        ax.set_title(f"{pos}: pass-through at {threshold} ({'pearson'})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_png_atomic(fig, plots / f"pass_through_{pos}.png")
        plt.close(fig)
    return pt.round(2).to_dict("records")


def _write_groups_plot(groups_file: Path, plots: Path) -> dict:
    """groups.png: the share of each empirical predecessor group per layer; returns the
    shares for the summary."""
    import matplotlib.pyplot as plt

    groups = json.loads(groups_file.read_text())["layers"]
    layers = sorted(int(L) for L in groups)
    shares = {G: [groups[str(L)].get(G, 0) / max(sum(groups[str(L)].values()), 1)
                  for L in layers] for G in GROUPS}
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers) + 2), 3.8))
    bottom = np.zeros(len(layers))
    colors = plt.get_cmap("tab10")
    for i, G in enumerate(GROUPS):
        ax.bar(layers, shares[G], bottom=bottom, label=G, color=colors(i) if G != "From nowhere"
               else "#bbbbbb")
        bottom += shares[G]
    ax.set_xlabel("layer")
    ax.set_ylabel("share of active features")
    ax.set_title("Empirical predecessor groups (which top-1 predecessors fire on the token)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    save_png_atomic(fig, plots / "groups.png")
    plt.close(fig)
    return {str(L): {G: round(shares[G][i], 4) for G in GROUPS} for i, L in enumerate(layers)}


def _write_agreement_plot(ag: pd.DataFrame, plots: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot(ag.layer, ag.top1_agreement, marker="o", label="top-1 cosine = top-1 Pearson")
    ax.plot(ag.layer, ag.spearman_cosine_pearson, marker="s",
            label="Spearman(cosine, Pearson) over pairs")
    ax.set_xlabel("layer")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Data-free vs data-driven residual predecessors")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png_atomic(fig, plots / "agreement.png")
    plt.close(fig)

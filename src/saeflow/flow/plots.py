"""Figures of a flow run: class proportions per layer, similarity histograms, persistence.

Each figure is written twice: a PNG (matplotlib) for papers and reports, and an interactive HTML
(plotly) that loads plotly.js from plotly.min.js beside it (offline). Every file is written
through a temporary file and a rename, plotly.min.js included: a full disk leaves the old file
or none, never a truncated one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from saeflow.flow.graphs import persistence
from saeflow.flow.run import FlowRun
from saeflow.ids import CLASSES, PRED_ORIGINS
from saeflow.store import atomic_path, write_bytes_atomic

CLASS_COLORS = {"translated": "#4c72b0", "processed": "#8172b3", "newborn": "#dd8452",
                "unexplained": "#bbbbbb"}
ORIGIN_NAMES = {"res": "residual (R_{L-1})", "mlp": "MLP (M_L)", "attn": "attention (A_L)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_html_atomic(fig, path: Path) -> None:
    """A plotly figure as HTML that loads plotly.min.js from its folder; the bundle is
    (re)written first, atomically, when it is missing or not the complete current one (plotly
    itself would write it in place, and skip a truncated one forever after)."""
    from plotly.offline import get_plotlyjs

    path = Path(path)
    bundle = path.parent / "plotly.min.js"
    js = get_plotlyjs().encode("utf-8")
    if not bundle.is_file() or bundle.stat().st_size != len(js):
        write_bytes_atomic(bundle, js)
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs="directory", full_html=True)


def save_png_atomic(fig, path: Path, dpi: int = 150) -> None:
    """A matplotlib figure as PNG, through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def class_proportions(run: FlowRun) -> tuple[list[int], dict[str, np.ndarray]]:
    counts = run.class_counts()
    layers = sorted(counts)
    totals = np.array([max(sum(counts[L].values()), 1) for L in layers], float)
    return layers, {c: np.array([counts[L][c] for L in layers]) / totals for c in CLASSES}


def similarity_histograms(run: FlowRun, bins: np.ndarray) -> dict[str, np.ndarray]:
    """origin ("res", "mlp", "attn") -> [n_layers, n_bins] fraction of features per top-1
    similarity bin."""
    t = run.table("predecessors")
    layers = t.column("layer").to_numpy()
    out = {}
    for origin in PRED_ORIGINS:
        s = t.column(f"s_{origin}").to_numpy(zero_copy_only=False).astype(float)
        rows = []
        for L in run.layers:
            v = s[(layers == L) & ~np.isnan(s)]
            h = np.histogram(v, bins=bins)[0].astype(float)
            rows.append(h / max(len(v), 1))
        out[origin] = np.array(rows)
    return out


def thresholds_caption(run: FlowRun) -> str:
    """How the classes were cut, in one line: the residual threshold, the null model of the
    MLP / attention thresholds, and the geometry (for every class plot and table)."""
    t = run.thresholds
    t_res = t.get("t_res")
    null = t.get("null") or run.manifest.get("config", {}).get("null", "?")
    q = t.get("null_quantile", 0.99)
    geometry = t.get("geometry") or run.manifest.get("geometry", "raw")
    res = f"s_res >= {t_res}" if t_res is not None else "s_res from the null"
    return (f"{res}; MLP/attention: q{q} of the '{null}' null; geometry: {geometry}"
            + ("" if geometry == "raw" else " (massive residual dims left out)"))


def _class_plots(run: FlowRun, out_dir: Path) -> tuple[list[int], list[Path]]:
    """Class proportions per layer (PNG + HTML), captioned with how the classes were cut."""
    import plotly.graph_objects as go

    plt = _plt()
    layers, props = class_proportions(run)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers) + 2), 3.8))
    bottom = np.zeros(len(layers))
    for c in CLASSES:
        ax.bar(layers, props[c], bottom=bottom, color=CLASS_COLORS[c], label=c, width=0.85)
        bottom += props[c]
    ax.set_xlabel("layer")
    ax.set_ylabel("share of residual features")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, frameon=False)
    how = thresholds_caption(run)
    ax.set_title(f"Feature classes per layer (data-free flow)\n{how}", fontsize=9)
    fig.tight_layout()
    save_png_atomic(fig, out_dir / "class_proportions.png")
    plt.close(fig)
    pf = go.Figure([go.Bar(x=layers, y=props[c], name=c, marker_color=CLASS_COLORS[c])
                    for c in CLASSES])
    pf.update_layout(barmode="stack", title=f"Feature classes per layer<br><sub>{how}</sub>",
                     xaxis_title="layer",
                     yaxis_title="share of residual features", yaxis_range=[0, 1])
    write_html_atomic(pf, out_dir / "class_proportions.html")
    return layers, [out_dir / "class_proportions.png", out_dir / "class_proportions.html"]


def write_flow_plots(run: FlowRun, out_dir: str | Path, t_res: float = 0.5) -> list[Path]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. class proportions per layer (the paper's main figure)
    layers, written = _class_plots(run, out_dir)

    # 2. top-1 similarity histograms per layer, with the class thresholds
    bins = np.linspace(-0.2, 1.0, 61)
    hists = similarity_histograms(run, bins)
    origins = [k for k in PRED_ORIGINS if hists[k].sum() > 0]
    thr = run.thresholds["layers"]
    fig, axes = plt.subplots(1, len(origins), figsize=(4.2 * len(origins), 3.8), squeeze=False)
    pf = make_subplots(rows=1, cols=len(origins), subplot_titles=[ORIGIN_NAMES[k] for k in origins])
    for j, origin in enumerate(origins):
        ax = axes[0, j]
        ax.imshow(hists[origin], aspect="auto", origin="lower", cmap="viridis",
                  extent=[bins[0], bins[-1], layers[0] - 0.5, layers[-1] + 0.5])
        tx = [thr[str(L)][origin]["value"] if origin in thr[str(L)] else np.nan for L in layers]
        ax.plot(tx, layers, "w--", lw=1, label="threshold")
        ax.set_title(f"s_{origin}: {ORIGIN_NAMES[origin]}", fontsize=9)
        ax.set_xlabel("top-1 similarity")
        ax.set_ylabel("layer")
        pf.add_trace(go.Heatmap(z=hists[origin], x=(bins[:-1] + bins[1:]) / 2, y=layers,
                                coloraxis="coloraxis"), row=1, col=j + 1)
        pf.add_trace(go.Scatter(x=tx, y=layers, mode="lines", line=dict(color="white", dash="dash"),
                                name=f"threshold {origin}"), row=1, col=j + 1)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save_png_atomic(fig, out_dir / "similarity_histograms.png")
    plt.close(fig)
    pf.update_layout(title="Top-1 predecessor similarity per layer (fraction of features)",
                     coloraxis=dict(colorscale="Viridis"))
    write_html_atomic(pf, out_dir / "similarity_histograms.html")
    written += [out_dir / "similarity_histograms.png", out_dir / "similarity_histograms.html"]

    # 3. persistence: how many layers a top-1 residual chain survives at >= t_res
    pers = persistence(run, t_res=t_res)
    max_len = max(1, max(int(v.max()) if len(v) else 0 for v in pers.values()))
    grid = np.array([np.bincount(pers[L], minlength=max_len + 1)[:max_len + 1] / max(len(pers[L]), 1)
                     for L in layers])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * max_len + 3), 3.8))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma",
                   extent=[-0.5, max_len + 0.5, layers[0] - 0.5, layers[-1] + 0.5])
    fig.colorbar(im, ax=ax, label="share of features")
    ax.set_xlabel(f"layers the top-1 chain survives (s_res >= {t_res})")
    ax.set_ylabel("starting layer")
    ax.set_title("Persistence of residual features")
    fig.tight_layout()
    save_png_atomic(fig, out_dir / "persistence.png")
    plt.close(fig)
    pf = go.Figure(go.Heatmap(z=grid, x=list(range(max_len + 1)), y=layers, colorscale="Magma",
                              colorbar=dict(title="share")))
    pf.update_layout(title=f"Persistence: layers a top-1 chain survives at s_res >= {t_res}",
                     xaxis_title="layers survived", yaxis_title="starting layer")
    write_html_atomic(pf, out_dir / "persistence.html")
    written += [out_dir / "persistence.png", out_dir / "persistence.html"]
    return written

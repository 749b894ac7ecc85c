"""The steering sweep's figures: score vs layer and vs strength per theme (PNG and HTML), and
score vs strength per graph mode with the 95% CIs of curves.csv (PNG)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from saeflow.steering.config import SWEEP_GRAPH_MODES


def write_mode_curves(curves: pd.DataFrame, out: Path, score: str = "activation_score"
                      ) -> list[Path]:
    """Score vs strength, single vs cumulative (and cumulative_norm), one panel per (theme,
    layer), with the 95% CIs; strengths on evenly spaced ticks (they include 0 and negatives)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = curves[curves["mode"].isin(["single", "cumulative", "cumulative_norm"])]
    if c.empty:
        return []
    panels = sorted({(r.theme, int(r.layer)) for r in c.itertuples()})
    strengths = sorted(c.strength.unique(), key=lambda v: (abs(v), v))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False)
    for j, (th, layer) in enumerate(panels):
        ax = axes[0, j]
        base = curves[(curves.theme == th) & (curves["mode"] == "default")]
        if len(base):
            ax.axhline(float(base[score].iloc[0]), color="grey", ls=":", label="unsteered")
        for m in ("single", "cumulative", "cumulative_norm"):
            g = c[(c.theme == th) & (c.layer == layer) & (c["mode"] == m)]
            if g.empty:
                continue
            g = g.set_index("strength").reindex(strengths).dropna(subset=[score])
            x = [strengths.index(v) for v in g.index]
            ax.errorbar(x, g[score], yerr=[g[score] - g.ci_low, g.ci_high - g[score]],
                        marker="o", capsize=3, label=m)
        ax.set_xticks(range(len(strengths)), [f"{v:g}" for v in strengths], fontsize=7)
        ax.set_title(f"{th}, layer {layer}", fontsize=9)
        ax.set_xlabel("strength (r for rescale)")
        ax.set_ylabel(score.replace("_", " "))
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    png = out / "modes_vs_strength.png"
    fig.savefig(png, dpi=130)
    plt.close(fig)
    return [png]


def write_sweep_plots(df: pd.DataFrame, out: Path, score: str = "activation_score") -> list[Path]:
    """Score vs layer (at each mode's best strength) and score vs strength (at its best layer),
    one panel per theme; PNG (matplotlib) and HTML (plotly)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    themes = sorted(df.theme.unique())
    graph_modes = [m for m in SWEEP_GRAPH_MODES if m in set(df["mode"])]
    written = []
    for axis in ("layer", "strength"):
        fig, axes = plt.subplots(1, len(themes), figsize=(4 * len(themes), 3.4), squeeze=False)
        pf = make_subplots(rows=1, cols=len(themes), subplot_titles=themes)
        for j, th in enumerate(themes):
            ax = axes[0, j]
            d = df[df.theme == th]
            base = d[d["mode"] == "default"][score].mean()
            ax.axhline(base, color="grey", ls=":", label="unsteered")
            for m in graph_modes:
                g = d[d["mode"] == m]
                if g.empty:
                    continue
                other = "strength" if axis == "layer" else "layer"
                best_other = g.groupby(other)[score].mean().idxmax()
                g = g[g[other] == best_other]
                stats = g.groupby(axis)[score].agg(["mean", "sem"]).reset_index()
                x = stats[axis].to_numpy()
                if axis == "layer" and m == "seed":
                    continue  # the seed alone has no layer axis; it is in the strength plot
                ax.errorbar(x, stats["mean"], yerr=1.96 * stats["sem"].fillna(0), marker="o",
                            capsize=3, label=m)
                pf.add_trace(go.Scatter(x=x, y=stats["mean"], mode="lines+markers", name=m,
                                        legendgroup=m, showlegend=j == 0,
                                        error_y=dict(array=1.96 * stats["sem"].fillna(0))),
                             row=1, col=j + 1)
            ax.set_title(th)
            ax.set_xlabel(axis)
            ax.set_ylabel(score.replace("_", " "))
            if axis == "strength" and (df.strength > 0).all():
                ax.set_xscale("log", base=2)
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        png = out / f"score_vs_{axis}.png"
        fig.savefig(png, dpi=130)
        plt.close(fig)
        html = out / f"score_vs_{axis}.html"
        pf.update_layout(title=f"{score.replace('_', ' ')} vs {axis}")
        pf.write_html(str(html), include_plotlyjs="directory", full_html=True)
        written += [png, html]
    return written

"""The steering sweep's tables: per setting (curves.csv), the best setting per theme and graph
mode (best.csv), and graph modes compared at their best settings or paired at equal settings.
Each reads the sweep's per-text table (sweep.parquet: one row per text, its `mode` column the
graph mode, or "default" for unsteered text)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from saeflow.intervals import bootstrap_difference_ci, bootstrap_mean_ci


def best_settings(df: pd.DataFrame, score: str = "activation_score") -> pd.DataFrame:
    """Per theme and mode, the (layer, strength) with the highest mean score, with a bootstrap
    95% CI over its texts (all sampling seeds)."""
    rows = []
    for (th, graph_mode), g in df.groupby(["theme", "mode"]):
        means = g.groupby(["layer", "strength"])[score].mean()
        (layer, s), m = means.idxmax(), means.max()
        sel = g[(g.layer == layer) & (g.strength == s)]
        lo, hi = bootstrap_mean_ci(sel[score].to_numpy())
        rows.append({"theme": th, "mode": graph_mode, "layer": int(layer), "strength": float(s),
                     score: round(float(m), 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                     "concept": round(float(sel.concept.mean()), 4),
                     "coherence": round(float(sel.coherence.mean()), 4), "texts": len(sel),
                     "example": sel.text.iloc[0][:200]})
    return pd.DataFrame(rows)


def compare_modes(df: pd.DataFrame, a: str, b: str, score: str = "activation_score") -> dict:
    """Per theme: best-setting score of mode a minus mode b, with a bootstrap 95% CI (texts
    resampled within each mode's best setting); and the mean over themes."""
    best = best_settings(df, score)
    out: dict[str, Any] = {}
    diffs = []
    for th, g in best.groupby("theme"):
        if not {a, b} <= set(g["mode"]):
            continue
        sel = {}
        for m in (a, b):
            r = g[g["mode"] == m].iloc[0]
            sel[m] = df[(df.theme == th) & (df["mode"] == m) & (df.layer == r.layer) &
                        (df.strength == r.strength)][score].to_numpy()
        lo, hi = bootstrap_difference_ci(sel[a], sel[b])
        d = float(sel[a].mean() - sel[b].mean())
        diffs.append(d)
        out[th] = {"difference": round(d, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4)}
    if diffs:
        out["mean_over_themes"] = round(float(np.mean(diffs)), 4)
    return out


def setting_curves(df: pd.DataFrame, score: str = "activation_score") -> pd.DataFrame:
    """Per (theme, mode, layer, strength): texts, mean score with a bootstrap 95% CI over the
    texts, mean concept and coherence, and the injected norm."""
    rows = []
    keys = ["theme", "mode", "layer", "strength"]
    for (th, graph_mode, layer, s), g in df.groupby(keys):
        x = g[score].to_numpy(float)
        lo, hi = bootstrap_mean_ci(x)
        rows.append({"theme": th, "mode": graph_mode, "layer": int(layer), "strength": float(s),
                     "texts": len(g), score: round(float(x.mean()), 4), "ci_low": round(lo, 4),
                     "ci_high": round(hi, 4), "concept": round(float(g.concept.mean()), 4),
                     "coherence": round(float(g.coherence.mean()), 4),
                     "injected_norm": round(float(g.injected_norm.mean()), 4)
                     if "injected_norm" in g else float("nan")})
    return pd.DataFrame(rows)


def paired_by_setting(df: pd.DataFrame, a: str, b: str, score: str = "activation_score") -> dict:
    """Mode a minus mode b at the same (theme, layer, strength), the same sampling seeds and
    samples (paired), averaged over every shared setting; and per strength. 95% CIs by
    bootstrap over the paired texts."""
    key = ["theme", "layer", "strength", "sampling_seed", "sample"]
    A = df[df["mode"] == a].set_index(key)[score]
    B = df[df["mode"] == b].set_index(key)[score]
    d = (A - B).dropna()
    if d.empty:
        return {}
    lo, hi = bootstrap_mean_ci(d.to_numpy(float))
    out: dict[str, Any] = {"difference": round(float(d.mean()), 4), "ci_low": round(lo, 4),
                           "ci_high": round(hi, 4), "pairs": int(len(d)), "by_strength": {}}
    for s, g in d.groupby(level="strength"):
        lo, hi = bootstrap_mean_ci(g.to_numpy(float))
        out["by_strength"][f"{s:g}"] = {"difference": round(float(g.mean()), 4),
                                        "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                                        "pairs": int(len(g))}
    return out

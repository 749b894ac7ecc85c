"""The run report: one self-contained HTML file (figures inlined) and a Markdown summary.

It reads what the pipeline stages wrote under RUN (eval.json, the flow, the index, stats/,
validate/, sweep/, pipeline.json) and skips, with a note, any part that is missing.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from saeflow.features.tables import add_labels, open_index
from saeflow.flow.graphs import FlowIndex, draw_graph, persistence, trace
from saeflow.flow.predecessors import open_flow
from saeflow.ids import feature_id
from saeflow.pipeline.scorecard import baseline_note, measure_run, scorecard
from saeflow.store import write_text_atomic

PAPER_GROUPS = ("Gemma 2 2B with Gemma Scope (flow paper, section 5.1): early layers are dominated "
                "by \"From nowhere\" and \"From RES\", the middle layers are stable, and \"From RES\" "
                "rises again in late layers. The paper gives the classes (translated / processed / "
                "newborn) per layer as plots without numbers.")


class _Doc:
    """Sections written to HTML and Markdown at once."""

    def __init__(self):
        self.html: list[str] = []
        self.md: list[str] = []

    def h(self, text: str, level: int = 2):
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"\n{'#' * level} {text}\n")

    def p(self, text: str):
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(text + "\n")

    def table(self, df: pd.DataFrame, floatfmt: str = "{:.3f}"):
        def cell(v):
            if isinstance(v, (float, np.floating)):
                return "" if not np.isfinite(v) else floatfmt.format(v)
            return str(v)
        cols = list(df.columns)
        rows = [[cell(v) for v in r] for r in df.itertuples(index=False)]
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) +
                         "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>"
                                                            for v in r) + "</tr>" for r in rows) +
                         "</table>")
        self.md.append("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" +
                       "\n".join("| " + " | ".join(v.replace("|", "\\|") for v in r) + " |"
                                 for r in rows) + "\n")

    def figure(self, png: bytes, caption: str, md_path: str | None = None):
        b64 = base64.b64encode(png).decode()
        self.html.append(f"<figure><img src=\"data:image/png;base64,{b64}\" alt=\""
                         f"{html.escape(caption)}\"><figcaption>{html.escape(caption)}"
                         f"</figcaption></figure>")
        if md_path:
            self.md.append(f"![{caption}]({md_path})\n")

    def pre(self, text: str):
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        self.md.append("```\n" + text + "\n```\n")


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def example_features(run: Path, n: int = 5, t_res: float = 0.5) -> list[str]:
    """Residual features with the longest chains at t_res whose labels are made of words,
    from different layers where possible."""

    flow = open_flow(run)
    per = persistence(FlowIndex(flow), t_res)
    cands = []
    for L, arr in per.items():
        for f in np.argsort(-arr)[:40]:
            cands.append((int(arr[f]), L, int(f)))
    cands.sort(reverse=True)
    try:
        idx = open_index(run)
        labels = idx.labels([feature_id(L, "resid_post", f) for _, L, f in cands])
    except ValueError:
        labels = {}

    def wordy(label: str | None) -> bool:
        # the activating tokens (left of the arrow; the logit tokens are on its right) are words
        toks = [t.strip() for t in (label or "").split("→")[0].split(",")]
        return sum(t.isascii() and t.isalpha() and len(t) > 2 for t in toks) >= 2

    picked, layers = [], set()
    for length, L, f in cands:
        fid = feature_id(L, "resid_post", f)
        if wordy((labels.get(fid) or {}).get("label")) and L not in layers:
            picked.append(fid)
            layers.add(L)
        if len(picked) == n:
            break
    for length, L, f in cands:  # fill up when too few are labelled in words
        if len(picked) == n:
            break
        fid = feature_id(L, "resid_post", f)
        if fid not in picked:
            picked.append(fid)
    return picked


DIFFERENCES = (
    "Where saeflow's experiment differs from the paper's, and why: every method is scored on "
    "one set of cases (targets with an active top-1 predecessor), so the rates compare; "
    "'predecessor_group' removes the target's top-1 predecessor of each kind together, as the "
    "paper removes 'the predecessor(s)', and 'top1_cosine' the single most similar of them; "
    "'exhaustive' tries every active upstream feature alone and has its own null "
    "('exhaustive_control': inactive features at the same removal norms, as many tries); "
    "'control_matched' / 'control_group' remove unrelated active features of the same size. "
    "Success is given under two rules: TopK's rank rule (the target left the top-k) and a "
    "threshold rule (its pre-activation fell below the SAE's threshold θ, or for a TopK SAE the "
    "mean k-th largest pre-activation), because a TopK latent near the boundary leaves the top-k "
    "under almost any change; the rate by the target's activation rank shows how much. Targets "
    "are sampled uniformly among the active features of held-out texts; CIs are clustered by "
    "text with a Student t quantile. The SAEs are small TopK SAEs on Gemma 3 270M, not Gemma "
    "Scope JumpReLU SAEs on Gemma 2 2B, so the numbers are comparable in kind, not in value.")


def flow_science_table(run: Path, flow) -> pd.DataFrame:
    """Per layer: the data-free classes (with the flow's thresholds), the s_res share in both
    geometries and under the null, and the empirical groups on real tokens (stats)."""
    counts = flow.class_counts()
    shares = flow.thresholds.get("s_res_share") or {}
    geometry = flow.thresholds.get("geometry", "raw")
    groups = (_read_json(run / "stats" / "summary.json") or {}).get("groups") or {}
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


def _flow_science_section(doc, run: Path) -> None:
    from saeflow.flow.plots import thresholds_caption

    try:
        flow = open_flow(run)
    except ValueError:
        doc.p("No flow in this run (stage flow).")
        return
    t_res = flow.thresholds.get("t_res", 0.5)
    doc.p(f"Classes per layer ({thresholds_caption(flow)}); the share of live residual "
          f"features with s_res >= {t_res} in the flow's geometry, in the other one, and for "
          f"null directions (what chance alone reaches); and the empirical groups on real "
          f"tokens (which top-1 predecessors fire with the feature; 'mixed' = two or three). "
          f"The paper (Gemma 2 2B, Gemma Scope) shows classes only as plots; its groups: "
          f"'From nowhere' and 'From RES' lead early, a stable middle, 'From RES' rising late.")
    doc.table(flow_science_table(run, flow), "{:.1f}")
    co = (_read_json(run / "stats" / "summary.json") or {}).get("cofire")
    if co and co.get("by_similarity"):
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


def _md_tables(doc, text: str) -> None:
    """Markdown from validate's renderers into the report: tables as tables, lines as text."""
    block: list[str] = []

    def flush():
        if block:
            rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in block
                    if not set(ln.replace("|", "").strip()) <= {"-"}]
            doc.table(pd.DataFrame(rows[1:], columns=rows[0]))
            block.clear()
    for line in text.splitlines():
        if line.startswith("|"):
            block.append(line)
            continue
        flush()
        if line.strip():
            doc.p(line)
    flush()


def _validation_section(doc, va: dict) -> None:
    from saeflow.steering.validate import (
        breakdown_markdown,
        paired_markdown,
        rank_rule_markdown,
        table_markdown,
    )

    cfg = va.get("config", {})
    doc.p(f"Layers {va.get('layers')}, {cfg.get('tokens_per_text', '?')} tokens per text, "
          f"targets chosen {cfg.get('target_choice', 'random')}ly; success = the target feature "
          f"switched off; change = 1 - z_new / z_old. The paper's Table 1 is Gemma 2 2B with "
          f"Gemma Scope (top-1 cosine 65%, exhaustive 73%).")
    _md_tables(doc, table_markdown(va))
    if va.get("paired"):
        doc.p("Each method minus its null on the same cases (points; 95% CI): what a "
              "predecessor earns beyond removing unrelated features of the same size.")
        _md_tables(doc, paired_markdown(va))
    if va.get("by_target_rank"):
        doc.p("Success by the target's activation rank (0 = most active at the token), under "
              "both rules:")
        _md_tables(doc, rank_rule_markdown(va))
    if va.get("by_similarity"):
        doc.p("Success by the cosine of the removed predecessor to the target (rank rule):")
        _md_tables(doc, breakdown_markdown(va, "by_similarity", title="cosine"))
    dead = va.get("dead_latents") or {}
    if dead.get("slots"):
        left = sum(v["excluded"] for v in dead["slots"].values())
        doc.p(f"Candidate lists leave out {left} latents that fired fewer than "
              f"{dead['min_count']} times in {dead['tokens']} tokens ({dead['source']}).")
    doc.p(DIFFERENCES)


def _mode_comparison(doc, sw: dict) -> None:
    for key, label in (("cumulative_vs_single_at_equal_strength",
                        "Cumulative minus single-layer at the same layer and strength"),
                       ("cumulative_norm_vs_single_at_equal_strength",
                        "Cumulative scaled to single-layer's total injected norm, minus "
                        "single-layer")):
        c = sw.get(key) or {}
        if "difference" not in c:
            continue
        per = "; ".join(f"{k}: {v['difference']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
                        for k, v in c["by_strength"].items())
        doc.p(f"{label} (paired texts, {c['pairs']}): {c['difference']:+.3f} "
              f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]; by strength {per}.")


def write_report(run: str | Path, pack=None) -> tuple[Path, Path]:
    """RUN/report.html (self-contained) and RUN/report.md; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    files = run / "report_files"
    files.mkdir(exist_ok=True)
    doc = _Doc()
    state = _read_json(run / "pipeline.json") or {}
    cfg = state.get("config", {})
    doc.h(f"saeflow report: {run.name}", 1)
    doc.p(f"Model {cfg.get('model', '?')}, pack {cfg.get('pack', '?')}; written "
          f"{time.strftime('%Y-%m-%d %H:%M')}.")

    # --- headline measures against the targets ------------------------------------------
    doc.h("The SAE family against its targets")
    card = scorecard(run)
    if card["this run"].notna().any():
        doc.p("This run's headline measures, next to the v0.1 default pack, the floor and goal "
              "set for the trained family, and the flow paper (Gemma 2 2B with Gemma Scope). "
              + baseline_note())
        doc.table(card.fillna("-"), "{:.3f}")
        by_layer = measure_run(run).get("s_res_share_by_layer") or {}
        if by_layer:
            doc.p("Share of live residual features with s_res >= 0.5, per layer: " + ", ".join(
                f"{L}: {100 * v:.0f}%" for L, v in sorted(by_layer.items())) + ".")
    else:
        doc.p("No eval, flow or validation in this run to measure.")
    doc.h("Feature flow against chance and data, layer by layer")
    _flow_science_section(doc, run)

    # --- pack quality -------------------------------------------------------------------
    ev = _read_json(run / "eval.json")
    doc.h("SAE pack quality")
    if ev:
        ci_how = ev.get("ce_ci_method", "bootstrap by text row")
        docs = f" from {ev['ce_documents']} documents" if ev.get("ce_documents") else ""
        doc.p(f"{ev['tokens']} held-out tokens (ΔCE and KL on {ev['ce_tokens']}{docs}, at "
              f"{', '.join(ev.get('ce_positions') or ['every position'])}, 95% intervals: "
              f"{ci_how}); clean CE {ev['clean_ce']:.3f}. dead = never "
              f"active on {ev.get('dead_tokens', ev['tokens'])} held-out tokens (the FVU tokens "
              f"and more); dense = active on more than 10% of them; fvu_rest = FVU "
              f"without the massive dimensions (each carries >= 10% of the variance and stands out, or >= 1000x "
              f"the median dimension's), "
              f"which otherwise dominate the residual stream's variance.")
        df = pd.DataFrame(ev["saes"])
        if "delta_ce_ci" in df:  # eval.json of earlier versions has no intervals
            df["delta_ce_95"] = ["-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
                                 for ci in df.delta_ce_ci]
            df["massive"] = [",".join(map(str, m)) or "-" for m in df.massive_dims]
        cols = [c for c in ("position", "layer", "d_sae", "fvu", "fvu_rest", "massive", "l0",
                            "dead_fraction", "dense_fraction", "delta_ce", "delta_ce_95", "kl")
                if c in df]
        doc.table(df[cols].sort_values(["position", "layer"]).fillna("-"))
    else:
        doc.p("No evaluation in this run (stage eval).")

    # --- flow classes -------------------------------------------------------------------
    doc.h("Feature classes per layer (data-free flow)")
    try:

        flow = open_flow(run)
    except ValueError:
        flow = None
    if flow is not None:
        counts = flow.class_counts()
        rows = []
        for L, c in counts.items():
            n = max(sum(c.values()), 1)
            rows.append({"layer": L, **{k: 100 * v / n for k, v in c.items()}})
        df = pd.DataFrame(rows)
        fig, ax = plt.subplots(figsize=(8, 3.4))
        bottom = np.zeros(len(df))
        for k, col in (("translated", "#4c72b0"), ("processed", "#dd8452"),
                       ("newborn", "#55a868"), ("unexplained", "#c44e52")):
            ax.bar(df.layer, df[k], bottom=bottom, color=col, label=k)
            bottom += df[k].to_numpy()
        ax.set_xlabel("layer")
        ax.set_ylabel("% of residual features")
        ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.15))
        png = _png(fig)
        (files / "classes.png").write_bytes(png)
        doc.figure(png, "Classes of residual features per layer", "report_files/classes.png")
        doc.table(df.rename(columns={k: f"{k} %" for k in ("translated", "processed", "newborn",
                                                           "unexplained")}), "{:.1f}")
        dead = flow.manifest.get("dead_latents") or {}
        if dead.get("slots"):
            res = {k: v for k, v in dead["slots"].items() if k.endswith("/resid_post")}
            doc.p(f"Left out of the class shares and of every candidate list: "
                  f"{sum(v['excluded'] for v in res.values())} of "
                  f"{sum(v['n'] for v in res.values())} residual latents "
                  f"({sum(v['excluded'] for v in dead['slots'].values())} of all latents) that "
                  f"fired fewer than {dead['min_count']} times in {dead['tokens']} tokens "
                  f"({dead['source']}); `saeflow flow --keep-dead` keeps them.")
        else:
            doc.p("Dead latents are included (no firing counts when the flow was computed).")
        groups = (_read_json(run / "stats" / "summary.json") or {}).get("groups")
        if groups:
            doc.p("Empirical predecessor groups on real tokens (share of active residual "
                  "features), next to the paper:")
            gdf = pd.DataFrame(groups).T.reset_index().rename(columns={"index": "layer"})
            doc.table(gdf, "{:.2f}")
        doc.p(PAPER_GROUPS)
    else:
        doc.p("No flow in this run (stage flow).")

    # --- example graphs -----------------------------------------------------------------
    doc.h("Example flow graphs")
    if flow is not None:

        for fid in example_features(run):
            G = trace(flow, fid, t_res=0.5)
            add_labels(G, run)
            out = files / fid.replace("/", "_")
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

    # --- pass-through and gates ---------------------------------------------------------
    doc.h("Pass-through and gates (data-driven statistics)")
    st = _read_json(run / "stats" / "summary.json")
    if st:
        man = _read_json(run / "stats" / "stats.json") or {}
        doc.p(f"Co-activation statistics over {man.get('tokens', '?')} tokens. Pass-through: a "
              f"feature whose best Pearson partner in the next layer is at least 0.5.")
        doc.table(pd.DataFrame(st["pass_through"]), "{:.1f}")
        gates = _read_json(run / "stats" / "gates.json") or []
        doc.p(f"Quasi-boolean gates: {st['gates']['AND']} AND, {st['gates']['OR']} OR. The "
              f"first ones:")
        if gates:
            g = pd.DataFrame(gates)
            show = pd.concat([g[g.gate == k].head(5) for k in ("AND", "OR")])
            doc.table(show[["gate", "down", "down_label", "up_a", "up_a_label", "up_b",
                            "up_b_label", "down_count"]].fillna(""))
        if st.get("agreement"):
            doc.p("Agreement of data-free and data-driven residual predecessors per layer:")
            doc.table(pd.DataFrame(st["agreement"]), "{:.3f}")
    else:
        doc.p("No statistics in this run (stage stats).")

    # --- deactivation -------------------------------------------------------------------
    doc.h("Causal validation: deactivating predecessors")
    va = _read_json(run / "validate" / "summary.json")
    if va:
        _validation_section(doc, va)
        rs = run / "validate" / "r_sweep.csv"
        if rs.is_file():
            df = pd.read_csv(rs).groupby("r").relative_change.mean().reset_index()
            doc.p("r sweep: relative change of the LM loss when a whole graph is rescaled by r.")
            doc.table(df, "{:+.4f}")
    else:
        doc.p("No validation in this run (stage validate).")

    # --- steering -----------------------------------------------------------------------
    doc.h("Steering")
    sw = _read_json(run / "sweep" / "summary.json")
    if sw:
        doc.p(f"Themes {', '.join(sw['config']['themes'])}; modes "
              f"{', '.join(sw['config']['modes'])}; strengths {sw['config']['strengths']}; "
              f"prompt {sw['config']['prompt']!r}. Concept = probability of the theme's topic "
              f"under a MiniLM + logistic-regression classifier "
              f"({100 * sw['classifier']['held_out_accuracy']:.1f}% held-out accuracy); "
              f"coherence = SmolLM2 perplexity and distinct-2 relative to unsteered text.")
        for plot in sorted((run / "sweep" / "plots").glob("*.png")):
            doc.figure(plot.read_bytes(), plot.stem.replace("_", " "), f"sweep/plots/{plot.name}")
        best = pd.DataFrame(sw["best"])
        if len(best):
            doc.p("Best setting per theme and mode (activation score, bootstrap 95% CI):")
            cols = [c for c in ("theme", "mode", "layer", "strength", "activation_score",
                                "ci_low", "ci_high", "concept", "coherence") if c in best]
            doc.table(best[cols])
        sp = run / "sweep" / "sweep.parquet"
        if sp.is_file() and len(best):
            df = pd.read_parquet(sp)
            doc.p("Example completions at each theme's best setting (prompt "
                  f"{sw['config']['prompt']!r}):")
            for th, grp in best.groupby("theme"):
                top = grp.sort_values("activation_score", ascending=False).iloc[0]
                sel = df[(df.theme == th) & (df["mode"] == top["mode"]) &
                         (df.layer == top["layer"]) & (df.strength == top["strength"])]
                dflt = df[(df.theme == th) & (df["mode"] == "default")]
                text = "\n".join([f"[{th}, {top['mode']}, layer {top['layer']}, strength "
                                  f"{top['strength']:g}]"] +
                                 [f"  steered: {t!r}" for t in sel.text.head(2)] +
                                 [f"  default: {t!r}" for t in dflt.text.head(1)])
                doc.pre(text)
        c = sw.get("cumulative_vs_single", {})
        if "mean_over_themes" in c:
            doc.p(f"Cumulative minus single-layer (best settings): mean "
                  f"{c['mean_over_themes']:+.3f} over themes.")
        _mode_comparison(doc, sw)
    else:
        doc.p("No steering sweep in this run (stage sweep).")
    sp = _read_json(run / "sweep-paper" / "summary.json")
    doc.h("Steering: the paper's deactivation experiment", 3)
    if sp:
        c = sp["config"]
        doc.p(f"Theme {', '.join(c['themes'])}: the flow graphs of {c['seeds_per_theme']} seed "
              f"features rescaled by r in {c['strengths']} (single layer vs cumulative), prompt "
              f"{c['prompt']!r}, {c['max_new_tokens']} new tokens, top-p {c['top_p']}, "
              f"temperature {c['temperature']}, {c['n'] * len(c['seeds'])} samples per setting. "
              f"Score = (1 - concept) x coherence (deactivation), mean with a bootstrap 95% CI. "
              f"The paper found cumulative better than single-layer at small |r|.")
        plot = run / "sweep-paper" / "modes_vs_strength.png"
        if plot.is_file():
            doc.figure(plot.read_bytes(), "deactivation score vs r, single vs cumulative",
                       "sweep-paper/modes_vs_strength.png")
        curves = run / "sweep-paper" / "curves.csv"
        if curves.is_file():
            cv = pd.read_csv(curves)
            cols = [x for x in ("mode", "layer", "strength", "texts", "deactivation_score",
                                "ci_low", "ci_high", "concept", "coherence") if x in cv]
            doc.table(cv[cols])
        _mode_comparison(doc, sp)
    else:
        doc.p("Not run here (`saeflow steer-sweep RUN --paper`).")

    # --- provenance ---------------------------------------------------------------------
    doc.h("How this was made")
    stages = state.get("stages", {})
    if stages:
        doc.table(pd.DataFrame([{"stage": s,
                                 "status": "this report" if s == "report" else r.get("status"),
                                 "minutes": (r.get("seconds") or 0) / 60,
                                 "finished": r.get("finished_at", "")}
                                for s, r in stages.items()]), "{:.1f}")
    doc.pre("\n".join(state.get("commands", [])) or "(no commands recorded)")
    doc.pre(json.dumps(state.get("versions", {}), indent=1))

    style = ("body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0;font-size:13px}td,th{border-bottom:"
             "1px solid #ddd;padding:.15em .5em;text-align:left}img{max-width:100%}"
             "pre{background:#f6f6f8;padding:.6em;white-space:pre-wrap}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>saeflow report: "
            f"{html.escape(run.name)}</title><style>{style}</style></head><body>"
            + "\n".join(doc.html) + "</body></html>")

    html_path, md_path = run / "report.html", run / "report.md"
    write_text_atomic(html_path, page)
    write_text_atomic(md_path, "\n".join(doc.md))
    return html_path, md_path

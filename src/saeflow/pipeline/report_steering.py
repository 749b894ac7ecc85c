"""The report's causal sections: deactivating predecessors (validate), the steering sweep and
the paper's deactivation sweep."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from saeflow.pipeline.report_doc import Doc, read_json

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

def validation_section(doc: Doc, run: Path) -> None:
    doc.h("Causal validation: deactivating predecessors")
    va = read_json(run / "validate" / "summary.json")
    if not va:
        doc.p("No validation in this run (stage validate).")
        return
    _validation_tables(doc, va)
    rs = run / "validate" / "r_sweep.csv"
    if rs.is_file():
        df = pd.read_csv(rs).groupby("r").relative_change.mean().reset_index()
        doc.p("r sweep: relative change of the LM loss when a whole graph is rescaled by r.")
        doc.table(df, "{:+.4f}")


def _validation_tables(doc: Doc, va: dict) -> None:
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
    doc.md_tables(table_markdown(va))
    if va.get("paired"):
        doc.p("Each method minus its null on the same cases (points; 95% CI): what a "
              "predecessor earns beyond removing unrelated features of the same size.")
        doc.md_tables(paired_markdown(va))
    if va.get("by_target_rank"):
        doc.p("Success by the target's activation rank (0 = most active at the token), under "
              "both rules:")
        doc.md_tables(rank_rule_markdown(va))
    if va.get("by_similarity"):
        doc.p("Success by the cosine of the removed predecessor to the target (rank rule):")
        doc.md_tables(breakdown_markdown(va, "by_similarity", title="cosine"))
    dead = va.get("dead_latents") or {}
    if dead.get("slots"):
        left = sum(v["excluded"] for v in dead["slots"].values())
        doc.p(f"Candidate lists leave out {left} latents that fired fewer than "
              f"{dead['min_count']} times in {dead['tokens']} tokens ({dead['source']}).")
    doc.p(DIFFERENCES)


def _mode_comparison(doc: Doc, sw: dict) -> None:
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


def sweep_section(doc: Doc, run: Path) -> None:
    """The steering sweep: its plots, the best setting per theme and mode, example
    completions and the cumulative-vs-single comparisons."""
    doc.h("Steering")
    sw = read_json(run / "sweep" / "summary.json")
    if not sw:
        doc.p("No steering sweep in this run (stage sweep).")
        return
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
        doc.p("Example completions at each theme's best setting (prompt "
              f"{sw['config']['prompt']!r}):")
        _example_completions(doc, pd.read_parquet(sp), best)
    c = sw.get("cumulative_vs_single", {})
    if "mean_over_themes" in c:
        doc.p(f"Cumulative minus single-layer (best settings): mean "
              f"{c['mean_over_themes']:+.3f} over themes.")
    _mode_comparison(doc, sw)


def _example_completions(doc: Doc, df: pd.DataFrame, best: pd.DataFrame) -> None:
    """Per theme: two steered completions at its best setting and one default."""
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


def paper_sweep_section(doc: Doc, run: Path) -> None:
    """The paper's deactivation experiment (`steer-sweep --paper`): score vs r, single layer
    vs cumulative."""
    sp = read_json(run / "sweep-paper" / "summary.json")
    doc.h("Steering: the paper's deactivation experiment", 3)
    if not sp:
        doc.p("Not run here (`saeflow steer-sweep RUN --paper`).")
        return
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

"""The run report: one self-contained HTML file (figures inlined) and a Markdown summary.

It reads what the pipeline stages wrote under RUN (eval.json, the flow, the index, stats/,
validate/, sweep/, pipeline.json) and skips, with a note, any part that is missing. Each
section is one function; the flow's are in report_flow.py, validation and steering in
report_steering.py, the document they write to in report_doc.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from saeflow.pipeline.report_doc import Doc, read_json
from saeflow.pipeline.report_flow import (  # noqa: F401  (example_features & co: public here)
    PAPER_GROUPS,
    classes_section,
    example_features,
    example_graphs_section,
    flow_science_section,
    flow_science_table,
    open_flow_if_any,
)
from saeflow.pipeline.report_steering import (  # noqa: F401  (DIFFERENCES: public here)
    DIFFERENCES,
    paper_sweep_section,
    sweep_section,
    validation_section,
)
from saeflow.pipeline.scorecard import baseline_note, measure_run, scorecard
from saeflow.store import write_text_atomic

EVAL_COLUMNS = ("position", "layer", "d_sae", "fvu", "fvu_rest", "massive", "l0",
                "dead_fraction", "dense_fraction", "delta_ce", "delta_ce_95", "kl")
GATE_COLUMNS = ["gate", "down", "down_label", "up_a", "up_a_label", "up_b", "up_b_label",
                "down_count"]


def write_report(run: str | Path, pack=None) -> tuple[Path, Path]:
    """RUN/report.html (self-contained) and RUN/report.md; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    run = Path(run)
    files = run / "report_files"
    files.mkdir(exist_ok=True)
    doc = Doc()
    state = read_json(run / "pipeline.json") or {}
    cfg = state.get("config", {})
    doc.h(f"saeflow report: {run.name}", 1)
    doc.p(f"Model {cfg.get('model', '?')}, pack {cfg.get('pack', '?')}; written "
          f"{time.strftime('%Y-%m-%d %H:%M')}.")
    flow = open_flow_if_any(run)
    scorecard_section(doc, run)
    flow_science_section(doc, run, flow)
    eval_section(doc, run)
    classes_section(doc, run, flow, files)
    example_graphs_section(doc, run, flow, files)
    stats_section(doc, run)
    validation_section(doc, run)
    sweep_section(doc, run)
    paper_sweep_section(doc, run)
    provenance_section(doc, state)
    html_path, md_path = run / "report.html", run / "report.md"
    write_text_atomic(html_path, doc.page(run.name))
    write_text_atomic(md_path, "\n".join(doc.md))
    return html_path, md_path


def scorecard_section(doc: Doc, run: Path) -> None:
    """The headline measures against their targets (scorecard.py)."""
    doc.h("The SAE family against its targets")
    card = scorecard(run)
    if not card["this run"].notna().any():
        doc.p("No eval, flow or validation in this run to measure.")
        return
    doc.p("This run's headline measures, next to the v0.1 default pack, the floor and goal "
          "set for the trained family, and the flow paper (Gemma 2 2B with Gemma Scope). "
          + baseline_note())
    doc.table(card.fillna("-"), "{:.3f}")
    by_layer = measure_run(run).get("s_res_share_by_layer") or {}
    if by_layer:
        doc.p("Share of live residual features with s_res >= 0.5, per layer: " + ", ".join(
            f"{L}: {100 * v:.0f}%" for L, v in sorted(by_layer.items())) + ".")


def eval_section(doc: Doc, run: Path) -> None:
    """The pack's quality on held-out tokens (eval.json), one row per SAE."""
    ev = read_json(run / "eval.json")
    doc.h("SAE pack quality")
    if not ev:
        doc.p("No evaluation in this run (stage eval).")
        return
    ci_how = ev.get("ce_ci_method", "bootstrap by text row")
    docs = f" from {ev['ce_documents']} documents" if ev.get("ce_documents") else ""
    doc.p(f"{ev['tokens']} held-out tokens (ΔCE and KL on {ev['ce_tokens']}{docs}, at "
          f"{', '.join(ev.get('ce_positions') or ['every position'])}, 95% intervals: "
          f"{ci_how}); clean CE {ev['clean_ce']:.3f}. dead = never "
          f"active on {ev.get('dead_tokens', ev['tokens'])} held-out tokens (the FVU tokens "
          f"and more); dense = active on more than 10% of them; fvu_rest = FVU "
          f"without the massive dimensions (each carries >= 10% of the variance and stands "
          f"out, or >= 1000x the median dimension's), "
          f"which otherwise dominate the residual stream's variance.")
    df = pd.DataFrame(ev["saes"])
    if "delta_ce_ci" in df:  # eval.json of earlier versions has no intervals
        df["delta_ce_95"] = ["-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
                             for ci in df.delta_ce_ci]
        df["massive"] = [",".join(map(str, m)) or "-" for m in df.massive_dims]
    cols = [c for c in EVAL_COLUMNS if c in df]
    doc.table(df[cols].sort_values(["position", "layer"]).fillna("-"))


def stats_section(doc: Doc, run: Path) -> None:
    """Pass-through, gates and the agreement of data-free and data-driven predecessors."""
    doc.h("Pass-through and gates (data-driven statistics)")
    st = read_json(run / "stats" / "summary.json")
    if not st:
        doc.p("No statistics in this run (stage stats).")
        return
    man = read_json(run / "stats" / "stats.json") or {}
    doc.p(f"Co-activation statistics over {man.get('tokens', '?')} tokens. Pass-through: a "
          f"feature whose best Pearson partner in the next layer is at least 0.5.")
    doc.table(pd.DataFrame(st["pass_through"]), "{:.1f}")
    gates = read_json(run / "stats" / "gates.json") or []
    doc.p(f"Quasi-boolean gates: {st['gates']['AND']} AND, {st['gates']['OR']} OR. The "
          f"first ones:")
    if gates:
        g = pd.DataFrame(gates)
        show = pd.concat([g[g.gate == k].head(5) for k in ("AND", "OR")])
        doc.table(show[GATE_COLUMNS].fillna(""))
    if st.get("agreement"):
        doc.p("Agreement of data-free and data-driven residual predecessors per layer:")
        doc.table(pd.DataFrame(st["agreement"]), "{:.3f}")


def provenance_section(doc: Doc, state: dict) -> None:
    """How this was made: the stages with their times, the commands and the versions."""
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

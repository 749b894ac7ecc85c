"""The run report's sections on small hand-made runs (no pipeline run): what a missing part
says, the steering sections from their summaries, and validate's Markdown as tables."""
import json

import pandas as pd

from saeflow.pipeline.report import write_report
from saeflow.pipeline.report_doc import Doc

CMP = {"difference": 0.0123, "ci_low": -0.02, "ci_high": 0.05, "pairs": 12,
       "by_strength": {"2": {"difference": 0.01, "ci_low": -0.1, "ci_high": 0.2}}}


def _state(run):
    run.mkdir(exist_ok=True)
    (run / "pipeline.json").write_text(json.dumps({
        "config": {"model": "tiny", "pack": "p"}, "commands": ["saeflow run (test)"],
        "stages": {"report": {"status": "running"}}, "versions": {"saeflow": "0"}}))


def test_an_empty_run_says_what_is_missing(tmp_path):
    run = tmp_path / "r"
    _state(run)
    html_path, md_path = write_report(run)
    md = md_path.read_text()
    assert md.startswith("\n# saeflow report: r\n") and "Model tiny, pack p" in md
    for line in ("No eval, flow or validation in this run to measure.",
                 "No evaluation in this run (stage eval).", "No statistics in this run",
                 "No validation in this run", "No steering sweep in this run",
                 "Not run here (`saeflow steer-sweep RUN --paper`)."):
        assert line in md, line
    assert md.count("No flow in this run (stage flow).") == 2  # the flow's two sections
    assert "| stage | status | minutes | finished |" in md and "| report | this report |" in md
    html = html_path.read_text()
    assert html.startswith("<!doctype html>") and "<title>saeflow report: r</title>" in html


def test_the_steering_sections_from_their_summaries(tmp_path):
    run = tmp_path / "r"
    _state(run)
    (run / "sweep").mkdir()
    best = [{"theme": "cats", "mode": "single", "layer": 3, "strength": 4.0,
             "activation_score": 0.4, "ci_low": 0.3, "ci_high": 0.5}]
    (run / "sweep" / "summary.json").write_text(json.dumps({
        "config": {"themes": ["cats"], "modes": ["single"], "strengths": [4], "prompt": "I"},
        "classifier": {"held_out_accuracy": 0.9}, "best": best,
        "cumulative_vs_single_at_equal_strength": CMP}))
    pd.DataFrame([{"theme": "cats", "mode": m, "layer": L, "strength": s, "text": t}
                  for m, L, s, t in (("single", 3, 4.0, "meow"), ("default", 0, 0.0, "hi"))]
                 ).to_parquet(run / "sweep" / "sweep.parquet")
    (run / "sweep-paper").mkdir()
    (run / "sweep-paper" / "summary.json").write_text(json.dumps({"config": {
        "themes": ["cats"], "seeds_per_theme": 2, "strengths": [-1], "prompt": "I",
        "max_new_tokens": 5, "top_p": 0.9, "temperature": 1.0, "n": 2, "seeds": ["a"]}}))
    pd.DataFrame([{"mode": "single", "strength": -1.0, "deactivation_score": 0.3,
                   "other": 1}]).to_csv(run / "sweep-paper" / "curves.csv", index=False)
    md = write_report(run)[1].read_text()
    assert "held-out accuracy" in md and "| theme | mode | layer | strength |" in md
    assert "[cats, single, layer 3, strength 4]\n  steered: 'meow'\n  default: 'hi'" in md
    assert "Cumulative minus single-layer at the same layer and strength (paired texts, 12)" \
        in md
    assert "| mode | strength | deactivation_score |" in md and "other" not in md


def test_validate_markdown_becomes_tables_and_lines():
    doc = Doc()
    doc.md_tables("a line\n| method | rate |\n|---|---|\n| top1 | 0.5 |\n\nafter")
    assert doc.md == ["a line\n", "| method | rate |\n|---|---|\n| top1 | 0.5 |\n", "after\n"]
    assert doc.html[1] == ("<table><tr><th>method</th><th>rate</th></tr><tr><td>top1</td>"
                           "<td>0.5</td></tr></table>")

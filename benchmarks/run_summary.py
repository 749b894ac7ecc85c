"""A RUN folder in a few lines: its stage times, the corpus passes' tok/s and the scorecard.

    python benchmarks/run_summary.py RUN

What benchmarks/gpu_check.sh prints after `saeflow run` (and docs/benchmarks.md quotes): the
stages of RUN/pipeline.json with their seconds, eval's clean CE and median resid_post ΔCE, the
index and statistics passes (tokens / the pass's own seconds), and the headline measures of
`saeflow.pipeline.scorecard.measure_run` (dead latents, s_res share, deactivation).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(run: Path) -> list[str]:
    lines = []
    st = _read(run / "pipeline.json")
    if st and "stages" in st:
        lines.append("  stages: " + ", ".join(
            f"{k} {v.get('status')} {v.get('seconds', 0):.0f}s" for k, v in st["stages"].items()))
    else:
        lines.append("  no pipeline.json")
    ev = _read(run / "eval.json")
    if ev and ev.get("saes"):
        res = sorted(r["delta_ce"] for r in ev["saes"]
                     if r.get("position") == "resid_post" and r.get("delta_ce") is not None)
        med = f"{res[len(res) // 2]:.3f}" if res else "n/a"
        lines.append(f"  eval: clean CE {ev.get('clean_ce', float('nan')):.4f} on "
                     f"{ev.get('ce_tokens')} tokens; resid_post dCE median {med}")
    for name, rel in (("index", "index/index.json"), ("stats", "stats/stats.json")):
        m = _read(run / rel)
        if not m:
            lines.append(f"  no {name} manifest")
            continue
        sec = m.get("seconds") or 0
        rate = (f", {m['tokens'] / sec:,.0f} tok/s over its pass's {sec} s (the pass it shares "
                f"with eval, when fused)" if sec else "")
        lines.append(f"  {name}: {m.get('tokens')} tokens{rate}")
    from saeflow.pipeline.scorecard import measure_run

    card = measure_run(run)
    keys = ("dead_max/resid_post", "dead_max/mlp_out", "dead_max/attn_out",
            "delta_ce_median/resid_post", "s_res_share_median_4_13", "deactivation/top1_cosine",
            "deactivation/exhaustive", "deactivation/control_matched")
    got = [f"{k} {card[k]:.3f}" for k in keys if isinstance(card.get(k), (int, float))]
    if got:
        lines.append("  scorecard: " + ", ".join(got))
    return lines


if __name__ == "__main__":
    print("\n".join(summary(Path(sys.argv[1]))))

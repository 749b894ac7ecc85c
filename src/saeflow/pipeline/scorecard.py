"""The run's headline measures of the SAE family, next to the v0.1 default pack and the paper.

What a user needs to judge whether the pack is good enough for the science to show: dead
latents, the spliced loss, how many residual features have a residual predecessor, and how
often switching the top-1 cosine predecessor off switches the target off. The v0.1 figures are
measurements of the old default pack (saeflow 0.1), kept in scorecard_v01.json with how
they were made; the paper's are Laptev et al. 2025 (Gemma 2 2B with Gemma Scope).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

BASELINE_FILE = Path(__file__).with_name("scorecard_v01.json")
S_RES_LAYERS = range(4, 14)  # layers whose median share is the headline


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def measure_run(run: str | Path) -> dict:
    """{measure: value or None} from RUN/eval.json, RUN/predecessors.parquet and
    RUN/validate/summary.json (whatever of them the run has)."""
    run = Path(run)
    out: dict = {}
    ev = _json(run / "eval.json")
    if ev:
        rows = pd.DataFrame(ev["saes"])
        for pos, grp in rows.groupby("position"):
            out[f"dead_max/{pos}"] = float(grp.dead_fraction.max())
            out[f"dead_median/{pos}"] = float(grp.dead_fraction.median())
        res = rows[rows.position == "resid_post"]
        if len(res) and "delta_ce" in res:
            out["delta_ce_median/resid_post"] = float(res.delta_ce.median())
        out["dead_tokens"] = ev.get("dead_tokens", ev.get("tokens"))
        out["ce_tokens"] = ev.get("ce_tokens")
    pred = run / "predecessors.parquet"
    if pred.is_file():
        d = pd.read_parquet(pred, columns=["layer", "s_res", "live"])
        d = d[d.live & d.s_res.notna()]
        share = {int(L): float((g.s_res >= 0.5).mean()) for L, g in d.groupby("layer")}
        mid = [share[L] for L in S_RES_LAYERS if L in share]
        if mid:
            out["s_res_share_median_4_13"] = statistics.median(mid)
        out["s_res_share_by_layer"] = share
    thr = _json(run / "thresholds.json") or {}
    for view in ("raw", "no_massive", "null"):
        per = [v[view] for L, v in (thr.get("s_res_share") or {}).items()
               if int(L) in S_RES_LAYERS and view in v]
        if per:
            out[f"s_res_share_median_4_13/{view}"] = statistics.median(per)
    out["flow_geometry"] = thr.get("geometry")
    va = _json(run / "validate" / "summary.json")
    if va:
        for m in ("top1_cosine", "predecessor_group", "top1_pearson", "exhaustive",
                  "exhaustive_control", "control_matched"):
            r = (va.get("methods") or {}).get(m)
            if r:
                out[f"deactivation/{m}"] = float(r["success_rate"])
                out[f"deactivation/{m}/ci95"] = r.get("success_ci95")
                if "threshold_success_rate" in r:
                    out[f"deactivation/{m}/threshold"] = float(r["threshold_success_rate"])
        h = va.get("top1_ranks_0_15")
        if h:
            out["deactivation/top1_cosine/ranks_0_15"] = float(h["success_rate"])
        out["deactivation/cases"] = va.get("cases")
    return out


@dataclass(frozen=True)
class Headline:
    """One headline measure: its key in measure_run, what it is, the floor and goal set for the
    trained family, and the paper's figure (None where there is none)."""
    key: str
    what: str
    floor: float | None = None
    goal: float | None = None
    paper: float | None = None


ROWS = [
    Headline("dead_max/resid_post", "dead latents, resid_post SAEs (max)", floor=0.10, goal=0.03),
    Headline("dead_max/mlp_out", "dead latents, mlp_out SAEs (max)", floor=0.10, goal=0.03),
    Headline("dead_max/attn_out", "dead latents, attn_out SAEs (max)", floor=0.10, goal=0.03),
    Headline("delta_ce_median/resid_post", "resid_post ΔCE, median over layers (nats)",
             floor=0.5, goal=0.2),
    Headline("s_res_share_median_4_13", "share of live resid features with s_res >= 0.5, "
             "median of layers 4-13 (the flow's geometry)", floor=0.10, goal=0.30),
    Headline("s_res_share_median_4_13/no_massive",
             "  the same, massive residual dimensions left out"),
    Headline("s_res_share_median_4_13/raw", "  the same, every dimension"),
    Headline("s_res_share_median_4_13/null", "  the same, null directions (chance)"),
    Headline("deactivation/top1_cosine", "deactivation success, top-1 cosine", floor=0.20,
             goal=0.50, paper=0.65),
    Headline("deactivation/top1_cosine/ranks_0_15",
             "  the same, targets of activation rank 0-15", paper=0.65),
    Headline("deactivation/top1_cosine/threshold",
             "  the same, threshold rule (pre-activation < θ)", paper=0.65),
    Headline("deactivation/control_matched",
             "  its null: an unrelated feature of the same norm"),
    Headline("deactivation/predecessor_group", "deactivation success, the top-1 predecessor of "
             "each kind together"),
    Headline("deactivation/top1_pearson", "deactivation success, top-1 Pearson", paper=0.65),
    Headline("deactivation/exhaustive", "deactivation success, exhaustive", paper=0.73),
    Headline("deactivation/exhaustive_control",
             "  its null: inactive features at the same norms"),
]
LOWER_IS_BETTER = ("dead_max", "delta_ce")


def scorecard(run: str | Path) -> pd.DataFrame:
    """One row per headline measure: this run, the v0.1 default pack, the floor and goal, the
    paper, and whether this run meets the floor."""
    now = measure_run(run)
    base = (_json(BASELINE_FILE) or {}).get("measures", {})
    rows = []
    for row in ROWS:
        v = now.get(row.key)
        lower = row.key.startswith(LOWER_IS_BETTER)
        floor = row.floor
        meets = None if v is None or floor is None else (v <= floor if lower else v >= floor)
        rows.append({"measure": row.what, "this run": v, "v0.1 pack": base.get(row.key),
                     "floor": floor, "goal": row.goal, "paper": row.paper,
                     "meets floor": "-" if meets is None else ("yes" if meets else "no")})
    return pd.DataFrame(rows)


def baseline_note() -> str:
    b = _json(BASELINE_FILE) or {}
    return b.get("how", "")

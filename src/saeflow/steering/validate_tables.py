"""The deactivation experiment's tables: the threshold rule's columns, the summary with 95%
CIs clustered by text (per method, layer, rank bin, similarity bin and group; each method
minus its null) and the markdown tables of the CLI and the report. The intervals themselves are
saeflow.intervals'."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from saeflow.intervals import ci95, wilson_ci
from saeflow.steering.validate_config import (
    HEADLINE_METHODS,
    HEADLINE_RANKS,
    METHODS,
    PAIRS,
    PAPER_TABLE1,
    RULES,
    SIMILARITY_BINS,
    ValidateConfig,
    bin_start,
    rank_bin,
)


# --- the threshold rule --------------------------------------------------------------------------
@dataclass
class KthSum:
    """The k-th largest pre-activation of an R_L summed over clean content tokens, and how many."""
    total: float = 0.0
    count: int = 0


def thresholds(saes, layers, kth: dict[int, KthSum]) -> dict[int, tuple[str, Any]]:
    """{layer: (source, θ)}: the SAE's threshold tensor [d_sae] (sae_threshold); else the mean
    k-th largest pre-activation over the clean content tokens (mean_kth_preactivation, a
    scalar); else 0 (relu_zero: a ReLU SAE's own rule)."""
    out: dict[int, tuple[str, Any]] = {}
    for L in layers:
        sae = saes[("resid_post", L)]
        if sae.threshold is not None:
            out[L] = ("sae_threshold", sae.threshold.float().cpu().numpy())
        elif sae.k and kth.get(L, KthSum()).count > 0:
            out[L] = ("mean_kth_preactivation", float(kth[L].total / kth[L].count))
        else:
            out[L] = ("relu_zero", 0.0)
    return out


def apply_threshold_rule(cases: pd.DataFrame, thetas: dict) -> pd.DataFrame:
    """Add theta, deactivated_threshold (pre_new < θ; False where the method removed nothing)
    and below_threshold_clean (pre_old < θ: below θ before any edit) to the cases."""
    cases = cases.copy()
    theta = np.full(len(cases), np.nan)
    layer = cases.layer.to_numpy()
    feat = cases.feature.to_numpy()
    for L, (_, th) in thetas.items():
        sel = layer == L
        theta[sel] = th[feat[sel]] if isinstance(th, np.ndarray) else th
    cases["theta"] = theta
    cases["deactivated_threshold"] = (~cases.removed_nothing.to_numpy(bool)) & \
        (cases.pre_new.to_numpy(float) < theta)
    cases["below_threshold_clean"] = cases.pre_old.to_numpy(float) < theta
    return cases


def threshold_summary(thetas: dict, cases: pd.DataFrame) -> dict:
    r4 = _r4
    layers = {}
    for L, (source, th) in thetas.items():
        if isinstance(th, np.ndarray):
            layers[str(L)] = {"source": source, "per_feature": True, "mean": r4(th.mean()),
                              "min": r4(th.min()), "max": r4(th.max()), "d_sae": int(th.size)}
        else:
            layers[str(L)] = {"source": source, "per_feature": False, "value": r4(th)}
    one = cases.drop_duplicates(["text", "token", "layer", "feature"])
    return {"rule": "deactivated_threshold = pre_new < theta", "layers": layers,
            "clean_below": {"cases": int(one.below_threshold_clean.sum()),
                            "share": r4(one.below_threshold_clean.mean())}}


# --- summaries with confidence intervals ---------------------------------------------------------
def _r4(x) -> float:
    return round(float(x), 4)


def _rate_ci(lo: float, hi: float) -> list[float]:
    return [_r4(max(lo, 0.0)) if np.isfinite(lo) else float("nan"),
            _r4(min(hi, 1.0)) if np.isfinite(hi) else float("nan")]


def _agg(df: pd.DataFrame, how: str = "t") -> dict:
    """Cases, success rate under both rules and mean activation change, each with a 95% CI
    clustered by text (and the plain Wilson interval of the rank rule's rate, which treats
    targets as independent); how many cases the method removed nothing on."""
    ok = df.deactivated.to_numpy(bool)
    change = df.change.clip(upper=1.0).to_numpy(float)
    texts = df.text.to_numpy()
    lo, hi = ci95(ok.astype(float), texts, how)
    clo, chi = ci95(change, texts, how)
    wlo, whi = wilson_ci(int(ok.sum()), len(ok))
    out = {"cases": int(len(df)), "success_rate": _r4(ok.mean()),
           "success_ci95": _rate_ci(lo, hi),
           "success_ci95_wilson": [_r4(wlo), _r4(whi)],
           "mean_activation_change": _r4(change.mean()),
           "change_ci95": [_r4(clo), _r4(chi)]}
    if "removed_nothing" in df:
        out["removed_nothing"] = int(df.removed_nothing.sum())
    if "deactivated_threshold" in df:
        okt = df.deactivated_threshold.to_numpy(bool)
        tlo, thi = ci95(okt.astype(float), texts, how)
        out["threshold_success_rate"] = _r4(okt.mean())
        out["threshold_ci95"] = _rate_ci(tlo, thi)
    return out


def _similarity_bins(sim: pd.Series):
    cut = pd.cut(sim.clip(lower=0.0), SIMILARITY_BINS, right=False)
    return cut, lambda iv: f"[{iv.left:.1f}, {min(iv.right, 1.0):.1f})"


def _rank_bins(df: pd.DataFrame) -> pd.Series:
    if "rank_bin" in df:
        return df.rank_bin
    return df.target_rank.map(lambda r: rank_bin(int(r)))


def _by_bin(df: pd.DataFrame, bins: pd.Series, how: str) -> dict:
    groups = {b: g for b, g in df.groupby(bins)}
    return {b: _agg(groups[b], how) for b in sorted(groups, key=bin_start)}


def summarize(cases: pd.DataFrame, interval: str = "t") -> dict:
    """Per method (one denominator: the cases): success rates under the rank and the threshold
    rules and the mean activation change, overall and per layer, per target activation rank bin
    and per similarity of the removed feature; top-1 cosine on ranks 0-15, per empirical group
    and per top-1 similarity; the paired differences of each method and its null."""
    how = interval
    key = ["text", "token", "layer", "feature"]
    n_cases = int(cases.drop_duplicates(key).shape[0])
    out: dict[str, Any] = {
        "cases": n_cases,
        "case_rule": "targets with at least one active top-1 predecessor (R_{L-1}, M_L or "
                     "A_L); every method is rated over all of them",
        "rules": {"rank": "deactivated: z_new == 0 (the target left the SAE's selection)",
                  "threshold": "deactivated_threshold: pre_new < theta"},
        "intervals": {"how": how, "level": 0.95, "clustered_by": "text",
                      "df": int(cases.text.nunique()) - 1},
        "methods": {}, "by_layer": {}, "by_group_top1": {}, "by_target_rank": {},
        "by_similarity": {}}
    for m in METHODS:
        sel = cases[cases.method == m]
        if not len(sel):
            continue
        out["methods"][m] = _agg(sel, how)
        out["by_layer"][m] = {str(L): _agg(g, how) for L, g in sel.groupby("layer")}
        if "target_rank" in sel:
            out["by_target_rank"][m] = _by_bin(sel, _rank_bins(sel), how)
        if "removed_similarity" in sel:
            ran = sel[sel.removed_similarity.notna()]
            cut, label = _similarity_bins(ran.removed_similarity)
            out["by_similarity"][m] = {label(iv): _agg(d, how)
                                       for iv, d in ran.groupby(cut, observed=True)}
    top1 = cases[cases.method == "top1_cosine"]
    out["top1_ranks_0_15"] = (_agg(top1[top1.target_rank < HEADLINE_RANKS], how)
                              if (top1.target_rank < HEADLINE_RANKS).any() else {})
    out["by_group_top1"] = {g: _agg(d, how) for g, d in top1.groupby("group")}
    # How much the answer depends on how alike the predecessor is (the cosine of the top-1).
    cut, label = _similarity_bins(top1.top1_similarity)
    out["by_similarity_top1"] = {label(iv): _agg(d, how)
                                 for iv, d in top1.groupby(cut, observed=True)}
    out["paired"] = paired_differences(cases, how)
    out["paired_top1"] = paired(cases, how=how)
    return out


def paired_differences(cases: pd.DataFrame, how: str = "t") -> dict:
    """For each (method, its null) of PAIRS, on the same cases: the mean difference of the
    rank rule's success, the threshold rule's success and the activation change, each with a
    95% CI clustered by text."""
    key = ["text", "token", "layer", "feature"]
    out = {}
    cols = [c for c in ("deactivated", "deactivated_threshold", "change") if c in cases]
    for a, b in PAIRS:
        A = cases[cases.method == a][key + cols]
        B = cases[cases.method == b][key + cols]
        both = A.merge(B, on=key, how="inner", suffixes=("_a", "_b"))
        if both.empty:
            continue
        texts = both.text.to_numpy()
        entry: dict[str, Any] = {"cases": int(len(both))}
        for col, name in (("deactivated", "rank"), ("deactivated_threshold", "threshold"),
                          ("change", "change")):
            if col not in cols:
                continue
            ca, cb = both[f"{col}_a"].astype(float), both[f"{col}_b"].astype(float)
            if col == "change":
                ca, cb = ca.clip(upper=1.0), cb.clip(upper=1.0)
            d = (ca - cb).to_numpy()
            lo, hi = ci95(d, texts, how)
            entry[name] = {"difference": _r4(d.mean()), "ci95": [_r4(lo), _r4(hi)]}
        out[f"{a} - {b}"] = entry
    return out


def paired(cases: pd.DataFrame, base: str = "top1_cosine", how: str = "t") -> dict:
    """On the targets where `base` ran: every method's success there, and base minus the
    matched control (the predecessor effect beyond what removing any feature of that size
    does), with a 95% CI clustered by text."""
    key = ["text", "token", "layer", "feature"]
    piv = cases.pivot_table(index=key, columns="method", values="deactivated", aggfunc="first")
    if base not in piv:
        return {}
    piv = piv[piv[base].notna()]
    out = {"cases": int(len(piv)),
           "success_rate": {m: round(float(piv[m].dropna().astype(float).mean()), 4)
                            for m in METHODS if m in piv and piv[m].notna().any()}}
    if "control_matched" in piv:
        both = piv[piv.control_matched.notna()]
        d = both[base].astype(float).to_numpy() - both.control_matched.astype(float).to_numpy()
        lo, hi = ci95(d, both.index.get_level_values("text").to_numpy(), how)
        out["minus_control"] = {"cases": int(len(d)),
                                "difference": round(float(d.mean()), 4) if len(d) else None,
                                "ci95": [round(lo, 4), round(hi, 4)]}
    return out


def _headline_halfwidths(rows: list[dict], how: str = "t") -> dict[str, float]:
    if not rows:
        return {}
    df = pd.DataFrame(rows)
    out = {}
    for m in HEADLINE_METHODS:
        sel = df[df.method == m]
        if len(sel) < 2:
            out[m] = float("inf")
            continue
        lo, hi = ci95(sel.deactivated.to_numpy(float), sel.text.to_numpy(), how)
        out[m] = (hi - lo) / 2 if np.isfinite(hi - lo) else float("inf")
    return out


def precise_enough(rows: list[dict], cfg: ValidateConfig) -> bool:
    """Stop adding texts once every headline rate's 95% CI half-width is <= cfg.ci_halfwidth."""
    if cfg.ci_halfwidth is None:
        return True
    hw = _headline_halfwidths(rows, cfg.interval)
    return bool(hw) and all(v <= cfg.ci_halfwidth for v in hw.values())


def ci_status(summary: dict, cfg: ValidateConfig) -> dict:
    hw = {m: round((r["success_ci95"][1] - r["success_ci95"][0]) / 2, 4)
          for m, r in summary["methods"].items() if m in HEADLINE_METHODS}
    return {"halfwidth_asked": cfg.ci_halfwidth, "halfwidths": hw,
            "met": (None if cfg.ci_halfwidth is None else
                    all(v <= cfg.ci_halfwidth for v in hw.values()))}


# --- markdown --------------------------------------------------------------------------------------
def _fmt_ci(r: dict, key: str = "success_ci95") -> str:
    ci = r.get(key)
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "-"


def _rate(r: dict | None, rule: str = "rank", cases: bool = True) -> str:
    """'35% [27, 45] (227)' for one aggregate under a rule."""
    if not r:
        return "-"
    rate, ci = (("success_rate", "success_ci95") if rule == "rank" else
                ("threshold_success_rate", "threshold_ci95"))
    if rate not in r:
        return "-"
    n = f" ({r['cases']})" if cases else ""
    return f"{100 * r[rate]:.0f}% {_fmt_ci(r, ci)}{n}"


def _header(summary: dict) -> str:
    iv = summary.get("intervals", {})
    how = {"t": f"Student t, {iv.get('df', '?')} df", "bootstrap": "bootstrap over texts"}.get(
        iv.get("how", "t"), "t")
    return (f"{summary.get('cases', '?')} cases (targets with an active top-1 predecessor; every "
            f"method over all of them) on {summary.get('n_texts', summary.get('texts', '?'))} "
            f"{summary.get('split', '')} texts; 95% CIs clustered by text ({how}).")


def table_markdown(summary: dict) -> str:
    """The method table next to the paper's Table 1: success under the rank rule (the target
    left the selection) and the threshold rule (pre-activation below θ), the mean activation
    change, how many cases a method removed nothing on; the case count once, above."""
    lines = [_header(summary), "",
             "| method | success (rank rule) | 95% CI | success (threshold rule) | 95% CI | "
             "mean activation change [95% CI] | removed nothing | paper (change, success) |",
             "|---|---|---|---|---|---|---|---|"]
    for m, r in summary["methods"].items():
        paper = PAPER_TABLE1.get(m)
        p = f"{paper[0]:.2f}, {100 * paper[1]:.0f}%" if paper else "-"
        thr = (f"{100 * r['threshold_success_rate']:.1f}% | {_fmt_ci(r, 'threshold_ci95')}"
               if "threshold_success_rate" in r else "- | -")
        ch = r.get("change_ci95")
        chs = f" [{ch[0]:.3f}, {ch[1]:.3f}]" if ch else ""
        lines.append(f"| {m} | {100 * r['success_rate']:.1f}% | {_fmt_ci(r)} | {thr} | "
                     f"{r['mean_activation_change']:.3f}{chs} | {r.get('removed_nothing', '-')} "
                     f"| {p} |")
    h = summary.get("top1_ranks_0_15")
    if h:
        lines += ["", f"top1_cosine on targets of rank 0-15 ({h['cases']} cases): rank rule "
                      f"{_rate(h, cases=False)}, threshold rule "
                      f"{_rate(h, 'threshold', cases=False)}."]
    th = summary.get("threshold", {}).get("layers")
    if th:
        parts = []
        for L, t in th.items():
            v = (f"per-feature threshold (mean {t['mean']:.3g}, {t['min']:.3g} to {t['max']:.3g})"
                 if t.get("per_feature") else f"{t['value']:.4g}")
            parts.append(f"layer {L}: {t['source']} {v}")
        cb = summary["threshold"].get("clean_below", {})
        lines += ["", "θ of the threshold rule: " + "; ".join(parts) +
                  (f"; {cb['cases']} cases ({100 * cb['share']:.1f}%) were below θ before any "
                   f"edit" if cb else "") + "."]
    return "\n".join(lines)


def breakdown_markdown(summary: dict, key: str, methods=HEADLINE_METHODS,
                       title: str = "bin", rule: str = "rank") -> str:
    """A per-bin table (key: by_target_rank, by_similarity, by_layer) of the headline methods
    under one rule (rank or threshold): success % [95% CI] (cases)."""
    table = summary.get(key, {})
    methods = [m for m in methods if m in table]
    bins = sorted({b for m in methods for b in table[m]}, key=bin_start)
    lines = [f"| {title} | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for b in bins:
        lines.append(f"| {b} | " + " | ".join(_rate(table[m].get(b), rule) for m in methods)
                     + " |")
    return "\n".join(lines)


def rank_rule_markdown(summary: dict, methods=HEADLINE_METHODS) -> str:
    """Success by the target's activation rank bin (0 = the most active at the token) under
    both rules, for the headline methods: % [95% CI]; the bin's case count in the last column;
    then the headline top1_cosine on ranks 0-15."""
    table = summary.get("by_target_rank", {})
    methods = [m for m in methods if m in table]
    bins = sorted({b for m in methods for b in table[m]}, key=bin_start)
    lines = ["| rank | rule | " + " | ".join(methods) + " | cases |",
             "|---|---|" + "---|" * len(methods) + "---|"]
    for b in bins:
        n = next((table[m][b]["cases"] for m in methods if b in table[m]), "-")
        for rule in RULES:
            lines.append(f"| {b} | {rule} | " +
                         " | ".join(_rate(table[m].get(b), rule, cases=False) for m in methods)
                         + f" | {n} |")
    h = summary.get("top1_ranks_0_15")
    if h:
        lines += ["", f"top1_cosine, ranks 0-15 ({h['cases']} cases): "
                      f"{_rate(h, 'rank', cases=False)} (rank rule), "
                      f"{_rate(h, 'threshold', cases=False)} (threshold rule); the paper: 65%."]
    return "\n".join(lines)


def paired_markdown(summary: dict) -> str:
    """Each method minus its null on the same cases: differences in points [95% CI]."""
    lines = ["| method - null | cases | rank rule | threshold rule | activation change |",
             "|---|---|---|---|---|"]
    for name, e in summary.get("paired", {}).items():
        cells = []
        for k, scale in (("rank", 100), ("threshold", 100), ("change", 1)):
            r = e.get(k)
            if not r:
                cells.append("-")
                continue
            fmt = "{:+.1f}" if scale == 100 else "{:+.3f}"
            cells.append(f"{fmt.format(scale * r['difference'])} "
                         f"[{fmt.format(scale * r['ci95'][0])}, {fmt.format(scale * r['ci95'][1])}]")
        lines.append(f"| {name} | {e['cases']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

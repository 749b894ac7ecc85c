"""When a match counts as "high": the class thresholds per layer and predecessor origin (the
null's quantile, the paper's t_res, or the user's), the geometry the matching compares in, and
thresholds.json, which records both."""
from __future__ import annotations

import numpy as np

from saeflow.errors import FlowError
from saeflow.flow.config import FlowConfig
from saeflow.flow.inputs import LayerSlots
from saeflow.ids import PRED_ORIGINS

NULL_QUANTILES = (0.5, 0.9, 0.99, 0.999)  # the null quantiles thresholds.json records


def default_thresholds(nulls: dict[int, dict[str, np.ndarray]], q: float) -> dict:
    """Per layer and origin: the q-quantile of the null top-1 similarity ("far above chance")."""
    return {L: {origin: float(np.quantile(v, q)) for origin, v in per.items()}
            for L, per in nulls.items()}


def flow_defaults(nulls: dict[int, dict[str, np.ndarray]], cfg: FlowConfig, t_res: float
                  ) -> dict[int, dict[str, tuple[float, str]]]:
    """{layer: {origin: (threshold, where it came from)}} before the user's values: t_res for
    the residual predecessor, the null's quantile for the MLP and attention ones."""
    return {L: {origin: ((t_res, f"t_res={t_res} (the paper's residual threshold)")
                         if origin == "res" else (v, f"null {cfg.null} q={cfg.null_quantile}"))
                for origin, v in per.items()}
            for L, per in default_thresholds(nulls, cfg.null_quantile).items()}


def resolve_thresholds(defaults: dict, overrides: dict | None) -> dict:
    """Apply user thresholds: {"res": t, ...} globally and/or {"layers": {L: {"res": t}}}.

    Returns {L: {origin: {"value": t, "source": "null q=..." | "user"}}}.
    """
    overrides = overrides or {}
    unknown = set(overrides) - set(PRED_ORIGINS) - {"layers"}
    if unknown:
        raise FlowError(f"unknown threshold keys {sorted(unknown)}; use res, mlp, attn or layers")
    per_layer = {int(L): v for L, v in (overrides.get("layers") or {}).items()}
    bad_layers = sorted(set(per_layer) - set(defaults))
    if bad_layers:
        raise FlowError(f"thresholds given for layers {bad_layers}, which this flow does not have")
    out: dict[int, dict] = {}
    for L, origins in defaults.items():
        out[L] = {}
        for origin, (value, source) in origins.items():
            for scope in (per_layer.get(L, {}), overrides):
                if origin in scope and scope[origin] is not None:
                    t = float(scope[origin])
                    if not -1.0 <= t <= 1.0:
                        raise FlowError(f"threshold {origin}={t} must be a similarity in [-1, 1]")
                    value, source = t, "user"
                    break
            out[L][origin] = {"value": value, "source": source}
    return out


def resolve_geometry(chosen: list[LayerSlots], asked: str, liveness
                     ) -> tuple[str, dict[int, list[int]]]:
    """("no_massive" | "raw", {layer: massive residual dims}) for the flow's matching.

    A layer's massive set is the union over its residual-stream SAEs (R_L and R_{L-1}) of the
    dimensions that eval's rule names on their inputs (the firing pass's variances); every pair
    of the layer (M_L and A_L too) is compared without them, so both sides share one space."""
    known: dict[int, list[int]] = {}
    for entry in chosen:
        dims: set[int] = set()
        seen = False
        for slot in (entry.resid, entry.preds.get("res")):
            if slot is None or slot.position not in ("resid_post", "resid_pre") \
                    or liveness is None:
                continue
            m = liveness.massive(slot)
            if m is not None:
                seen = True
                dims |= set(m)
        if seen:
            known[entry.layer] = sorted(dims)
    have_all = bool(chosen) and len(known) == len(chosen)
    if asked == "no_massive" and not have_all:
        raise FlowError("geometry 'no_massive' needs each input's variance per dimension, which "
                        "a firing pass measures: pass --model (or use --geometry raw)")
    geometry = "no_massive" if asked == "no_massive" or (asked == "auto" and have_all) else "raw"
    return geometry, known


def s_res_shares(chosen: list[LayerSlots], results: dict, resolved: dict, live: dict | None,
                 geometry: str) -> dict[int, dict]:
    """Per layer: the share of live residual features whose top-1 residual predecessor reaches
    the residual threshold, in the flow's geometry, in the other one (when measured), and for
    the null directions (what chance alone gives)."""
    other = "raw" if geometry == "no_massive" else "no_massive"
    out: dict[int, dict] = {}
    for entry in chosen:
        r = results[entry.layer]
        if "res_row_v" not in r:
            continue
        t = resolved[entry.layer]["res"]["value"]
        mask = (live or {}).get(entry.resid)
        keep = np.ones(int(r["n_resid"]), bool) if mask is None else np.asarray(mask, bool)

        def share(v) -> float:
            with np.errstate(invalid="ignore"):
                return round(float((v[keep, 0] >= t).mean()), 4) if keep.any() else float("nan")

        row = {geometry: share(r["res_row_v"]),
               "null": round(float((r["res_null"] >= t).mean()), 4)}
        if "res_alt_row_v" in r:
            row[other] = share(r["res_alt_row_v"])
        out[entry.layer] = row
    return out


def thresholds_doc(cfg: FlowConfig, *, t_res: float, geometry: str, massive: dict,
                   shares: dict, resolved: dict, nulls: dict) -> dict:
    """thresholds.json: how "high" was decided, each layer's values, the nulls' quantiles and
    the s_res share in both geometries and under the null."""
    return {"method": (f"The residual predecessor is 'high' at s_res >= t_res = {t_res}. An "
                          f"MLP or attention predecessor is 'high' when its similarity is at or "
                          f"above the {cfg.null_quantile} quantile of the top-1 similarities "
                          f"that {cfg.null_samples} '{cfg.null}' null directions reach against "
                          f"the same predecessor SAE (see docs/method.md); user values replace "
                          f"either. Geometry: {geometry}."),
               "null": cfg.null, "null_quantile": cfg.null_quantile, "geometry": geometry,
               "t_res": t_res,
               "massive_dims": {str(L): v for L, v in massive.items()},
               "s_res_share": {str(L): v for L, v in shares.items()},
               "layers": {str(L): v for L, v in resolved.items()},
               "null_quantiles": {str(L): {origin: {q: float(np.quantile(v, q))
                                                    for q in NULL_QUANTILES}
                                           for origin, v in per.items()}
                                  for L, per in nulls.items()}}

"""Issue 25: which null model and which geometry give the flow's classes a meaning?

For every layer and predecessor kind (RES = R_{L-1}, MLP = M_L, ATT = A_L) of a pack, in both
geometries (all residual dimensions, and the layer's massive dimensions left out), this takes
each live residual feature's top-1 data-free predecessor and asks the data whether the pair is
real: on held-out tokens, how often the predecessor fires when the target fires (co-firing,
pooled over pairs: sum of both-on / sum of target-on), next to a random live partner from the
same SAE. Then, for each candidate null (shuffle, columns, rotation, gaussian), the q=0.99
threshold per layer and kind, the classes it gives (t_res = 0.5 for the residual), and the
co-firing of the pairs it calls "high" against those it calls "low".

    .venv/bin/python benchmarks/experiments/flow_nulls.py [--tokens 8192] [--out FILE.json]

Uses the embedded model and pack (both cached after `make demo` / `saeflow run`).
"""
import argparse
import json
import time

import numpy as np
import torch

NULLS = ("shuffle", "columns", "rotation", "gaussian")
KINDS = ("res", "mlp", "attn")
SIM_BINS = [-1.0, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.01]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--null-samples", type=int, default=2048)
    ap.add_argument("--out", default="flow_nulls.json")
    a = ap.parse_args()
    from saeflow.features.liveness import firing_pass
    from saeflow.flow.inputs import layer_slots as plan_layers
    from saeflow.flow.inputs import slot_directions
    from saeflow.flow.match import null_top1, top_k_pairs
    from saeflow.flow.tables import classify
    from saeflow.flow.thresholds import resolve_geometry
    from saeflow.lm.corpora import DEFAULT_SPEC, Corpus
    from saeflow.lm.hooks import HookPoint, capture
    from saeflow.lm.model import load_model
    from saeflow.saes.recipes import ensure_embedded_pack

    t0 = time.time()
    model = load_model("embedded", progress=False)
    pack = ensure_embedded_pack("default", model=model, progress=False)
    live = firing_pass(pack, model, 16_384, DEFAULT_SPEC)
    plans = [p for p in plan_layers(pack) if p.preds["res"] is not None]
    _, massive = resolve_geometry(plans, "auto", live)
    geoms = {"raw": {p.layer: None for p in plans},
             "no_massive": {p.layer: massive.get(p.layer) or None for p in plans}}

    # --- data-free: top-1 predecessors and the nulls, per geometry ---------------------------
    pairs = {}  # (geom, L, kind) -> (target idx [n_live], pred idx [n_live], sim [n_live])
    nulls = {}  # (geom, L, kind, null) -> [n_null] top-1 similarities
    for g, drop_of in geoms.items():
        for p in plans:
            drop = drop_of[p.layer]
            mask_a = live.live(p.resid)
            ia = np.flatnonzero(mask_a)
            A = slot_directions(pack, p.resid, drop_dims=drop).unit_block(0, len(mask_a))[ia]
            for kind, slot in p.preds.items():
                mask_b = live.live(slot)
                ib = np.flatnonzero(mask_b)
                B = slot_directions(pack, slot, drop_dims=drop).unit_block(0, len(mask_b))[ib]
                m = top_k_pairs(A, B, k=1)
                pairs[(g, p.layer, kind)] = (ia, ib[m.row_indices[:, 0].numpy()],
                                             m.row_values[:, 0].numpy())
                for nk in NULLS:
                    nulls[(g, p.layer, kind, nk)] = null_top1(A, B, n=a.null_samples, null=nk,
                                                              seed=p.layer)
        print(f"matched and nulls ({g}): {time.time() - t0:.0f} s", flush=True)

    # --- data: co-firing of every pair on held-out tokens ------------------------------------
    slots = sorted(pack.entries)
    saes = {s: pack.sae(*s) for s in slots}
    points = {s: HookPoint(*s) for s in slots}
    on_t = {k: np.zeros(len(v[0])) for k, v in pairs.items()}
    both = {k: np.zeros(len(v[0])) for k, v in pairs.items()}
    rng = np.random.default_rng(0)
    rand_partner = {k: rng.choice(np.flatnonzero(live.live(_pred_slot(plans, k))), len(v[0]))
                    for k, v in pairs.items()}
    both_rand = {k: np.zeros(len(v[0])) for k, v in pairs.items()}
    seen = 0
    for b in Corpus.from_spec(DEFAULT_SPEC, seed=7).token_batches(
            model.tokenizer, 8, 128, max_tokens=a.tokens, split="heldout"):
        acts = capture(model, b.input_ids, list(points.values()), attention_mask=b.attention_mask)
        content = b.content_mask()
        with torch.inference_mode():
            on = {s: (saes[s].encode(acts[pt])[content] > 0) for s, pt in points.items()}
        for k, (ia, ip, _) in pairs.items():
            g, L, kind = k
            tgt = on[("resid_post", L)][:, ia]  # [T, n_live]
            src = on[_pred_slot(plans, k)]
            on_t[k] += tgt.sum(0).numpy()
            both[k] += (tgt & src[:, ip]).sum(0).numpy()
            both_rand[k] += (tgt & src[:, rand_partner[k]]).sum(0).numpy()
        seen += int(content.sum())
    print(f"co-firing over {seen} held-out tokens: {time.time() - t0:.0f} s", flush=True)

    def rate(k, sel):
        n = on_t[k][sel].sum()
        return float(both[k][sel].sum() / n) if n else float("nan")

    report = {"tokens": seen, "massive": {str(L): v for L, v in massive.items()},
              "cofire_by_similarity": {}, "random_pairs": {}, "nulls": {}, "s_res_share": {}}
    for g in geoms:
        for kind in KINDS:
            sims = np.concatenate([pairs[(g, p.layer, kind)][2] for p in plans])
            ks = [(g, p.layer, kind) for p in plans]
            row = {}
            for lo, hi in zip(SIM_BINS[:-1], SIM_BINS[1:]):
                n_t = sum(on_t[k][(pairs[k][2] >= lo) & (pairs[k][2] < hi)].sum() for k in ks)
                n_b = sum(both[k][(pairs[k][2] >= lo) & (pairs[k][2] < hi)].sum() for k in ks)
                n_p = int(((sims >= lo) & (sims < hi)).sum())
                row[f"[{lo:.2f},{min(hi, 1):.2f})"] = {"pairs": n_p, "cofire": (
                    round(float(n_b / n_t), 4) if n_t else None)}
            report["cofire_by_similarity"][f"{g}/{kind}"] = row
            report["random_pairs"][f"{g}/{kind}"] = round(float(
                sum(both_rand[k].sum() for k in ks) / max(sum(on_t[k].sum() for k in ks), 1)), 4)
    for g in geoms:
        for nk in NULLS:
            per_layer = {}
            for p in plans:
                L = p.layer
                t = {kind: float(np.quantile(nulls[(g, L, kind, nk)], 0.99)) for kind in KINDS}
                s = {kind: pairs[(g, L, kind)][2].astype(float) for kind in KINDS}
                cls = classify(s["res"], s["mlp"], s["attn"], 0.5, t["mlp"], t["attn"])
                shares = {c: round(float((cls == c).mean()), 4) for c in
                          ("translated", "processed", "newborn", "unexplained")}
                hi_lo = {}
                for kind in ("mlp", "attn"):
                    k = (g, L, kind)
                    hi_lo[kind] = {"t": round(t[kind], 4),
                                   "high": rate(k, s[kind] >= t[kind]),
                                   "low": rate(k, s[kind] < t[kind]),
                                   "high_share": round(float((s[kind] >= t[kind]).mean()), 4)}
                per_layer[str(L)] = {"classes": shares, **hi_lo,
                                     "t_res_null_q99": round(float(np.quantile(
                                         nulls[(g, L, "res", nk)], 0.99)), 4)}
            report["nulls"][f"{g}/{nk}"] = per_layer
    for g in geoms:
        report["s_res_share"][g] = {str(p.layer): round(float(
            (pairs[(g, p.layer, "res")][2] >= 0.5).mean()), 4) for p in plans}
        report["s_res_share"][f"{g}/rotation_null"] = {str(p.layer): round(float(
            (nulls[(g, p.layer, "res", "rotation")] >= 0.5).mean()), 4) for p in plans}
        k_res = [(g, p.layer, "res") for p in plans]
        report["s_res_share"][f"{g}/cofire_at_0.5"] = {
            "high": round(float(sum(both[k][pairs[k][2] >= 0.5].sum() for k in k_res) /
                                max(sum(on_t[k][pairs[k][2] >= 0.5].sum() for k in k_res), 1)), 4),
            "low": round(float(sum(both[k][pairs[k][2] < 0.5].sum() for k in k_res) /
                               max(sum(on_t[k][pairs[k][2] < 0.5].sum() for k in k_res), 1)), 4)}
    # pairs whose residual predecessor changes when the massive dimensions leave
    changed = {}
    for p in plans:
        kr, kn = ("raw", p.layer, "res"), ("no_massive", p.layer, "res")
        diff = pairs[kr][1] != pairs[kn][1]
        changed[str(p.layer)] = {"share": round(float(diff.mean()), 4),
                                 "cofire_raw_choice": rate(kr, diff),
                                 "cofire_no_massive_choice": rate(kn, diff)}
    report["changed_by_geometry"] = changed
    report["seconds"] = round(time.time() - t0, 1)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    _print(report, geoms)


def _pred_slot(plans, k):
    _, L, kind = k
    return next(p for p in plans if p.layer == L).preds[kind]


def _print(r, geoms):
    print(f"\nco-firing P(pred on | target on), {r['tokens']} held-out tokens")
    for key, row in r["cofire_by_similarity"].items():
        cells = "  ".join(f"{b}:{v['cofire']}({v['pairs']})" for b, v in row.items())
        print(f"  {key:18s} random {r['random_pairs'][key]}  {cells}")
    for key, per in r["nulls"].items():
        proc = [per[L]["classes"]["processed"] for L in per]
        hm = [per[L]["mlp"]["high"] for L in per]
        lm = [per[L]["mlp"]["low"] for L in per]
        ha = [per[L]["attn"]["high"] for L in per]
        print(f"  {key:22s} processed {min(proc):.2f}-{max(proc):.2f} (median "
              f"{np.median(proc):.2f}); t_mlp {min(per[L]['mlp']['t'] for L in per):.3f}-"
              f"{max(per[L]['mlp']['t'] for L in per):.3f}; cofire mlp high {np.nanmedian(hm):.3f}"
              f" low {np.nanmedian(lm):.3f}; attn high {np.nanmedian(ha):.3f}")
    for g in geoms:
        print(f"  s_res share {g}: {r['s_res_share'][g]}")
        print(f"     null: {r['s_res_share'][g + '/rotation_null']}  cofire: "
              f"{r['s_res_share'][g + '/cofire_at_0.5']}")
    print(f"  changed by geometry: {r['changed_by_geometry']}")


if __name__ == "__main__":
    main()

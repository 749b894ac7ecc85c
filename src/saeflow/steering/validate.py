"""Causal validation of data-free predecessors by deactivation (flow paper, section 5.2).

On sampled texts and tokens, for each chosen active residual feature f at R_L (a "target"), a
method picks predecessor(s) among R_{L-1}, M_L, A_L; each picked predecessor p that is active on
the token is removed there: h <- h - a_p v_p (h <- h + (r - 1) a v with r = 0), at p's position
and that token only. Then the target is re-encoded on the same token:
    activation change = 1 - z_new / z_old,   deactivated = (z_new == 0).

Targets are sampled uniformly among the active features of the token (`target_choice`), because
the most active ones are the hardest to switch off (a weak latent of a TopK SAE leaves the top-k
under almost any change); the old "most active first" choice stays available.

Methods (the names are stable; readers key on them):
    top1_cosine      the single most similar predecessor over R_{L-1}, M_L, A_L
    top5_cosine      the five most similar, removed together
    random_top5      one of the five, at random
    permutation      the SAE Match partner in R_{L-1}
    top1_pearson     the best Pearson partner (from RUN/stats when present)
    exhaustive       every active upstream feature at the token, each alone; the best one.
                     A true search, independent of cosine matching: the upper bound for any
                     single-predecessor method
    exhaustive_top5  the same over the active members of the top-5 lists only (what
                     "exhaustive" meant before saeflow 0.2)
    control_matched  a random active upstream feature that is no candidate of any list, with a
                     removal norm |a v| matched to the top-1 predecessor's: what removing an
                     unrelated feature of the same size does (TopK boundary effects)

Cost: removals only change the chosen token, and the target sits at the same token, so every
trial is a one-token forward over the clean prefix's KV cache (layers <= L). Trials that remove
the same set at the same token are run once and read by every target that needs them.

Also the r sweep: the relative change of the LM loss when a flow graph's features are rescaled
by r (rescale plans at every token).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from saeflow.errors import ValidateError
from saeflow.evolution.tables import open_stats
from saeflow.features.liveness import liveness_from_index
from saeflow.flow.graphs import FlowIndex, persistence, trace
from saeflow.flow.match import permutation_match
from saeflow.flow.predecessors import slot_directions
from saeflow.ids import group_name
from saeflow.lm.corpora import DEFAULT_SPEC, Corpus
from saeflow.lm.hooks import HookPoint, Hooks
from saeflow.steering.plans import CallScope, flow_for_pack, plan_edits, plan_from_graph
from saeflow.store import write_json_atomic, write_parquet_atomic

METHODS = ("top1_cosine", "top5_cosine", "random_top5", "permutation", "top1_pearson",
           "exhaustive", "exhaustive_top5", "control_matched")
# The rates whose confidence interval `ci_halfwidth` bounds.
HEADLINE_METHODS = ("top1_cosine", "exhaustive", "control_matched")
TARGET_CHOICES = ("random", "all", "most_active")
KINDS = ("res", "mlp", "attn")
VALIDATE_DIR = "validate"
RANK_BIN = 10  # targets binned by activation rank in groups of 10 (0 = the most active)
SIMILARITY_BINS = [0.0, 0.3, 0.5, 0.7, 1.01]

# The paper's Table 1 (Gemma 2 2B + Gemma Scope, 1,894 features), for side-by-side reports.
PAPER_TABLE1 = {"top1_cosine": (0.75, 0.65), "top1_pearson": (0.74, 0.65),
                "exhaustive": (0.83, 0.73)}


@dataclass
class ValidateConfig:
    layers: list[int] | None = None  # default: about 1/4, 1/2 and 3/4 of the depth
    texts: int = 12  # at least this many texts (more when ci_halfwidth asks for them)
    tokens_per_text: int = 4  # token positions tried per text
    max_features: int | None = 10  # targets per (text, token, layer); None: every active one
    # which active features become targets: a uniform sample, all of them, or the most active
    # (biased towards hard targets)
    target_choice: Literal["random", "all", "most_active"] = "random"
    ctx_len: int = 64  # tokens per text
    corpus: str = DEFAULT_SPEC
    seed: int = 0  # seed of the texts, tokens and targets
    batch_rows: int = 128  # trial rows per one-token forward (each holds a copy of the KV cache)
    ci_halfwidth: float | None = None  # add texts until every headline 95% CI is this narrow
    max_texts: int = 200  # the cap when ci_halfwidth is set
    control_tolerance: float = 1.25  # control's removal norm within [1/t, t] x the top-1's
    keep_dead: bool = False  # keep never-firing latents in the candidate lists
    r_values: list[float] = field(default_factory=lambda: [-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0])  # rescale factors r of the sweep
    r_graphs: int = 4  # flow graphs in the r sweep (0: none)
    r_texts: int = 8  # texts per graph in the r sweep

    def __post_init__(self) -> None:
        if self.target_choice == "all":  # every active feature: no cap
            self.max_features = None

    def check(self) -> None:
        if self.target_choice not in TARGET_CHOICES:
            raise ValidateError(f"target_choice must be one of {', '.join(TARGET_CHOICES)}, "
                                f"not {self.target_choice!r}")
        if self.max_features is not None and self.max_features < 1:
            raise ValidateError("max_features must be at least 1 (or None for every feature)")
        if self.texts < 1 or self.tokens_per_text < 1 or self.batch_rows < 1:
            raise ValidateError("texts, tokens_per_text and batch_rows must be at least 1")
        if self.ci_halfwidth is not None and not 0 < self.ci_halfwidth < 0.5:
            raise ValidateError("ci_halfwidth is a half-width of a rate, in (0, 0.5)")
        if not self.control_tolerance >= 1:
            raise ValidateError("control_tolerance is a ratio, at least 1")


def default_layers(n_layers: int) -> list[int]:
    return sorted({max(1, round(n_layers * q)) for q in (0.25, 0.5, 0.75)})


def _predecessor_candidates(index, L: int, f: int, k: int = 5, live=None) -> list[tuple]:
    """[(slot, feature, similarity)] of the top-k predecessors per kind, best first overall.
    `live` ({slot: [d_sae] bool}) drops latents known never to fire."""
    out = []
    for kind in KINDS:
        for rank in range(k):
            p = index.predecessor(L, f, kind, rank)
            if p is None:
                break
            slot = (p[0], p[1])
            mask = None if live is None else live.get(slot)
            if mask is not None and not mask[p[2]]:
                continue
            out.append((slot, p[2], p[3]))
    return sorted(out, key=lambda c: -c[2])


def _pearson_top1(stats, L: int) -> dict[int, tuple]:
    """{target feature: (slot, upstream feature)} by the highest Pearson among the stored pairs
    into R_L (adjacent R_{L-1} -> R_L, and M_L / A_L -> R_L when computed)."""
    if stats is None:
        return {}
    e = stats.edges(down=("resid_post", L))
    if e.empty:
        return {}
    e = e.sort_values("pearson", ascending=False).drop_duplicates("down")
    return {int(r.down): ((r.up_position, int(r.up_layer)), int(r.up))
            for r in e.itertuples() if r.pearson > 0}


def _permutation_partners(pack, L: int) -> dict[int, int]:
    if ("resid_post", L - 1) not in pack:
        return {}
    rows, cols, _ = permutation_match(slot_directions(pack, ("resid_post", L - 1)),
                                      slot_directions(pack, ("resid_post", L)))
    return {int(c): int(r) for r, c in zip(rows, cols)}


def choose_targets(active: list[int], activations: list[float], max_features: int | None,
                   choice: str, rng: np.random.Generator) -> list[int]:
    """Which active features (indices into `active`) become targets.

    random       a uniform sample of max_features (without replacement), seeded by rng
    all          every active feature
    most_active  the max_features largest activations (saeflow < 0.2; biased to hard targets)
    """
    n = len(active)
    if choice == "all" or max_features is None or max_features >= n:
        pick = list(range(n))
    elif choice == "random":
        pick = sorted(rng.choice(n, max_features, replace=False).tolist())
    elif choice == "most_active":
        pick = sorted(np.argsort(-np.asarray(activations), kind="stable")[:max_features].tolist())
    else:
        raise ValidateError(f"target_choice must be one of {', '.join(TARGET_CHOICES)}")
    return [active[i] for i in pick]


def pick_control(top1: tuple, upstream: list[tuple], candidates: set, tolerance: float,
                 rng: np.random.Generator) -> tuple | None:
    """A random active upstream feature that is no candidate, whose removal norm |a v| is within
    [1/tolerance, tolerance] x the top-1 predecessor's; the same slot as the top-1 first, then
    any slot; when none is in range, the nearest in log ratio. `upstream`: [(slot, feature,
    activation, removal norm)]; `top1` one of them. Returns (entry, norm ratio) or None."""
    pool = [u for u in upstream if (u[0], u[1]) not in candidates and u[:2] != top1[:2]]
    if not pool:
        return None
    ref = top1[3]
    ratio = np.array([u[3] / ref for u in pool])
    log_r = np.abs(np.log(np.maximum(ratio, 1e-12)))
    in_range = log_r <= math.log(tolerance)
    same_slot = np.array([u[0] == top1[0] for u in pool])
    for sel in (in_range & same_slot, in_range):
        if sel.any():
            i = int(rng.choice(np.flatnonzero(sel)))
            return pool[i], float(ratio[i])
    i = int(np.argmin(log_r))
    return pool[i], float(ratio[i])


def run_validation(pack, model, run: str | os.PathLike, cfg: ValidateConfig | None = None,
                   progress: bool = True) -> dict:
    """The deactivation experiment over RUN's flow; writes RUN/validate/{cases.parquet,
    summary.json} and returns the summary."""
    from tqdm.auto import tqdm

    cfg = cfg or ValidateConfig()
    cfg.check()
    t0 = time.time()
    pack.check_model(model)
    flow = flow_for_pack(pack, run, model)
    index = FlowIndex(flow)
    layers = cfg.layers or default_layers(model.n_layers)
    layers = [L for L in layers if L in index.pred and ("resid_post", L) in pack]
    if not layers:
        raise ValidateError(f"none of the layers asked has a residual SAE with predecessors "
                            f"(flow layers {sorted(index.pred)})")
    try:
        stats = open_stats(run)
    except ValueError:
        stats = None
    pearson = {L: _pearson_top1(stats, L) for L in layers}
    perm = {L: _permutation_partners(pack, L) for L in layers}
    slots = sorted({("resid_post", L) for L in layers} |
                   {s for L in layers for s in (_slots_of(index, L).values()) if s in pack})
    saes = {s: pack.sae(*s, device=model.device) for s in slots}
    liveness = None if cfg.keep_dead else liveness_from_index(run, pack)
    live = None
    if liveness is not None:
        live = {s: liveness.live(s) for s in slots if liveness.live(s) is not None}
    rng = np.random.default_rng(cfg.seed)
    corpus = Corpus.from_spec(cfg.corpus, seed=cfg.seed)
    limit = cfg.max_texts if cfg.ci_halfwidth else cfg.texts
    batches = corpus.token_batches(model.tokenizer, 1, cfg.ctx_len,
                                   max_tokens=limit * cfg.ctx_len * 2)
    rows: list[dict] = []
    bar = tqdm(total=limit, desc="validate", unit="text", disable=not progress)
    n_text = 0
    for b in batches:
        if n_text >= limit or (n_text >= cfg.texts and _precise_enough(rows, cfg)):
            break
        content = torch.nonzero(b.content_mask()[0]).flatten().tolist()
        if len(content) < cfg.tokens_per_text:
            continue
        tokens = sorted(rng.choice(content, cfg.tokens_per_text, replace=False).tolist())
        rows += _validate_text(model, saes, index, b.input_ids, tokens, layers, pearson, perm,
                               cfg, rng, n_text, live)
        n_text += 1
        bar.update(1)
    bar.close()
    if not rows:
        raise ValidateError("no active target features with an active predecessor were found; "
                            "try more texts or other layers")
    cases = pd.DataFrame(rows)
    summary = summarize(cases)
    summary.update({"config": asdict(cfg), "layers": layers, "texts": n_text,
                    "targets": int(cases.drop_duplicates(["text", "token", "layer",
                                                          "feature"]).shape[0]),
                    "has_pearson": stats is not None, "seconds": round(time.time() - t0, 1),
                    "paper_table1": PAPER_TABLE1,
                    "dead_latents": (liveness.summary() if liveness is not None else
                                     {"source": "kept" if cfg.keep_dead else "unknown"}),
                    "ci_target": _ci_status(summary, cfg)})
    out = Path(run) / VALIDATE_DIR
    _write(out, cases, summary)
    return summary


def _slots_of(index, L: int) -> dict[str, tuple[str, int]]:
    out = {}
    for kind in KINDS:
        spec = index.pred_slots.get(L, {}).get(kind)
        if spec:
            lay, pos = spec.split("/")
            out[kind] = (pos, int(lay))
    return out


def _validate_text(model, saes, index, input_ids, tokens, layers, pearson, perm, cfg, rng,
                   text_no, live=None) -> list[dict]:
    """All trials on one text: a clean forward, then per token the plans of every target and
    one-token forwards over the prefix's KV cache."""
    points = {s: HookPoint(*s) for s in saes}
    input_ids = input_ids.to(model.device)
    with torch.inference_mode(), Hooks(model, capture=points.values(), stop_early=True) as h:
        model_body(model)(input_ids=input_ids, use_cache=False)
    z = {s: saes[s].encode(h.activations[pt][0]).float() for s, pt in points.items()}  # [seq, d]
    # Unit decoder directions, for the similarity of what was removed to the target.
    unit = {s: sae.W_dec.float() / sae.W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
            for s, sae in saes.items()}  # [d_sae, d_model]
    out = []
    for t in tokens:
        plans = []  # (case, method, [removal keys])
        removal_sets: dict[tuple, int] = {}  # (layer, ((slot, p), ...)) -> trial row
        for L in layers:
            pred_slots = [s for s in _slots_of(index, L).values() if s in z]
            upstream = []  # every active upstream feature at t: (slot, p, a, |a v|)
            for s in pred_slots:
                on = torch.nonzero(z[s][t] > 0).flatten()  # [n_on]
                a = z[s][t][on]
                norm = a * saes[s].W_dec[on].float().norm(dim=1) / saes[s].input_scale
                upstream += [(s, int(p), float(x), float(n))
                             for p, x, n in zip(on.tolist(), a.tolist(), norm.tolist())]
            by_key = {(u[0], u[1]): u for u in upstream}
            _trial(removal_sets, L, ())  # the unedited row: z_old on the same path as z_new
            for u in upstream:
                _trial(removal_sets, L, ((u[0], u[1]),))
            zt = z[("resid_post", L)][t]
            active = torch.nonzero(zt > 0).flatten()
            active = active[zt[active].argsort(descending=True)]  # rank 0 = most active
            active_l, acts_l = active.tolist(), zt[active].tolist()
            rank = {f: r for r, f in enumerate(active_l)}
            for f in choose_targets(active_l, acts_l, cfg.max_features, cfg.target_choice, rng):
                plans += _case_plans(index, L, f, t, text_no, rank[f], len(active_l), z,
                                     by_key, upstream, pearson, perm, cfg, rng, live,
                                     removal_sets)
        if plans:
            z_at = {s: zs[t] for s, zs in z.items()}  # the removal amounts at t
            z_rows = _run_token(model, saes, input_ids, t, removal_sets, z_at, cfg.batch_rows)
            out += _collect(plans, removal_sets, z_rows, unit)
    return out


def _trial(removal_sets: dict, L: int, removed: tuple) -> tuple:
    key = (L, tuple(sorted(removed)))
    removal_sets.setdefault(key, len(removal_sets))
    return key


def _case_plans(index, L, f, t, text_no, rank, n_active, z, by_key, upstream, pearson, perm,
                cfg, rng, live, removal_sets) -> list[tuple]:
    """(case, method, [trial keys]) for one target; [] for a "From nowhere" target."""
    preds = _slots_of(index, L)
    top1 = {k: index.predecessor(L, f, k) for k in preds}
    fired = {k: p is not None and (p[0], p[1]) in z and bool(z[(p[0], p[1])][t, p[2]] > 0)
             for k, p in top1.items()}
    if not any(fired.values()):
        return []  # "From nowhere": nothing upstream to remove (left out, as in the paper)
    cands = [c for c in _predecessor_candidates(index, L, f, live=live) if c[0] in z]
    case = {"text": text_no, "token": t, "layer": L, "feature": f, "group": _group(fired),
            "top1_similarity": float(cands[0][2]) if cands else float("nan"),
            "target_rank": rank, "n_active": n_active, "target_choice": cfg.target_choice}

    def on(c):
        return (c[0], c[1]) in by_key

    picks = {"top1_cosine": cands[:1], "top5_cosine": cands[:5],
             "random_top5": [cands[int(rng.integers(min(5, len(cands))))]] if cands else []}
    if f in perm.get(L, {}) and ("resid_post", L - 1) in z:
        picks["permutation"] = [(("resid_post", L - 1), perm[L][f], None)]
    if f in pearson.get(L, {}) and pearson[L][f][0] in z:
        slot, p = pearson[L][f]
        picks["top1_pearson"] = [(slot, p, None)]
    plans = []
    for m, chosen in picks.items():
        removed = tuple((c[0], c[1]) for c in chosen if on(c))
        if removed:
            plans.append((case, m, [_trial(removal_sets, L, removed)]))
    cand_on = [c for c in cands if on(c)]
    if cand_on:
        plans.append((case, "exhaustive_top5",
                      [_trial(removal_sets, L, ((c[0], c[1]),)) for c in cand_on]))
    if upstream:
        plans.append((case, "exhaustive",
                      [_trial(removal_sets, L, ((u[0], u[1]),)) for u in upstream]))
    if cands and on(cands[0]):
        # Everything a method could name is a candidate: the top-k lists, SAE Match, Pearson.
        named = {(c[0], c[1]) for c in _predecessor_candidates(index, L, f)}
        named |= {(c[0], c[1]) for ch in picks.values() for c in ch}
        ctl = pick_control(by_key[(cands[0][0], cands[0][1])], upstream, named,
                           cfg.control_tolerance, rng)
        if ctl is not None:
            (slot, p, _, _), ratio = ctl
            plans.append(({**case, "control_norm_ratio": ratio}, "control_matched",
                          [_trial(removal_sets, L, ((slot, p),))]))
    return plans


def _group(fired: dict[str, bool]) -> str:
    return group_name(fired.get("res", False), fired.get("mlp", False), fired.get("attn", False))


def model_body(model):
    return model.hf.get_submodule(model.arch.layers_path.rsplit(".", 1)[0])


def _cache_kwarg(body) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.2x) or the older
    `past_key_values`."""
    import inspect

    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.hf.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _run_token(model, saes, input_ids, t, removal_sets, z_at, batch_rows) -> dict:
    """Run every trial row of token t: {layer: [n_rows_of_that_layer, d_sae]} of R_L's
    activations at t, rows in the order of their keys (by row number)."""
    body = model_body(model)
    cache_kw = _cache_kwarg(body)
    keys = sorted(removal_sets, key=lambda k: (k[0], removal_sets[k]))
    deepest = max(k[0] for k in keys)
    prefix = None
    if t > 0:  # the clean prefix, once: its keys and values for layers <= the deepest target
        prefix = _new_cache(model)
        with torch.inference_mode(), Hooks(model, capture=[HookPoint("resid_post", deepest)],
                                           stop_early=True):
            body(input_ids=input_ids[:, :t], use_cache=True, **{cache_kw: prefix})
    token = input_ids[:, t:t + 1]  # [1, 1]
    z_new: dict[int, list[torch.Tensor]] = {}
    for a in range(0, len(keys), batch_rows):
        chunk = keys[a:a + batch_rows]
        n = len(chunk)
        deltas: dict[tuple, torch.Tensor] = {}
        for row, (_, removed) in enumerate(chunk):
            for slot, p in removed:
                sae = saes[slot]
                if slot not in deltas:
                    deltas[slot] = torch.zeros(n, 1, sae.d_in, device=model.device)  # [n, 1, d]
                v = sae.W_dec[p].float() / sae.input_scale  # [d_model]
                deltas[slot][row, 0] -= z_at[slot][p] * v
        edits = {HookPoint(*s): (lambda d: (lambda act: act + d.to(act.dtype)))(d)
                 for s, d in deltas.items()}
        targets = sorted({L for L, _ in chunk})
        cache = None
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(n)
        with torch.inference_mode(), Hooks(model, capture=[HookPoint("resid_post", L)
                                                           for L in targets],
                                           edits=edits, stop_early=True) as h:
            body(input_ids=token.expand(n, 1), use_cache=cache is not None, **{cache_kw: cache})
        for L in targets:
            rows = [i for i, k in enumerate(chunk) if k[0] == L]
            idx = torch.tensor(rows, device=model.device)
            x = h.activations[HookPoint("resid_post", L)][idx, 0]  # [n_L, d_model]
            with torch.inference_mode():
                z_new.setdefault(L, []).append(saes[("resid_post", L)].encode(x).float())
    return {L: torch.cat(v) for L, v in z_new.items()}


def _collect(plans, removal_sets, z_rows, unit) -> list[dict]:
    """One row per (target, method): for methods with several trials (the exhaustive ones), the
    best single removal."""
    order = {}  # key -> position within its layer's rows
    per_layer: dict[int, int] = {}
    for k in sorted(removal_sets, key=lambda k: (k[0], removal_sets[k])):
        order[k] = per_layer.get(k[0], 0)
        per_layer[k[0]] = order[k] + 1
    rows = []
    for case, method, keys in plans:
        L, f = case["layer"], case["feature"]
        z_old = float(z_rows[L][order[(L, ())], f])
        if z_old <= 0:
            continue  # inactive on the trial path (a TopK tie at the margin): not a case
        pos = torch.tensor([order[k] for k in keys], device=z_rows[L].device)
        vals = z_rows[L][pos, f]  # [n_keys]
        best = int(vals.argmin())
        z_new = float(vals[best])
        removed = keys[best][1]
        target_dir = unit[("resid_post", L)][f]
        sims = [float(unit[s][p] @ target_dir) for s, p in removed]
        rows.append({"text": case["text"], "token": case["token"], "layer": L, "feature": f,
                     "group": case["group"], "method": method,
                     "top1_similarity": case["top1_similarity"],
                     "target_rank": case["target_rank"], "n_active": case["n_active"],
                     "target_choice": case["target_choice"],
                     "z_old": z_old, "z_new": max(z_new, 0.0),
                     "change": 1.0 - max(z_new, 0.0) / z_old, "deactivated": z_new <= 0.0,
                     "removed": ",".join(f"{s[1]}/{s[0]}/{p}" for s, p in removed),
                     "removed_similarity": max(sims) if sims else float("nan"),
                     "control_norm_ratio": case.get("control_norm_ratio", float("nan")),
                     "tried": len(keys)})
    return rows


# --- summaries with confidence intervals ---------------------------------------------------------
def clustered_ci(values: np.ndarray, clusters: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """95% CI of a mean whose observations come in clusters (targets of one text share it):
    the cluster-robust (ratio estimator) standard error; a plain normal CI with one cluster."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = float(values.mean())
    ids, inv = np.unique(clusters, return_inverse=True)
    m = len(ids)
    if m < 2:
        se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    else:
        resid = np.bincount(inv, weights=values - mean, minlength=m)  # per-cluster sums
        se = math.sqrt(m / (m - 1) * float((resid ** 2).sum())) / n
    return mean - z * se, mean + z * se


def wilson_ci(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return mid - half, mid + half


def _agg(df: pd.DataFrame) -> dict:
    """Cases, success rate and mean activation change, each with a 95% CI clustered by text
    (and the plain Wilson interval of the rate, which treats targets as independent)."""
    ok = df.deactivated.to_numpy(bool)
    change = df.change.clip(upper=1.0).to_numpy(float)
    texts = df.text.to_numpy()
    lo, hi = clustered_ci(ok.astype(float), texts)
    clo, chi = clustered_ci(change, texts)
    wlo, whi = wilson_ci(int(ok.sum()), len(ok))
    r4 = lambda x: round(float(x), 4)  # noqa: E731
    return {"cases": int(len(df)), "success_rate": r4(ok.mean()),
            "mean_activation_change": r4(change.mean()),
            "success_ci95": [r4(max(lo, 0.0)), r4(min(hi, 1.0))],
            "success_ci95_wilson": [r4(wlo), r4(whi)],
            "change_ci95": [r4(clo), r4(chi)]}


def _similarity_bins(sim: pd.Series):
    cut = pd.cut(sim.clip(lower=0.0), SIMILARITY_BINS, right=False)
    return cut, lambda iv: f"[{iv.left:.1f}, {min(iv.right, 1.0):.1f})"


def _rank_label(r: int) -> str:
    a = (int(r) // RANK_BIN) * RANK_BIN
    return f"{a}-{a + RANK_BIN - 1}"


def summarize(cases: pd.DataFrame) -> dict:
    """Per method: success rate and mean activation change, overall and per layer, per target
    activation rank and per similarity of the removed predecessor; per empirical group and
    top-1 similarity for top-1 cosine; and the paired comparison on the top-1 cases."""
    out: dict[str, Any] = {"methods": {}, "by_layer": {}, "by_group_top1": {}, "by_target_rank": {},
           "by_similarity": {}}
    for m in METHODS:
        sel = cases[cases.method == m]
        if not len(sel):
            continue
        out["methods"][m] = _agg(sel)
        out["by_layer"][m] = {str(L): _agg(g) for L, g in sel.groupby("layer")}
        if "target_rank" in sel:
            bins = sel.target_rank.map(lambda r: (int(r) // RANK_BIN))
            out["by_target_rank"][m] = {_rank_label(b * RANK_BIN): _agg(g)
                                        for b, g in sel.groupby(bins)}
        if "removed_similarity" in sel:
            cut, label = _similarity_bins(sel.removed_similarity)
            out["by_similarity"][m] = {label(iv): _agg(d)
                                       for iv, d in sel.groupby(cut, observed=True)}
    top1 = cases[cases.method == "top1_cosine"]
    out["by_group_top1"] = {g: _agg(d) for g, d in top1.groupby("group")}
    # How much the answer depends on how alike the predecessor is (the cosine of the top-1).
    cut, label = _similarity_bins(top1.top1_similarity)
    out["by_similarity_top1"] = {label(iv): _agg(d) for iv, d in top1.groupby(cut, observed=True)}
    out["paired_top1"] = paired(cases)
    return out


def paired(cases: pd.DataFrame, base: str = "top1_cosine") -> dict:
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
        lo, hi = clustered_ci(d, both.index.get_level_values("text").to_numpy())
        out["minus_control"] = {"cases": int(len(d)),
                                "difference": round(float(d.mean()), 4) if len(d) else None,
                                "ci95": [round(lo, 4), round(hi, 4)]}
    return out


def _headline_halfwidths(rows: list[dict]) -> dict[str, float]:
    if not rows:
        return {}
    df = pd.DataFrame(rows)
    out = {}
    for m in HEADLINE_METHODS:
        sel = df[df.method == m]
        if len(sel) < 2:
            out[m] = float("inf")
            continue
        lo, hi = clustered_ci(sel.deactivated.to_numpy(float), sel.text.to_numpy())
        out[m] = (hi - lo) / 2 if np.isfinite(hi - lo) else float("inf")
    return out


def _precise_enough(rows: list[dict], cfg: ValidateConfig) -> bool:
    """Stop adding texts once every headline rate's 95% CI half-width is <= cfg.ci_halfwidth."""
    if cfg.ci_halfwidth is None:
        return True
    hw = _headline_halfwidths(rows)
    return bool(hw) and all(v <= cfg.ci_halfwidth for v in hw.values())


def _ci_status(summary: dict, cfg: ValidateConfig) -> dict:
    hw = {m: round((r["success_ci95"][1] - r["success_ci95"][0]) / 2, 4)
          for m, r in summary["methods"].items() if m in HEADLINE_METHODS}
    return {"halfwidth_asked": cfg.ci_halfwidth, "halfwidths": hw,
            "met": (None if cfg.ci_halfwidth is None else
                    all(v <= cfg.ci_halfwidth for v in hw.values()))}


def _write(out: Path, cases: pd.DataFrame, summary: dict) -> None:
    import pyarrow as pa

    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(pa.Table.from_pandas(cases, preserve_index=False),
                         out / "cases.parquet")
    write_json_atomic(out / "summary.json", summary)


def _fmt_ci(r: dict) -> str:
    ci = r.get("success_ci95")
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "-"


def table_markdown(summary: dict) -> str:
    """The method table next to the paper's Table 1."""
    lines = ["| method | cases | success rate | 95% CI | mean activation change | "
             "paper (change, success) |", "|---|---|---|---|---|---|"]
    for m, r in summary["methods"].items():
        paper = PAPER_TABLE1.get(m)
        p = f"{paper[0]:.2f}, {100 * paper[1]:.0f}%" if paper else "-"
        lines.append(f"| {m} | {r['cases']} | {100 * r['success_rate']:.1f}% | {_fmt_ci(r)} | "
                     f"{r['mean_activation_change']:.3f} | {p} |")
    return "\n".join(lines)


def breakdown_markdown(summary: dict, key: str, methods=HEADLINE_METHODS,
                       title: str = "bin") -> str:
    """A per-bin table (key: by_target_rank, by_similarity, by_layer) of the headline methods:
    success % [95% CI] (cases)."""
    table = summary.get(key, {})
    methods = [m for m in methods if m in table]
    bins = sorted({b for m in methods for b in table[m]},
                  key=lambda b: (float(b.strip("[").split(",")[0].split("-")[0])))
    lines = [f"| {title} | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for b in bins:
        cells = []
        for m in methods:
            r = table[m].get(b)
            cells.append("-" if r is None else
                         f"{100 * r['success_rate']:.0f}% {_fmt_ci(r)} ({r['cases']})")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the r sweep --------------------------------------------------------------------------------
def r_sweep(pack, model, run, seeds: list[str], r_values, texts: int = 8, ctx_len: int = 64,
            corpus: str = DEFAULT_SPEC, seed: int = 0, t_res: float = 0.5) -> pd.DataFrame:
    """Relative change of the LM loss when every residual feature of each seed's flow graph is
    rescaled by r (at every token): (loss_r - loss_clean) / loss_clean."""

    flow = flow_for_pack(pack, run, model)
    batch = next(iter(Corpus.from_spec(corpus, seed=seed + 1).token_batches(
        model.tokenizer, texts, ctx_len, max_tokens=texts * ctx_len)))
    ids, mask = batch.input_ids.to(model.device), batch.attention_mask.to(model.device)

    def loss(edits=None, scope=None) -> float:
        from contextlib import nullcontext

        with torch.inference_mode(), (scope or nullcontext()), Hooks(model, edits=edits or {}):
            logits = model.hf(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        m = mask[:, 1:].float()
        return float(-(lp * m).sum() / m.sum())

    clean = loss()
    rows = []
    for s in seeds:
        G = trace(flow, s, t_res=t_res)
        for r in r_values:
            plan = plan_from_graph(G, r, "span", mode="rescale")
            scope = CallScope.for_model(model)
            scope.set_inputs(ids, mask)  # BOS, separators and padding stay unedited
            lr = loss(plan_edits(plan, pack, scope, device=model.device), scope)
            rows.append({"seed": s, "nodes": len(plan.interventions), "r": r, "loss": lr,
                         "clean_loss": clean, "relative_change": (lr - clean) / clean})
    return pd.DataFrame(rows)


def pick_seeds(flow_run, n: int, layer: int | None = None, min_span: int = 3,
               t_res: float = 0.5, seed: int = 0) -> list[str]:
    """n residual features whose flow graphs span at least `min_span` layers (long chains)."""

    per = persistence(flow_run, t_res)
    rng = np.random.default_rng(seed)
    layers = [layer] if layer is not None else sorted(per)[: max(1, len(per) // 2)]
    cands = [(L, int(f)) for L in layers for f in np.flatnonzero(per[L] >= min_span - 1)]
    if not cands:
        cands = [(L, int(np.argmax(per[L]))) for L in layers]
    pick = rng.choice(len(cands), min(n, len(cands)), replace=False)
    return [f"{cands[i][0]}/resid_post/{cands[i][1]}" for i in sorted(pick)]


def load_summary(run) -> dict:
    p = Path(run) / VALIDATE_DIR / "summary.json"
    if not p.is_file():
        raise ValidateError(f"{run} has no validation; run `saeflow validate`")
    return json.loads(p.read_text())


def write_r_sweep(pack, model, run, cfg: ValidateConfig):
    """The r sweep over cfg.r_graphs flow graphs, written to RUN/validate/r_sweep.csv."""

    flow = flow_for_pack(pack, run, model)
    seeds = pick_seeds(flow, cfg.r_graphs, seed=cfg.seed)
    df = r_sweep(pack, model, run, seeds, cfg.r_values, texts=cfg.r_texts, ctx_len=cfg.ctx_len,
                 corpus=cfg.corpus, seed=cfg.seed)
    out = Path(run) / VALIDATE_DIR / "r_sweep.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, out)
    return df

"""Causal validation of data-free predecessors by deactivation (flow paper, section 5.2).

On held-out texts and tokens, for each chosen active residual feature f at R_L (a "target"), a
method picks feature(s) among R_{L-1}, M_L, A_L and removes them at the token: h <- h - a_p v_p
(h <- h + (r - 1) a v with r = 0), at p's position and that token only. Then the target is
re-encoded on the same token:
    activation change = 1 - z_new / z_old
    deactivated            (the rank rule) z_new == 0: the target left the SAE's selection (for a
                           TopK SAE: its top-k)
    deactivated_threshold  (the threshold rule) pre_new < θ: the target's pre-activation fell
                           below θ, the SAE's own `threshold` [d_sae] when it has one (JumpReLU,
                           BatchTopK exported); else a scalar per SAE, the mean over the
                           experiment's clean content tokens of the k-th largest pre-activation at
                           that layer (what BatchTopK exports as its JumpReLU threshold); 0 for a
                           ReLU SAE. The rank rule of a TopK SAE depends on how strong the other
                           latents are at the token; the threshold rule does not.

Cases: ONE denominator for every method. A case is a target with at least one active top-1
predecessor (R_{L-1}, M_L or A_L: the paper's "cases with an active predecessor"; "From nowhere"
left out), and every method has exactly one row per case. A method with nothing to remove there
(its pick is not active on the token, no partner, no control) scores the case as not
deactivated under both rules, change 0, with removed_nothing = True.

Targets are sampled uniformly among the active features of the token (`target_choice`); the
success of a TopK SAE's target depends strongly on its activation rank (a weak latent leaves the
top-k under almost any change), so the rates are also given per rank bin (k/4 wide), with a
headline "top1_cosine, ranks 0-15".

Methods (the names are stable; readers key on them):
    top1_cosine        the most similar active top-1 predecessor over R_{L-1}, M_L, A_L
    predecessor_group  the top-1 predecessor of EACH kind, those active on the token, removed
                       together: the paper's "deactivate its predecessor(s)"
    top5_cosine        the five most similar, removed together
    random_top5        one of the five, at random
    permutation        the SAE Match partner in R_{L-1}
    top1_pearson       the best Pearson partner (from RUN/stats when present)
    exhaustive         every active upstream feature at the token, each alone; the best one (per
                       rule). A true search, independent of cosine matching: the upper bound for
                       any single-predecessor method
    exhaustive_top5    the same over the active members of the top-5 lists only
    exhaustive_control exhaustive's own null: for each active upstream feature (slot, p, a, |a v|),
                       a random feature of the same slot that is NOT active on the token (and no
                       candidate of any target there) is removed instead, its decoder row scaled
                       to the same norm |a v|; the best of those. The same number of tries and
                       sizes, no relation to the target
    control_matched    a random active upstream feature that is no candidate of any list, with a
                       removal norm |a v| matched to top1_cosine's: what removing an unrelated
                       feature of the same size does (TopK boundary effects)
    control_group      predecessor_group's null: a matched control for each group member (as
                       control_matched), removed together

Intervals: 95% CIs clustered by text (the targets of one text share it): the cluster-robust
standard error with a Student t quantile with n_texts - 1 degrees of freedom (or a bootstrap
over texts, `interval="bootstrap"`); paired differences (top1_cosine - control_matched,
exhaustive - exhaustive_control, predecessor_group - control_group) the same way.

Cost: removals only change the chosen token, and the target sits at the same token, so every
trial is a one-token forward over the clean prefix's KV cache. The layers below the first block
a trial changes are the clean forward's at that token, so they are skipped: a trial at R_L runs
block L alone, from the clean residual stream after layer L-1 (checked on every token against
the clean forward; a model where that fails runs every layer). Trials that remove the same set
at the same token are run once and read by every target that needs them; exhaustive_control's
draws are shared by the targets of a (token, layer) as exhaustive's trials are.

Also the r sweep: the relative change of the LM loss when a flow graph's features are rescaled
by r (rescale plans at every token).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from contextlib import contextmanager
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
from saeflow.intervals import ci95, clustered_ci, wilson_ci  # noqa: F401  (clustered_ci: re-exported)
from saeflow.lm.corpora import DEFAULT_SPEC, Corpus
from saeflow.lm.hooks import HookPoint, Hooks
from saeflow.steering.plans import CallScope, flow_for_pack, plan_edits, plan_from_graph
from saeflow.store import write_json_atomic, write_parquet_atomic

METHODS = ("top1_cosine", "predecessor_group", "top5_cosine", "random_top5", "permutation",
           "top1_pearson", "exhaustive", "exhaustive_top5", "exhaustive_control",
           "control_matched", "control_group")
# The headline rates: their CIs are what `ci_halfwidth` bounds, the breakdown tables' columns.
HEADLINE_METHODS = ("top1_cosine", "predecessor_group", "exhaustive", "exhaustive_control",
                    "control_matched")
# Paired differences on the same cases: a method minus its own null.
PAIRS = (("top1_cosine", "control_matched"), ("exhaustive", "exhaustive_control"),
         ("predecessor_group", "control_group"))
RULES = ("rank", "threshold")
TARGET_CHOICES = ("random", "all", "most_active")
KINDS = ("res", "mlp", "attn")
VALIDATE_DIR = "validate"
RANK_BIN = 8  # rank bin width when the target SAE has no k (a TopK SAE's bins are k/4 wide)
RANK_BINS = 4  # bins below the top one; ranks >= RANK_BINS x width share the last bin
HEADLINE_RANKS = 16  # the separate headline "top1_cosine, ranks 0-15"
SIMILARITY_BINS = [0.0, 0.3, 0.5, 0.7, 1.01]
# The paper's layers (Gemma 2 2B, 26 layers), scaled to other depths by `paper_layers`.
PAPER_LAYERS, PAPER_DEPTH = (6, 12, 18), 26

# The paper's Table 1 (Gemma 2 2B + Gemma Scope, 1,894 features), for side-by-side reports.
PAPER_TABLE1 = {"top1_cosine": (0.75, 0.65), "top1_pearson": (0.74, 0.65),
                "exhaustive": (0.83, 0.73)}


@dataclass
class ValidateConfig:
    # default: the paper's layers 6, 12 and 18 of 26 scaled to the model's depth (4, 8, 12 of 18)
    layers: list[int] | None = None
    texts: int = 30  # at least this many texts (more when ci_halfwidth asks for them)
    tokens_per_text: int = 5  # token positions tried per text (the paper: 35 texts x 5 tokens)
    max_features: int | None = 10  # targets per (text, token, layer); None: every active one
    # which active features become targets: a uniform sample, all of them, or the most active
    # (biased towards hard targets)
    target_choice: Literal["random", "all", "most_active"] = "random"
    ctx_len: int = 64  # tokens per text
    corpus: str = DEFAULT_SPEC
    # the corpus split the texts come from: heldout (documents the SAEs never trained on)
    split: Literal["heldout", "train", "all"] = "heldout"
    seed: int = 0  # seed of the texts, tokens and targets
    batch_rows: int = 128  # trial rows per one-token forward (each holds a copy of the KV cache)
    # 95% CIs clustered by text: Student t with n_texts - 1 df, or a bootstrap over texts
    interval: Literal["t", "bootstrap"] = "t"
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
        if self.split not in ("heldout", "train", "all"):
            raise ValidateError("split must be heldout, train or all")
        if self.interval not in ("t", "bootstrap"):
            raise ValidateError("interval must be t or bootstrap")
        if self.ci_halfwidth is not None and not 0 < self.ci_halfwidth < 0.5:
            raise ValidateError("ci_halfwidth is a half-width of a rate, in (0, 0.5)")
        if not self.control_tolerance >= 1:
            raise ValidateError("control_tolerance is a ratio, at least 1")


def paper_layers(n_layers: int, paper: tuple[int, ...] = PAPER_LAYERS,
                 depth: int = PAPER_DEPTH) -> list[int]:
    """The paper's layers (6, 12, 18 of Gemma 2 2B's 26) at the same relative depth of a model
    with n_layers: round(L * n_layers / 26), kept in [1, n_layers - 1] (a target needs R_{L-1}).
    18 layers: 4, 8, 12."""
    return sorted({min(max(1, math.floor(L * n_layers / depth + 0.5)), max(1, n_layers - 1))
                   for L in paper})


def default_layers(n_layers: int) -> list[int]:
    return paper_layers(n_layers)


def rank_bin_width(sae) -> int:
    """Rank bins of k/4 for an SAE with k (TopK, BatchTopK, GroupMax), else RANK_BIN."""
    k = getattr(sae, "k", None)
    return max(1, int(k) // RANK_BINS) if k else RANK_BIN


def rank_bin(rank: int, width: int = RANK_BIN) -> str:
    """'0-7', '8-15', '16-23', '24-31', then '32-inf' (bins of `width`, RANK_BINS of them)."""
    top = RANK_BINS * width
    if rank >= top:
        return f"{top}-inf"
    a = (int(rank) // width) * width
    return f"{a}-{a + width - 1}"


def _bin_start(label: str) -> float:
    m = re.search(r"-?\d+(\.\d+)?", label)
    return float(m.group()) if m else math.inf


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


def draw_inactive_matches(upstream: list[tuple], active_at: dict, dec_norms: dict,
                          exclude: set, rng: np.random.Generator,
                          live: dict | None = None) -> list[tuple]:
    """exhaustive_control's draws: for each active upstream feature (slot, p, a, |a v|), a
    random feature q of the same slot that is not active on the token (`active_at[slot]`: its
    [d_sae] activations there), no member of `exclude` ({(slot, feature)}), known to fire when
    `live` says so, with a nonzero decoder row; drawn without replacement within a slot while
    the pool lasts. Its removal amount is |a v| / |v_q|, so that the removal has the same norm.
    `dec_norms[slot]`: [d_sae] norms of the decoder rows in the input's units (|W_dec| /
    input_scale). Returns [(slot, q, amount, matched upstream entry)]."""
    out: list[tuple] = []
    by_slot: dict[tuple, list[tuple]] = {}
    for u in upstream:
        by_slot.setdefault(u[0], []).append(u)
    for slot, us in by_slot.items():
        norms = np.asarray(dec_norms[slot], dtype=np.float64)
        ok = (np.asarray(active_at[slot]) <= 0) & (norms > 0)
        mask = None if live is None else live.get(slot)
        if mask is not None:
            ok &= np.asarray(mask, dtype=bool)
        for s, q in exclude:
            if s == slot:
                ok[q] = False
        pool = np.flatnonzero(ok)
        if not len(pool):
            continue
        picks = rng.choice(pool, len(us), replace=len(us) > len(pool))
        for u, q in zip(us, picks.tolist()):
            out.append((slot, int(q), float(u[3] / norms[q]), u))
    return out


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
    # A method runs on every case of the run or on none: it is left out only when no layer has
    # what it needs (no statistics, no R_{L-1} SAE).
    available = set(METHODS)
    if not any(pearson.values()):
        available.discard("top1_pearson")
    if not any(perm.values()):
        available.discard("permutation")
    slots = sorted({("resid_post", L) for L in layers} |
                   {s for L in layers for s in (_slots_of(index, L).values()) if s in pack})
    saes = {s: pack.sae(*s, device=model.device) for s in slots}
    width = {L: rank_bin_width(saes[("resid_post", L)]) for L in layers}
    liveness = None if cfg.keep_dead else liveness_from_index(run, pack)
    live = None
    if liveness is not None:
        live = {s: liveness.live(s) for s in slots if liveness.live(s) is not None}
    rng = np.random.default_rng(cfg.seed)
    corpus = Corpus.from_spec(cfg.corpus, seed=cfg.seed)
    limit = cfg.max_texts if cfg.ci_halfwidth else cfg.texts
    batches = corpus.token_batches(model.tokenizer, 1, cfg.ctx_len,
                                   max_tokens=limit * cfg.ctx_len * 2, split=cfg.split)
    rows: list[dict] = []
    kth: dict[int, list[float]] = {}  # layer -> [sum, count] of the k-th largest pre-activation
    trials = [0]
    path: dict[str, Any] = {}
    documents: list[list[int]] = []
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
                               cfg, rng, n_text, live, content=content, kth=kth,
                               available=available, width=width, trials=trials, path=path)
        documents.append(sorted({int(d) for d in b.doc_ids[0].tolist() if d >= 0}))
        n_text += 1
        bar.update(1)
    bar.close()
    if not rows:
        raise ValidateError("no active target features with an active predecessor were found; "
                            "try more texts or other layers")
    cases = pd.DataFrame(rows)
    thetas = _thresholds(saes, layers, kth)
    cases = apply_threshold_rule(cases, thetas)
    summary = summarize(cases, interval=cfg.interval)
    summary.update({"config": asdict(cfg), "layers": layers, "texts": n_text,
                    "n_texts": n_text, "split": cfg.split, "documents": documents,
                    "targets": summary["cases"], "trial_rows": trials[0],
                    "trial_path": {k: (round(v, 8) if isinstance(v, float) else v)
                                   for k, v in path.items()},
                    "rank_bin_width": {str(L): w for L, w in width.items()},
                    "threshold": _threshold_summary(thetas, cases),
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
                   text_no, live=None, content=None, kth=None, available=None, width=None,
                   trials=None, path=None) -> list[dict]:
    """All trials on one text: a clean forward, then per token the plans of every target and
    one-token forwards over the prefix's KV cache. `kth` ({layer: [sum, count]}) gathers the
    k-th largest pre-activation of R_L over the text's content tokens (the threshold rule's θ
    for SAEs without a threshold); `trials` ([count]) counts the trial rows run; `path` records
    how the trials ran (skip_layers: the early layers skipped; max_error: the largest relative
    error of an unedited row against the clean forward)."""
    available = set(METHODS) if available is None else available
    width = width or {}
    path = {} if path is None else path
    points = {s: HookPoint(*s) for s in saes}
    # The clean residual stream after every layer up to the deepest target: trials start from it.
    resid = {j: HookPoint("resid_post", j) for j in range(max(layers) + 1)}
    input_ids = input_ids.to(model.device)
    with torch.inference_mode(), Hooks(model, capture={*points.values(), *resid.values()},
                                       stop_early=True) as h:
        model_body(model)(input_ids=input_ids, use_cache=False)
    z = {}
    clean_pre = {}  # layer -> [seq, d_sae] pre-activations of R_L
    with torch.inference_mode():
        for s, pt in points.items():
            sae = saes[s]
            pre = sae.pre_acts(h.activations[pt][0])  # [seq, d_sae]
            z[s] = sae.activate(pre).float()
            if s[0] == "resid_post" and s[1] in layers:
                clean_pre[s[1]] = pre
            if (kth is not None and content and s[0] == "resid_post" and s[1] in layers
                    and sae.threshold is None and sae.k):
                vals = pre[content].float().topk(min(int(sae.k), sae.d_sae), dim=-1).values
                acc = kth.setdefault(s[1], [0.0, 0])
                acc[0] += float(vals[:, -1].sum())
                acc[1] += len(content)
    # Unit decoder directions, for the similarity of what was removed to the target, and the
    # decoder norms in the input's units, for removal norms.
    unit = {s: sae.W_dec.float() / sae.W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
            for s, sae in saes.items()}  # [d_sae, d_model]
    dec_norm = {s: sae.W_dec.float().norm(dim=1) / sae.input_scale for s, sae in saes.items()}
    dec_norm_np = {s: v.cpu().numpy() for s, v in dec_norm.items()}
    out = []
    for t in tokens:
        plans: list[tuple] = []  # (case, method, [removal keys], extra)
        removal_sets: dict[tuple, int] = {}  # (layer, ((slot, p, amount), ...)) -> trial row
        act_t = {s: zs[t] for s, zs in z.items()}  # [d_sae] activations at t
        for L in layers:
            pred_slots = [s for s in _slots_of(index, L).values() if s in z]
            upstream = []  # every active upstream feature at t: (slot, p, a, |a v|)
            for s in pred_slots:
                on = torch.nonzero(act_t[s] > 0).flatten()  # [n_on]
                a = act_t[s][on]
                norm = a * dec_norm[s][on]
                upstream += [(s, int(p), float(x), float(n))
                             for p, x, n in zip(on.tolist(), a.tolist(), norm.tolist())]
            by_key = {(u[0], u[1]): u for u in upstream}
            zt = act_t[("resid_post", L)]
            active = torch.nonzero(zt > 0).flatten()
            active = active[zt[active].argsort(descending=True)]  # rank 0 = most active
            active_l, acts_l = active.tolist(), zt[active].tolist()
            rank = {f: r for r, f in enumerate(active_l)}
            setups = []
            for f in choose_targets(active_l, acts_l, cfg.max_features, cfg.target_choice, rng):
                st = _case_setup(index, L, f, t, text_no, rank[f], len(active_l), act_t,
                                 by_key, pearson, perm, cfg, live, width.get(L, RANK_BIN))
                if st is not None:
                    setups.append(st)
            if not setups:
                continue
            _trial(removal_sets, L, ())  # the unedited row: z_old on the same path as z_new
            singles = [_trial(removal_sets, L, ((u[0], u[1], u[2]),)) for u in upstream]
            # exhaustive_control: one draw per active upstream feature at (t, L), shared by the
            # targets there (as exhaustive's trials are); no candidate of any of them.
            named = set().union(*(st["named"] for st in setups))
            draws = draw_inactive_matches(upstream, {s: act_t[s].cpu().numpy() for s in pred_slots},
                                          dec_norm_np, named, rng, live)
            ctl_keys = [_trial(removal_sets, L, ((s, q, amount),)) for s, q, amount, _ in draws]
            matched = {k: _fid(d[3][0], d[3][1]) for k, d in zip(ctl_keys, draws)}
            for st in setups:
                plans += _case_plans(st, L, by_key, upstream, singles, ctl_keys, matched, cfg,
                                     rng, removal_sets, available)
        if plans:
            if trials is not None:
                trials[0] += len(removal_sets)
            clean_h = {j: h.activations[pt][0, t] for j, pt in resid.items()}
            pre_t = {L: p[t] for L, p in clean_pre.items()}
            skip = path.get("skip_layers", True)
            z_rows = _run_token(model, saes, input_ids, t, removal_sets, cfg.batch_rows,
                                clean_h if skip else None)
            err = _path_error(z_rows, pre_t)
            if skip and not err <= PATH_TOLERANCE:
                # Skipping the early layers does not reproduce this model's forward: run every
                # layer from here on (the KV-cache path).
                path["skip_layers"] = skip = False
                path["skip_error"] = err
                z_rows = _run_token(model, saes, input_ids, t, removal_sets, cfg.batch_rows)
                err = _path_error(z_rows, pre_t)
            path.setdefault("skip_layers", skip)
            path["max_error"] = max(path.get("max_error", 0.0), err)
            out += _collect(plans, removal_sets, z_rows, unit, dec_norm)
    return out


def _fid(slot: tuple, p: int) -> str:
    return f"{slot[1]}/{slot[0]}/{p}"


def _trial(removal_sets: dict, L: int, removed: tuple) -> tuple:
    """The key of the trial that removes `removed` ((slot, feature, amount), ...) at layer L's
    token, registered once."""
    key = (L, tuple(sorted(removed)))
    removal_sets.setdefault(key, len(removal_sets))
    return key


def _case_setup(index, L, f, t, text_no, rank, n_active, act_t, by_key, pearson, perm, cfg,
                live, width) -> dict | None:
    """The case of target f, its candidates and the top-1 predecessor of each kind that is
    active on the token; None for a "From nowhere" target (no active top-1 predecessor: left
    out, as in the paper)."""
    preds = _slots_of(index, L)
    group = []
    fired = {}
    for k in preds:
        p = index.predecessor(L, f, k)
        fired[k] = p is not None and ((p[0], p[1]), p[2]) in by_key
        if fired[k]:
            assert p is not None
            group.append(((p[0], p[1]), p[2], p[3]))
    if not group:
        return None
    group.sort(key=lambda c: -c[2])  # the most similar first: top1_cosine
    cands = [c for c in _predecessor_candidates(index, L, f, live=live) if c[0] in act_t]
    # Everything a method could name is a candidate: the top-k lists, SAE Match, Pearson.
    named = {(c[0], c[1]) for c in _predecessor_candidates(index, L, f)}
    partner = {}
    if f in perm.get(L, {}):
        partner["permutation"] = (("resid_post", L - 1), perm[L][f])
    if f in pearson.get(L, {}):
        partner["top1_pearson"] = pearson[L][f]
    named |= set(partner.values())
    case = {"text": text_no, "token": t, "layer": L, "feature": f, "group": _group(fired),
            "top1_similarity": float(cands[0][2]) if cands else float(group[0][2]),
            "target_rank": rank, "rank_bin": rank_bin(rank, width), "n_active": n_active,
            "target_choice": cfg.target_choice}
    return {"case": case, "group": group, "cands": cands, "named": named, "partner": partner}


def _case_plans(st, L, by_key, upstream, singles, ctl_keys, matched, cfg, rng, removal_sets,
                available) -> list[tuple]:
    """(case, method, [trial keys], extra) for every available method of one case; [] keys
    when the method has nothing to remove there."""
    case, group, cands, named, partner = (st["case"], st["group"], st["cands"], st["named"],
                                          st["partner"])

    def removal(slot, p):  # (slot, p, its activation at the token), or None when inactive
        u = by_key.get((slot, p))
        return None if u is None else (u[0], u[1], u[2])

    def one(chosen) -> list[tuple]:
        removed = tuple(r for r in (removal(c[0], c[1]) for c in chosen) if r is not None)
        return [_trial(removal_sets, L, removed)] if removed else []

    plans: list[tuple[dict, str, list, dict]] = [
        (case, "top1_cosine", one(group[:1]), {}),
        (case, "predecessor_group", one(group), {}),
        (case, "top5_cosine", one(cands[:5]), {}),
        (case, "random_top5",
         one([cands[int(rng.integers(min(5, len(cands))))]] if cands else []), {})]
    for m in ("permutation", "top1_pearson"):
        if m in available:
            plans.append((case, m, one([partner[m]]) if m in partner else [], {}))
    plans.append((case, "exhaustive", list(singles), {}))
    plans.append((case, "exhaustive_top5",
                  [_trial(removal_sets, L, (r,)) for r in
                   (removal(c[0], c[1]) for c in cands) if r is not None], {}))
    plans.append((case, "exhaustive_control", list(ctl_keys), {"matched": matched}))
    # The matched controls: active upstream features no method names, of the same removal
    # norm as the member they stand in for.
    excluded = set(named) | {(c[0], c[1]) for c in group}
    top1 = by_key[(group[0][0], group[0][1])]
    ctl = pick_control(top1, upstream, excluded, cfg.control_tolerance, rng)
    if ctl is None:
        plans.append((case, "control_matched", [], {}))
    else:
        (slot, p, a, _), ratio = ctl
        plans.append((case, "control_matched", [_trial(removal_sets, L, ((slot, p, a),))],
                      {"control_norm_ratio": ratio, "matched": _fid(top1[0], top1[1])}))
    chosen: list[tuple] = []
    ratios: list[float] = []
    for g in group:
        c = pick_control(by_key[(g[0], g[1])], upstream,
                         excluded | {(x[0], x[1]) for x in chosen}, cfg.control_tolerance, rng)
        if c is not None:
            chosen.append((c[0][0], c[0][1], c[0][2]))
            ratios.append(c[1])
    plans.append((case, "control_group", [_trial(removal_sets, L, tuple(chosen))] if chosen else [],
                  {"control_norm_ratio": float(np.prod(ratios)) ** (1 / len(ratios))
                   if ratios else float("nan"),
                   "matched": ",".join(_fid(g[0], g[1]) for g in group)}))
    return [p for p in plans if p[1] in available]


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


@contextmanager
def _skipping(model, start: int, h_prev: torch.Tensor | None, n: int):
    """Skip decoder layers 0..start-1 of the next forward: layer start-1 returns `h_prev`
    ([d_model], the clean residual stream after it at the token, for all n rows) and the
    layers below it pass their input through. Hooks on those layers still fire (an edit at
    resid_post start-1 applies to h_prev). Nothing is skipped when start is 0."""
    if start <= 0 or h_prev is None:
        yield
        return
    mods = [model.layer_module(i) for i in range(start)]
    value = h_prev.reshape(1, 1, -1).expand(n, 1, -1).contiguous()

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def constant(*args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return value.to(device=x.device, dtype=x.dtype)

    try:
        for i, m in enumerate(mods):
            m.forward = constant if i == start - 1 else passthrough
        yield
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


def _trial_cache(prefix, n: int, lo: int, hi: int):
    """The clean prefix's KV cache for n trial rows. When the layers below `lo` are skipped,
    only layers lo..hi (the ones the rows run) are copied and repeated n times; the others stay
    shared and unrepeated (they never run; only their lengths are read, for the masks)."""
    layers = getattr(prefix, "layers", None)
    if lo <= 0 or not isinstance(layers, list):
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(n)
        return cache
    cache = copy.copy(prefix)
    cache.layers = list(layers)
    for i in range(lo, min(hi, len(layers) - 1) + 1):
        layer = copy.deepcopy(layers[i])
        layer.batch_repeat_interleave(n)
        cache.layers[i] = layer
    return cache


def _first_block(chunk, L: int) -> int:
    """The first decoder layer a chunk's removals change: block j for an edit inside it
    (mlp_out j, attn_out j, ...), j + 1 for resid_post j; L when nothing is removed."""
    start = L
    for _, removed in chunk:
        for (pos, j), _, _ in removed:
            start = min(start, j + 1 if pos == "resid_post" else j)
    return max(start, 0)


def _run_token(model, saes, input_ids, t, removal_sets, batch_rows, clean_h=None) -> dict:
    """Run every trial row of token t: {layer: (activations, pre-activations)} of R_L at t, each
    [n_rows_of_that_layer, d_sae], rows in the order of their keys (by row number). A key's
    removals are (slot, feature, amount): h_slot <- h_slot - amount * W_dec[feature] / scale.

    Every row is a one-token forward over the clean prefix's KV cache. With `clean_h` ({layer j:
    the clean resid_post j at t [d_model]}) the layers below the first block a chunk's removals
    change are skipped (they are the same for every row: the clean residual stream), so a
    trial at R_L usually runs block L alone."""
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
    pre_new: dict[int, list[torch.Tensor]] = {}
    by_layer: dict[int, list] = {}
    for k in keys:
        by_layer.setdefault(k[0], []).append(k)
    for L, lkeys in by_layer.items():
        sae_t = saes[("resid_post", L)]
        for a in range(0, len(lkeys), batch_rows):
            chunk = lkeys[a:a + batch_rows]
            n = len(chunk)
            deltas: dict[tuple, torch.Tensor] = {}
            for row, (_, removed) in enumerate(chunk):
                for slot, p, amount in removed:
                    sae = saes[slot]
                    if slot not in deltas:
                        deltas[slot] = torch.zeros(n, 1, sae.d_in, device=model.device)
                    v = sae.W_dec[p].float() / sae.input_scale  # [d_model]
                    deltas[slot][row, 0] -= amount * v
            edits = {HookPoint(*s): (lambda d: (lambda act: act + d.to(act.dtype)))(d)
                     for s, d in deltas.items()}
            start = _first_block(chunk, L) if clean_h is not None else 0
            cache = None if prefix is None else _trial_cache(prefix, n, start, L)
            out = HookPoint("resid_post", L)
            with torch.inference_mode(), \
                    _skipping(model, start, (clean_h or {}).get(start - 1), n), \
                    Hooks(model, capture=[out], edits=edits, stop_early=True) as h:
                body(input_ids=token.expand(n, 1), use_cache=cache is not None,
                     **{cache_kw: cache})
            x = h.activations[out][:, 0]  # [n, d_model]
            with torch.inference_mode():
                pre = sae_t.pre_acts(x)
                z_new.setdefault(L, []).append(sae_t.activate(pre).float())
                pre_new.setdefault(L, []).append(pre.float())
    return {L: (torch.cat(z_new[L]), torch.cat(pre_new[L])) for L in z_new}


PATH_TOLERANCE = 5e-2  # the largest relative error of an unedited trial row that is accepted


def _path_error(z_rows: dict, clean_pre: dict) -> float:
    """How far the unedited trial rows are from the clean forward's pre-activations of R_L at
    the token: max |error| / max |pre-activation| over the layers (float noise: ~1e-6 in
    float32, ~1e-2 in bfloat16; a broken path: ~1)."""
    worst = 0.0
    for L, (_, pres) in z_rows.items():
        ref = clean_pre[L].float()
        err = float((pres[0] - ref).abs().max())  # row 0 of each layer: the unedited one
        worst = max(worst, err / max(float(ref.abs().max()), 1e-6))
    return worst if math.isfinite(worst) else math.inf


def _collect(plans, removal_sets, z_rows, unit, dec_norm) -> list[dict]:
    """One row per (case, method). For methods with several trials (the exhaustive ones), the
    best single removal under each rule: the lowest z_new (ties: the lowest pre-activation) for
    the rank rule, the lowest pre-activation for the threshold rule (`removed_threshold`)."""
    order = {}  # key -> position within its layer's rows
    per_layer: dict[int, int] = {}
    for k in sorted(removal_sets, key=lambda k: (k[0], removal_sets[k])):
        order[k] = per_layer.get(k[0], 0)
        per_layer[k[0]] = order[k] + 1
    rows = []
    for case, method, keys, extra in plans:
        L, f = case["layer"], case["feature"]
        zs, pres = z_rows[L]
        z_old = float(zs[order[(L, ())], f])
        pre_old = float(pres[order[(L, ())], f])
        if z_old <= 0:
            continue  # inactive on the trial path (a TopK tie at the margin): not a case at all
        row = {**case, "method": method, "z_old": z_old, "pre_old": pre_old,
               "control_norm_ratio": extra.get("control_norm_ratio", float("nan")),
               "tried": len(keys)}
        if not keys:  # nothing to remove: not deactivated, no change
            rows.append({**row, "z_new": z_old, "pre_new": pre_old, "change": 0.0,
                         "deactivated": False, "removed_nothing": True, "removed": "",
                         "removed_threshold": "", "removed_similarity": float("nan"),
                         "removed_norm": 0.0, "matched": ""})
            continue
        pos = torch.tensor([order[k] for k in keys], device=zs.device)
        vals = zs[pos, f].cpu().numpy()  # [n_keys]
        pv = pres[pos, f].cpu().numpy()
        best = int(np.lexsort((pv, vals))[0])
        best_t = int(np.argmin(pv))
        z_new = max(float(vals[best]), 0.0)
        removed = keys[best][1]
        target_dir = unit[("resid_post", L)][f]
        sims = [float(unit[s][p] @ target_dir) for s, p, _ in removed]
        matched = extra.get("matched", "")
        rows.append({**row, "z_new": z_new, "pre_new": float(pv[best_t]),
                     "change": 1.0 - z_new / z_old, "deactivated": z_new <= 0.0,
                     "removed_nothing": False, "removed": _removed_str(removed),
                     "removed_threshold": _removed_str(keys[best_t][1]),
                     "removed_similarity": max(sims) if sims else float("nan"),
                     "removed_norm": float(sum(abs(a) * float(dec_norm[s][p])
                                               for s, p, a in removed)),
                     "matched": matched.get(keys[best], "") if isinstance(matched, dict)
                     else matched})
    return rows


def _removed_str(removed) -> str:
    return ",".join(_fid(s, p) for s, p, _ in removed)


# --- the threshold rule --------------------------------------------------------------------------
def _thresholds(saes, layers, kth: dict) -> dict[int, tuple[str, Any]]:
    """{layer: (source, θ)}: the SAE's threshold tensor [d_sae] (sae_threshold); else the mean
    k-th largest pre-activation over the clean content tokens (mean_kth_preactivation, a
    scalar); else 0 (relu_zero: a ReLU SAE's own rule)."""
    out: dict[int, tuple[str, Any]] = {}
    for L in layers:
        sae = saes[("resid_post", L)]
        if sae.threshold is not None:
            out[L] = ("sae_threshold", sae.threshold.float().cpu().numpy())
        elif sae.k and kth.get(L, [0.0, 0])[1] > 0:
            s, n = kth[L]
            out[L] = ("mean_kth_preactivation", float(s / n))
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


def _threshold_summary(thetas: dict, cases: pd.DataFrame) -> dict:
    r4 = lambda x: round(float(x), 4)  # noqa: E731
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
    return {b: _agg(groups[b], how) for b in sorted(groups, key=_bin_start)}


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


def _precise_enough(rows: list[dict], cfg: ValidateConfig) -> bool:
    """Stop adding texts once every headline rate's 95% CI half-width is <= cfg.ci_halfwidth."""
    if cfg.ci_halfwidth is None:
        return True
    hw = _headline_halfwidths(rows, cfg.interval)
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
    bins = sorted({b for m in methods for b in table[m]}, key=_bin_start)
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
    bins = sorted({b for m in methods for b in table[m]}, key=_bin_start)
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

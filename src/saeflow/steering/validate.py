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

The modules: validate_config.py (ValidateConfig, method names, rank bins; import-light),
validate_design.py (targets, each case's trials, the matched controls), lm/trials.py (the
one-token trial runner), validate_tables.py (the threshold rule, summaries with CIs from
saeflow.intervals, markdown), rsweep.py (the r sweep: the relative change of the LM loss when a
flow graph's features are rescaled by r). This module runs the experiment (clean forward,
trials, one row per case and method) and re-exports their public names.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from saeflow.errors import MissingResultError, ValidateError
from saeflow.evolution.tables import open_stats
from saeflow.features.liveness import liveness_from_index
from saeflow.flow.graphs import FlowIndex
from saeflow.ids import Slot
from saeflow.intervals import ci95, clustered_ci, wilson_ci
from saeflow.lm.corpora import Corpus
from saeflow.lm.hooks import HookPoint, Hooks, model_body
from saeflow.lm.trials import PATH_TOLERANCE, path_error, run_token
from saeflow.steering.plans import flow_for_pack
from saeflow.steering.rsweep import pick_seeds, r_sweep, write_r_sweep
from saeflow.steering.validate_config import (
    HEADLINE_METHODS,
    HEADLINE_RANKS,
    KINDS,
    METHODS,
    PAIRS,
    PAPER_LAYERS,
    PAPER_TABLE1,
    RANK_BIN,
    RULES,
    SIMILARITY_BINS,
    TARGET_CHOICES,
    VALIDATE_DIR,
    ValidateConfig,
    default_layers,
    paper_layers,
    rank_bin,
    rank_bin_width,
)
from saeflow.steering.validate_design import (
    Design,
    MethodTrials,
    TokenLayer,
    TrialSet,
    Upstream,
    case_setup,
    choose_targets,
    draw_inactive_matches,
    feature_name,
    method_trials,
    pearson_top1,
    permutation_partners,
    pick_control,
    slots_of,
)
from saeflow.steering.validate_tables import (
    KthSum,
    apply_threshold_rule,
    breakdown_markdown,
    ci_status,
    paired,
    paired_differences,
    paired_markdown,
    precise_enough,
    rank_rule_markdown,
    summarize,
    table_markdown,
    threshold_summary,
    thresholds,
)
from saeflow.store import write_json_atomic, write_parquet_atomic

__all__ = [
    "HEADLINE_METHODS", "HEADLINE_RANKS", "KINDS", "METHODS", "PAIRS", "PAPER_LAYERS",
    "PAPER_TABLE1", "RANK_BIN", "RULES", "SIMILARITY_BINS", "TARGET_CHOICES", "VALIDATE_DIR",
    "ValidateConfig", "apply_threshold_rule", "breakdown_markdown", "choose_targets", "ci95",
    "clustered_ci", "default_layers", "draw_inactive_matches", "load_summary", "paired",
    "paired_differences", "paired_markdown", "paper_layers", "pick_control", "pick_seeds",
    "r_sweep", "rank_bin", "rank_bin_width", "rank_rule_markdown", "run_validation",
    "summarize", "table_markdown", "wilson_ci", "write_r_sweep"]


@dataclass
class _Job:
    """One validation run: the model and SAEs, the design, the random stream of texts, tokens,
    targets and controls, and what the texts add up."""
    model: Any
    saes: dict  # {slot: SAE} of every R_L and every predecessor slot of the layers
    design: Design
    rng: np.random.Generator
    # layer -> the k-th largest pre-activation of R_L over the clean content tokens (θ of an
    # SAE without a threshold)
    kth: dict[int, KthSum] = field(default_factory=dict)
    trial_rows: int = 0
    # how the trials ran: skip_layers (early layers skipped), max_error (of an unedited row)
    path: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Clean:
    """The clean forward of one text: captured activations and the SAEs' codes."""
    acts: dict  # {HookPoint: [1, seq, width]}
    resid: dict[int, HookPoint]  # layer j -> resid_post j, up to the deepest target
    z: dict  # {slot: [seq, d_sae]} activations
    pre: dict[int, torch.Tensor]  # layer -> [seq, d_sae] pre-activations of R_L


def run_validation(pack, model, run: str | os.PathLike, cfg: ValidateConfig | None = None,
                   progress: bool = True) -> dict:
    """The deactivation experiment over RUN's flow; writes RUN/validate/{cases.parquet,
    summary.json} and returns the summary."""
    cfg = cfg or ValidateConfig()
    cfg.check()
    t0 = time.time()
    pack.check_model(model)
    job, stats, liveness = _prepare(pack, model, run, cfg)
    rows, n_text, documents = _run_texts(job, progress)
    if not rows:
        raise ValidateError("no active target features with an active predecessor were found; "
                            "try more texts or other layers")
    layers, width = job.design.layers, job.design.width
    cases = pd.DataFrame(rows)
    thetas = thresholds(job.saes, layers, job.kth)
    cases = apply_threshold_rule(cases, thetas)
    summary = summarize(cases, interval=cfg.interval)
    summary.update({"config": asdict(cfg), "layers": layers, "texts": n_text,
                    "n_texts": n_text, "split": cfg.split, "documents": documents,
                    "targets": summary["cases"], "trial_rows": job.trial_rows,
                    "trial_path": {k: (round(v, 8) if isinstance(v, float) else v)
                                   for k, v in job.path.items()},
                    "rank_bin_width": {str(L): w for L, w in width.items()},
                    "threshold": threshold_summary(thetas, cases),
                    "has_pearson": stats is not None, "seconds": round(time.time() - t0, 1),
                    "paper_table1": PAPER_TABLE1,
                    "dead_latents": (liveness.summary() if liveness is not None else
                                     {"source": "kept" if cfg.keep_dead else "unknown"}),
                    "ci_target": ci_status(summary, cfg)})
    _write(Path(run) / VALIDATE_DIR, cases, summary)
    return summary


def _prepare(pack, model, run, cfg: ValidateConfig):
    """The job (layers, lookups, SAEs, liveness), the statistics (None when RUN has none) and
    the liveness."""
    flow = flow_for_pack(pack, run, model)
    index = FlowIndex(flow)
    layers = cfg.layers or default_layers(model.n_layers)
    layers = [L for L in layers if L in index.pred and ("resid_post", L) in pack]
    if not layers:
        raise ValidateError(f"none of the layers asked has a residual SAE with predecessors "
                            f"(flow layers {sorted(index.pred)})")
    try:
        stats = open_stats(run)
    except MissingResultError:
        stats = None
    pearson = {L: pearson_top1(stats, L) for L in layers}
    perm = {L: permutation_partners(pack, L) for L in layers}
    # A method runs on every case of the run or on none: it is left out only when no layer has
    # what it needs (no statistics, no R_{L-1} SAE).
    available = set(METHODS)
    if not any(pearson.values()):
        available.discard("top1_pearson")
    if not any(perm.values()):
        available.discard("permutation")
    slots = sorted({Slot("resid_post", L) for L in layers} |
                   {s for L in layers for s in slots_of(index, L).values() if s in pack})
    saes: dict[Any, Any] = {s: pack.sae(*s, device=model.device) for s in slots}
    width = {L: rank_bin_width(saes[Slot("resid_post", L)]) for L in layers}
    liveness = None if cfg.keep_dead else liveness_from_index(run, pack)
    live = None
    if liveness is not None:
        live = {s: liveness.live(s) for s in slots if liveness.live(s) is not None}
    design = Design(cfg=cfg, index=index, layers=layers, pearson=pearson, perm=perm,
                    available=available, width=width, live=live)
    job = _Job(model=model, saes=saes, design=design, rng=np.random.default_rng(cfg.seed))
    return job, stats, liveness


def _run_texts(job: _Job, progress: bool) -> tuple[list[dict], int, list[list[int]]]:
    """The case rows of every text, the number of texts and each text's documents."""
    from tqdm.auto import tqdm

    cfg, model = job.design.cfg, job.model
    corpus = Corpus.from_spec(cfg.corpus, seed=cfg.seed)
    limit = cfg.max_texts if cfg.ci_halfwidth else cfg.texts
    batches = corpus.token_batches(model.tokenizer, 1, cfg.ctx_len,
                                   max_tokens=limit * cfg.ctx_len * 2, split=cfg.split)
    rows: list[dict] = []
    documents: list[list[int]] = []
    bar = tqdm(total=limit, desc="validate", unit="text", disable=not progress)
    n_text = 0
    for b in batches:
        if n_text >= limit or (n_text >= cfg.texts and precise_enough(rows, cfg)):
            break
        content = torch.nonzero(b.content_mask()[0]).flatten().tolist()
        if len(content) < cfg.tokens_per_text:
            continue
        tokens = sorted(job.rng.choice(content, cfg.tokens_per_text, replace=False).tolist())
        rows += _validate_text(job, b.input_ids, tokens, n_text, content)
        documents.append(sorted({int(d) for d in b.doc_ids[0].tolist() if d >= 0}))
        n_text += 1
        bar.update(1)
    bar.close()
    return rows, n_text, documents


def _validate_text(job: _Job, input_ids, tokens: list[int], text_no: int,
                   content: list[int]) -> list[dict]:
    """All trials on one text: a clean forward, then per token the trials of every target's
    methods, run as one-token forwards over the prefix's KV cache."""
    input_ids = input_ids.to(job.model.device)
    clean = _clean_pass(job, input_ids, content)
    saes = job.saes
    # Unit decoder directions, for the similarity of what was removed to the target, and the
    # decoder norms in the input's units, for removal norms.
    unit = {s: sae.W_dec.float() / sae.W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
            for s, sae in saes.items()}  # [d_sae, d_model]
    dec_norm = {s: sae.W_dec.float().norm(dim=1) / sae.input_scale
                for s, sae in saes.items()}  # [d_sae]
    out = []
    for t in tokens:
        trials = TrialSet()
        act_t = {s: zs[t] for s, zs in clean.z.items()}  # [d_sae] activations at t
        plans: list[MethodTrials] = []
        for L in job.design.layers:
            plans += _layer_trials(job, L, t, text_no, act_t, dec_norm, trials)
        if plans:
            job.trial_rows += len(trials)
            z_rows = _run_trials(job, input_ids, t, trials, clean)
            out += _collect(plans, trials.rows, z_rows, unit, dec_norm)
    return out


def _clean_pass(job: _Job, input_ids, content: list[int]) -> _Clean:
    """The clean forward up to the deepest target, the SAEs' codes, and the k-th largest
    pre-activation of each R_L over the content tokens (into job.kth)."""
    model, saes, layers = job.model, job.saes, job.design.layers
    points = {s: HookPoint(*s) for s in saes}
    # The clean residual stream after every layer up to the deepest target: trials start from it.
    resid = {j: HookPoint("resid_post", j) for j in range(max(layers) + 1)}
    with torch.inference_mode(), Hooks(model, capture={*points.values(), *resid.values()},
                                       stop_early=True) as h:
        model_body(model)(input_ids=input_ids, use_cache=False)
    z, clean_pre = {}, {}
    with torch.inference_mode():
        for s, pt in points.items():
            sae = saes[s]
            pre = sae.pre_acts(h.activations[pt][0])  # [seq, d_sae]
            z[s] = sae.activate(pre).float()
            if s[0] == "resid_post" and s[1] in layers:
                clean_pre[s[1]] = pre
            if content and s[0] == "resid_post" and s[1] in layers and sae.threshold is None \
                    and sae.k:
                vals = pre[content].float().topk(min(int(sae.k), sae.d_sae), dim=-1).values
                acc = job.kth.setdefault(s[1], KthSum())
                acc.total += float(vals[:, -1].sum())
                acc.count += len(content)
    return _Clean(h.activations, resid, z, clean_pre)


def _upstream(pred_slots, act_t: dict, dec_norm: dict) -> list[Upstream]:
    """Every active upstream feature at the token, with its removal norm |a v|."""
    out = []
    for s in pred_slots:
        on = torch.nonzero(act_t[s] > 0).flatten()  # [n_on]
        a = act_t[s][on]
        norm = a * dec_norm[s][on]
        out += [Upstream(s, int(p), float(x), float(n))
                for p, x, n in zip(on.tolist(), a.tolist(), norm.tolist())]
    return out


def _layer_trials(job: _Job, L: int, t: int, text_no: int, act_t: dict, dec_norm: dict,
                  trials: TrialSet) -> list[MethodTrials]:
    """The targets at (token t, layer L) and their methods' trials (registered in `trials`)."""
    design, cfg = job.design, job.design.cfg
    pred_slots = [s for s in slots_of(design.index, L).values() if s in act_t]
    upstream = _upstream(pred_slots, act_t, dec_norm)
    at = TokenLayer(L, upstream, {u.ref: u for u in upstream}, [], [], {})
    zt = act_t[("resid_post", L)]
    active = torch.nonzero(zt > 0).flatten()
    active = active[zt[active].argsort(descending=True)]  # rank 0 = most active
    active_l, acts_l = active.tolist(), zt[active].tolist()
    rank = {f: r for r, f in enumerate(active_l)}
    setups = []
    for f in choose_targets(active_l, acts_l, cfg.max_features, cfg.target_choice, job.rng):
        st = case_setup(design, at, f, rank[f], len(active_l), {"text": text_no, "token": t},
                        set(act_t))
        if st is not None:
            setups.append(st)
    if not setups:
        return []
    trials.add(L, ())  # the unedited row: z_old on the same path as z_new
    at.singles = [trials.add(L, (u.removal,)) for u in upstream]
    # exhaustive_control: one draw per active upstream feature at (t, L), shared by the
    # targets there (as exhaustive's trials are); no candidate of any of them.
    named = set().union(*(st.named for st in setups))
    draws = draw_inactive_matches(upstream, {s: act_t[s].cpu().numpy() for s in pred_slots},
                                  {s: v.cpu().numpy() for s, v in dec_norm.items()}, named,
                                  job.rng, design.live)
    at.control_keys = [trials.add(L, ((d.slot, d.feature, d.amount),)) for d in draws]
    at.control_matched = {k: feature_name(d.matched.slot, d.matched.feature)
                          for k, d in zip(at.control_keys, draws)}
    plans: list[MethodTrials] = []
    for st in setups:
        plans += method_trials(design, st, at, trials, job.rng)
    return plans


def _run_trials(job: _Job, input_ids, t: int, trials: TrialSet, clean: _Clean) -> dict:
    """Run token t's trials, skipping the early layers while that reproduces the clean
    forward (checked on the unedited rows; once it fails, every layer runs from then on)."""
    model, saes, path = job.model, job.saes, job.path
    batch_rows = job.design.cfg.batch_rows
    clean_h = {j: clean.acts[pt][0, t] for j, pt in clean.resid.items()}  # [d_model] each
    pre_t = {L: p[t] for L, p in clean.pre.items()}
    skip = path.get("skip_layers", True)
    z_rows = run_token(model, saes, input_ids, t, trials.rows, batch_rows,
                       clean_h if skip else None)
    err = path_error(z_rows, pre_t)
    if skip and not err <= PATH_TOLERANCE:
        path["skip_layers"] = skip = False
        path["skip_error"] = err
        z_rows = run_token(model, saes, input_ids, t, trials.rows, batch_rows)
        err = path_error(z_rows, pre_t)
    path.setdefault("skip_layers", skip)
    path["max_error"] = max(path.get("max_error", 0.0), err)
    return z_rows


def _row_order(removal_sets: dict) -> dict:
    """{trial key: its row within its layer's rows}."""
    order = {}
    per_layer: dict[int, int] = {}
    for k in sorted(removal_sets, key=lambda k: (k[0], removal_sets[k])):
        order[k] = per_layer.get(k[0], 0)
        per_layer[k[0]] = order[k] + 1
    return order


def _collect(plans: list[MethodTrials], removal_sets, z_rows, unit, dec_norm) -> list[dict]:
    """One row per (case, method). For methods with several trials (the exhaustive ones), the
    best single removal under each rule: the lowest z_new (ties: the lowest pre-activation) for
    the rank rule, the lowest pre-activation for the threshold rule (`removed_threshold`)."""
    order = _row_order(removal_sets)
    rows = []
    for mt in plans:
        case, keys = mt.case, mt.keys
        L, f = case["layer"], case["feature"]
        zs, pres = z_rows[L]  # [n_rows, d_sae] each
        z_old = float(zs[order[(L, ())], f])
        pre_old = float(pres[order[(L, ())], f])
        if z_old <= 0:
            continue  # inactive on the trial path (a TopK tie at the margin): not a case at all
        row = {**case, "method": mt.method, "z_old": z_old, "pre_old": pre_old,
               "control_norm_ratio": mt.control_norm_ratio, "tried": len(keys)}
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
        removed = keys[best].removed
        target_dir = unit[("resid_post", L)][f]
        sims = [float(unit[s][p] @ target_dir) for s, p, _ in removed]
        rows.append({**row, "z_new": z_new, "pre_new": float(pv[best_t]),
                     "change": 1.0 - z_new / z_old, "deactivated": z_new <= 0.0,
                     "removed_nothing": False, "removed": _removed_str(removed),
                     "removed_threshold": _removed_str(keys[best_t].removed),
                     "removed_similarity": max(sims) if sims else float("nan"),
                     "removed_norm": float(sum(abs(a) * float(dec_norm[s][p])
                                               for s, p, a in removed)),
                     "matched": mt.matched if mt.matched_by_key is None
                     else mt.matched_by_key.get(keys[best], "")})
    return rows


def _removed_str(removed) -> str:
    return ",".join(feature_name(s, p) for s, p, _ in removed)


def _write(out: Path, cases: pd.DataFrame, summary: dict) -> None:
    import pyarrow as pa

    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(pa.Table.from_pandas(cases, preserve_index=False),
                         out / "cases.parquet")
    write_json_atomic(out / "summary.json", summary)


def load_summary(run) -> dict:
    """RUN/validate/summary.json; MissingResultError when RUN has no validation yet."""
    p = Path(run) / VALIDATE_DIR / "summary.json"
    if not p.is_file():
        raise MissingResultError(f"{run} has no validation; run `saeflow validate`")
    return json.loads(p.read_text())

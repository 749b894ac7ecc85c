"""Causal validation of data-free predecessors by deactivation (flow paper, section 5.2).

On sampled texts and tokens, for each active residual feature f at R_L (a "target"), a method
picks predecessor(s) among R_{L-1}, M_L, A_L; each picked predecessor p that is active on the
token is removed there: h <- h - a_p v_p (h <- h + (r - 1) a v with r = 0), at p's position and
that token only. Then the target is re-encoded on the same token:
    activation change = 1 - z_new / z_old,   deactivated = (z_new == 0).
Methods: top-1 cosine, top-5 cosine, random among the top-5, permutation (SAE Match), top-1
Pearson (from RUN/stats when present), and an exhaustive search over the active candidates of
the top-k lists (each alone; the best one), the upper bound.

Also the r sweep: the relative change of the LM loss when a flow graph's features are rescaled
by r (rescale plans at every token).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .hooks import HookPoint, Hooks

METHODS = ("top1_cosine", "top5_cosine", "random_top5", "permutation", "top1_pearson",
           "exhaustive")
KINDS = ("res", "mlp", "attn")
VALIDATE_DIR = "validate"

# The paper's Table 1 (Gemma 2 2B + Gemma Scope, 1,894 features), for side-by-side reports.
PAPER_TABLE1 = {"top1_cosine": (0.75, 0.65), "top1_pearson": (0.74, 0.65),
                "exhaustive": (0.83, 0.73)}


class ValidateError(ValueError):
    pass


@dataclass
class ValidateConfig:
    layers: list[int] | None = None  # default: about 1/4, 1/2 and 3/4 of the depth
    texts: int = 12
    tokens_per_text: int = 4
    max_features: int = 10  # targets per (text, token, layer), the most active first
    ctx_len: int = 64
    corpus: str = "wiki=0.8,python=0.2"
    seed: int = 0
    batch_rows: int = 32  # intervened copies of a text per forward
    r_values: list[float] = field(default_factory=lambda: [-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0])
    r_graphs: int = 4  # flow graphs in the r sweep
    r_texts: int = 8


def default_layers(n_layers: int) -> list[int]:
    return sorted({max(1, round(n_layers * q)) for q in (0.25, 0.5, 0.75)})


def _predecessor_candidates(index, L: int, f: int, k: int = 5) -> list[tuple]:
    """[(slot, feature, similarity)] of the top-k predecessors per kind, best first overall."""
    out = []
    for kind in KINDS:
        for rank in range(k):
            p = index.predecessor(L, f, kind, rank)
            if p is None:
                break
            out.append(((p[0], p[1]), p[2], p[3]))
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
    from .flow import slot_directions
    from .match import permutation_match

    if ("resid_post", L - 1) not in pack:
        return {}
    rows, cols, _ = permutation_match(slot_directions(pack, ("resid_post", L - 1)),
                                      slot_directions(pack, ("resid_post", L)))
    return {int(c): int(r) for r, c in zip(rows, cols)}


def run_validation(pack, model, run: str | os.PathLike, cfg: ValidateConfig | None = None,
                   progress: bool = True) -> dict:
    """The deactivation experiment over RUN's flow; writes RUN/validate/{cases.parquet,
    summary.json} and returns the summary."""
    from tqdm.auto import tqdm

    from .corpora import Corpus
    from .graphs import FlowIndex
    from .interventions import flow_for_pack
    from .stats_tables import open_stats

    cfg = cfg or ValidateConfig()
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
    rng = np.random.default_rng(cfg.seed)
    corpus = Corpus.from_spec(cfg.corpus, seed=cfg.seed)
    batches = corpus.token_batches(model.tokenizer, 1, cfg.ctx_len,
                                   max_tokens=cfg.texts * cfg.ctx_len * 2)
    rows = []
    bar = tqdm(total=cfg.texts, desc="validate", unit="text", disable=not progress)
    n_text = 0
    for b in batches:
        if n_text >= cfg.texts:
            break
        content = torch.nonzero(b.content_mask()[0]).flatten().tolist()
        if len(content) < cfg.tokens_per_text:
            continue
        tokens = sorted(rng.choice(content, cfg.tokens_per_text, replace=False).tolist())
        rows += _validate_text(model, saes, index, b.input_ids, tokens, layers, pearson, perm,
                               cfg, rng, n_text)
        n_text += 1
        bar.update(1)
    bar.close()
    if not rows:
        raise ValidateError("no active target features with an active predecessor were found; "
                            "try more texts or other layers")
    cases = pd.DataFrame(rows)
    summary = summarize(cases)
    summary.update({"config": asdict(cfg), "layers": layers, "texts": n_text,
                    "has_pearson": stats is not None, "seconds": round(time.time() - t0, 1),
                    "paper_table1": PAPER_TABLE1})
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
                   text_no) -> list[dict]:
    """All trials on one text: a clean forward, then batches of intervened copies."""
    points = {s: HookPoint(*s) for s in saes}
    with torch.inference_mode(), Hooks(model, capture=points.values(), stop_early=True) as h:
        model.hf.get_submodule(model.arch.layers_path.rsplit(".", 1)[0])(
            input_ids=input_ids.to(model.device))
    z = {s: saes[s].encode(h.activations[pt][0]).float() for s, pt in points.items()}  # [seq, d]
    trials = []  # (case, method, [(slot, feature, activation)])
    for L in layers:
        preds = _slots_of(index, L)
        for t in tokens:
            zt = z[("resid_post", L)][t]
            active = torch.nonzero(zt > 0).flatten()
            active = active[zt[active].argsort(descending=True)][:cfg.max_features].tolist()
            for f in active:
                case = {"text": text_no, "token": t, "layer": L, "feature": f,
                        "z_old": float(zt[f])}
                top1 = {k: index.predecessor(L, f, k) for k in preds}
                fired = {k: p is not None and ((p[0], p[1]) in z) and
                         bool(z[(p[0], p[1])][t, p[2]] > 0) for k, p in top1.items()}
                case["group"] = _group(fired)
                if not any(fired.values()):
                    continue  # "From nowhere": nothing upstream to remove
                cands = [c for c in _predecessor_candidates(index, L, f) if c[0] in z]
                case["top1_similarity"] = float(cands[0][2]) if cands else float("nan")

                def act(c):
                    return float(z[c[0]][t, c[1]])

                on = [c for c in cands if act(c) > 0]
                picks = {"top1_cosine": cands[:1], "top5_cosine": cands[:5],
                         "random_top5": [cands[int(rng.integers(min(5, len(cands))))]]
                         if cands else []}
                if f in perm.get(L, {}):
                    picks["permutation"] = [(("resid_post", L - 1), perm[L][f], None)]
                if f in pearson.get(L, {}):
                    slot, p = pearson[L][f]
                    if slot in z:
                        picks["top1_pearson"] = [(slot, p, None)]
                for m, chosen in picks.items():
                    chosen = [(c[0], c[1], act(c)) for c in chosen if act(c) > 0]
                    if chosen:
                        trials.append((case, m, chosen))
                for c in on:  # exhaustive: each active candidate alone
                    trials.append((case, "exhaustive", [(c[0], c[1], act(c))]))
    return _run_trials(model, saes, input_ids, trials, cfg.batch_rows)


def _group(fired: dict[str, bool]) -> str:
    from .evolution import group_name

    return group_name(fired.get("res", False), fired.get("mlp", False), fired.get("attn", False))


def _run_trials(model, saes, input_ids, trials, batch_rows) -> list[dict]:
    """Each trial = one copy of the text with its predecessors removed at its token; the copy's
    R_L at that token is re-encoded. Copies go in batches, truncated after their last token."""
    body = model.hf.get_submodule(model.arch.layers_path.rsplit(".", 1)[0])
    per_case: dict[tuple, dict] = {}
    order = sorted(range(len(trials)), key=lambda i: trials[i][0]["token"])
    for a in range(0, len(order), batch_rows):
        chunk = [trials[i] for i in order[a:a + batch_rows]]
        seq = max(c["token"] for c, _, _ in chunk) + 1
        ids = input_ids[:, :seq].repeat(len(chunk), 1).to(model.device)
        deltas: dict[tuple, torch.Tensor] = {}
        for row, (case, _, chosen) in enumerate(chunk):
            for slot, p, a_p in chosen:
                sae = saes[slot]
                if slot not in deltas:
                    deltas[slot] = torch.zeros(len(chunk), seq, sae.d_in, device=model.device)
                v = sae.W_dec[p].float() / sae.input_scale  # [d_model]
                deltas[slot][row, case["token"]] -= a_p * v
        targets = sorted({("resid_post", c["layer"]) for c, _, _ in chunk})
        edits = {HookPoint(*s): (lambda d: (lambda act: act + d.to(act.dtype)))(d)
                 for s, d in deltas.items()}
        with torch.inference_mode(), Hooks(model, capture=[HookPoint(*s) for s in targets],
                                           edits=edits, stop_early=True) as h:
            body(input_ids=ids)
        for row, (case, method, chosen) in enumerate(chunk):
            L, t, f = case["layer"], case["token"], case["feature"]
            x = h.activations[HookPoint("resid_post", L)][row, t]
            z_new = float(saes[("resid_post", L)].encode(x[None])[0, f])
            key = (case["text"], t, L, f)
            rec = per_case.setdefault(key, {**case, "trials": {}})
            rec["trials"].setdefault(method, []).append(
                (z_new, [f"{s[1]}/{s[0]}/{p}" for s, p, _ in chosen]))
    rows = []
    for rec in per_case.values():
        for method, results in rec["trials"].items():
            z_new, removed = min(results, key=lambda r: r[0])  # exhaustive: the best single one
            rows.append({"text": rec["text"], "token": rec["token"], "layer": rec["layer"],
                         "feature": rec["feature"], "group": rec["group"], "method": method,
                         "top1_similarity": rec["top1_similarity"],
                         "z_old": rec["z_old"], "z_new": z_new,
                         "change": 1.0 - z_new / rec["z_old"], "deactivated": z_new <= 0.0,
                         "removed": ",".join(removed), "tried": len(results)})
    return rows


def summarize(cases: pd.DataFrame) -> dict:
    """Success rate and mean activation change per method (overall and per layer), and per
    empirical group for the top-1 cosine predecessor."""
    def agg(df):
        return {"cases": int(len(df)), "success_rate": round(float(df.deactivated.mean()), 4),
                "mean_activation_change": round(float(df.change.clip(upper=1.0).mean()), 4)}

    out = {"methods": {}, "by_layer": {}, "by_group_top1": {}}
    for m in METHODS:
        sel = cases[cases.method == m]
        if len(sel):
            out["methods"][m] = agg(sel)
            out["by_layer"][m] = {str(L): agg(g) for L, g in sel.groupby("layer")}
    top1 = cases[cases.method == "top1_cosine"]
    out["by_group_top1"] = {g: agg(d) for g, d in top1.groupby("group")}
    # How much the answer depends on how alike the predecessor is (the cosine of the top-1).
    bins = [0.0, 0.3, 0.5, 0.7, 1.01]
    cut = pd.cut(top1.top1_similarity, bins, right=False)
    out["by_similarity_top1"] = {f"[{iv.left:.1f}, {min(iv.right, 1.0):.1f})": agg(d)
                                 for iv, d in top1.groupby(cut, observed=True)}
    return out


def _write(out: Path, cases: pd.DataFrame, summary: dict) -> None:
    from .store import write_json_atomic, write_parquet_atomic
    import pyarrow as pa

    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(pa.Table.from_pandas(cases, preserve_index=False),
                         out / "cases.parquet")
    write_json_atomic(out / "summary.json", summary)


def table_markdown(summary: dict) -> str:
    """The method table next to the paper's Table 1."""
    lines = ["| method | cases | success rate | mean activation change | paper (change, success) |",
             "|---|---|---|---|---|"]
    for m, r in summary["methods"].items():
        paper = PAPER_TABLE1.get(m)
        p = f"{paper[0]:.2f}, {100 * paper[1]:.0f}%" if paper else "-"
        lines.append(f"| {m} | {r['cases']} | {100 * r['success_rate']:.1f}% | "
                     f"{r['mean_activation_change']:.3f} | {p} |")
    return "\n".join(lines)


# --- the r sweep --------------------------------------------------------------------------------
def r_sweep(pack, model, run, seeds: list[str], r_values, texts: int = 8, ctx_len: int = 64,
            corpus: str = "wiki=0.8,python=0.2", seed: int = 0, t_res: float = 0.5) -> pd.DataFrame:
    """Relative change of the LM loss when every residual feature of each seed's flow graph is
    rescaled by r (at every token): (loss_r - loss_clean) / loss_clean."""
    from .corpora import Corpus
    from .graphs import trace
    from .interventions import CallScope, flow_for_pack, plan_edits, plan_from_graph

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
            scope = CallScope()
            lr = loss(plan_edits(plan, pack, scope, device=model.device), scope)
            rows.append({"seed": s, "nodes": len(plan.interventions), "r": r, "loss": lr,
                         "clean_loss": clean, "relative_change": (lr - clean) / clean})
    return pd.DataFrame(rows)


def pick_seeds(flow_run, n: int, layer: int | None = None, min_span: int = 3,
               t_res: float = 0.5, seed: int = 0) -> list[str]:
    """n residual features whose flow graphs span at least `min_span` layers (long chains)."""
    from .graphs import persistence

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
    from .interventions import flow_for_pack

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

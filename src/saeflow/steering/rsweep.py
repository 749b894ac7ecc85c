"""The r sweep of the validate stage: the relative change of the LM loss when every residual
feature of a flow graph is rescaled by r (rescale plans at every token), for a few long graphs;
written to RUN/validate/r_sweep.csv."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from saeflow.flow.graphs import persistence, trace
from saeflow.ids import Slot
from saeflow.lm.corpora import DEFAULT_SPEC, Corpus
from saeflow.lm.hooks import Hooks
from saeflow.steering.edits import CallScope, plan_edits
from saeflow.steering.plans import flow_for_pack, plan_from_graph
from saeflow.steering.validate_config import VALIDATE_DIR, ValidateConfig
from saeflow.store import atomic_path


def r_sweep(pack, model, run, seeds: list[str], r_values, texts: int = 8, ctx_len: int = 64,
            corpus: str = DEFAULT_SPEC, seed: int = 0, t_res: float = 0.5) -> pd.DataFrame:
    """Relative change of the LM loss when every residual feature of each seed's flow graph is
    rescaled by r (at every token): (loss_r - loss_clean) / loss_clean."""
    flow = flow_for_pack(pack, run, model)
    batch = next(iter(Corpus.from_spec(corpus, seed=seed + 1).token_batches(
        model.tokenizer, texts, ctx_len, max_tokens=texts * ctx_len)))
    ids, mask = batch.input_ids.to(model.device), batch.attention_mask.to(model.device)

    def loss(edits=None, scope=None) -> float:
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
            plan = plan_from_graph(G, r, "span", op="rescale")
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
    return [Slot("resid_post", cands[i][0]).feature(cands[i][1]) for i in sorted(pick)]


def write_r_sweep(pack, model, run, cfg: ValidateConfig):
    """The r sweep over cfg.r_graphs flow graphs, written to RUN/validate/r_sweep.csv."""
    flow = flow_for_pack(pack, run, model)
    seeds = pick_seeds(flow, cfg.r_graphs, seed=cfg.seed)
    df = r_sweep(pack, model, run, seeds, cfg.r_values, texts=cfg.r_texts, ctx_len=cfg.ctx_len,
                 corpus=cfg.corpus, seed=cfg.seed)
    with atomic_path(Path(run) / VALIDATE_DIR / "r_sweep.csv") as tmp:
        df.to_csv(tmp, index=False)
    return df

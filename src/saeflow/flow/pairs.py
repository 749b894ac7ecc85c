"""Any two SAEs, outside a family: open one by path (or PACK@LAYER/POSITION) and match its
features to another's (`saeflow match`)."""
from __future__ import annotations

from typing import Literal

import numpy as np

from saeflow.errors import FlowError, HookError, UnknownPositionError
from saeflow.flow.config import FlowConfig
from saeflow.flow.inputs import slot_directions
from saeflow.flow.match import null_top1, permutation_match, top_k_pairs
from saeflow.flow.tables import top1_columns, topk_column
from saeflow.ids import Slot
from saeflow.lm.model import describe_mapping
from saeflow.saes.packs import Pack
from saeflow.saes.recipes import open_pack


def open_sae_slot(spec: str) -> tuple[Pack, Slot]:
    """'PATH' (a folder holding one SAE) or 'PATH@LAYER/POSITION' -> (pack, slot)."""
    path, _, place = str(spec).partition("@")
    pack = open_pack(path)
    if place:
        try:
            slot = Slot.parse(place)
        except (HookError, UnknownPositionError):  # a malformed place or an unknown position
            raise FlowError(f"write the slot as PATH@LAYER/POSITION, e.g. {path}@12/resid_post; "
                            f"got {spec!r}") from None
        pack.info(*slot)  # clear error if absent
        return pack, slot
    if len(pack) != 1:
        raise FlowError(f"{path} holds {len(pack)} SAEs; name one as {path}@LAYER/POSITION")
    return pack, Slot.of(next(iter(pack.entries)))


def match_pair(a_spec: str, b_spec: str,
               method: Literal["decoder", "encoder", "folded", "permutation"] = "decoder",
               k: int = 5, model=None, precision: Literal["fp32", "bf16"] = "fp32",
               null_quantile: float = 0.99, null_samples: int = 2048):
    """Match every feature of SAE A to SAE B. Returns (summary dict, pyarrow Table).

    The table has one row per feature of A: `feature`, `s` (top-1 score), `match` (top-1 index),
    `top` (the top-k), `mutual` (B's best match is this feature again).
    """
    import pyarrow as pa

    cfg = FlowConfig(k=k, method=method, precision=precision, null_quantile=null_quantile,
                     null_samples=null_samples)
    (pa_, sa), (pb, sb) = open_sae_slot(a_spec), open_sae_slot(b_spec)
    A = slot_directions(pa_, sa, method, model).materialize(cfg.memory_budget_mb << 20)
    B = slot_directions(pb, sb, method, model).materialize(cfg.memory_budget_mb << 20)
    if A.d != B.d:
        raise FlowError(f"{a_spec} lives in width {A.d} and {b_spec} in width {B.d}; they cannot "
                        f"be compared (map attn_z SAEs with --model)")
    kw = cfg.match_kw(memory_budget=False)
    if method == "permutation":
        rows, cols, cos = permutation_match(A, B, **kw)
        row_i = np.full((A.n, 1), -1, np.int64)
        row_v = np.full((A.n, 1), np.nan, np.float32)
        row_i[rows, 0], row_v[rows, 0] = cols, cos
        mutual = row_i[:, 0] >= 0
    else:
        m = top_k_pairs(A, B, k=min(k, B.n, A.n), cols=True, precision=precision, **kw)
        assert m.col_indices is not None  # cols=True
        row_i, row_v = m.row_indices.numpy(), m.row_values.numpy()
        back = m.col_indices.numpy()[:, 0]
        mutual = back[row_i[:, 0]] == np.arange(A.n)
    null = null_top1(A, B, n=null_samples, seed=0, **kw)
    t_null = float(np.quantile(null, null_quantile))
    s = row_v[:, 0]
    valid = ~np.isnan(s)
    s1, i1 = top1_columns(row_i, row_v, A.n)
    table = pa.table({"feature": pa.array(np.arange(A.n, dtype=np.int32)), "s": s1,
                      "match": i1, "top": topk_column(row_i, row_v, A.n), "mutual": pa.array(mutual)})
    summary = {"a": a_spec, "b": b_spec, "a_slot": str(sa), "b_slot": str(sb),
               "n_a": A.n, "n_b": B.n, "method": method, "k": 1 if method == "permutation" else k,
               "mean_top1": float(s[valid].mean()), "median_top1": float(np.median(s[valid])),
               "null_threshold": t_null, "null_quantile": null_quantile,
               "share_above_null": float((s[valid] >= t_null).mean()),
               "share_mutual_top1": float(mutual.mean()),
               "share_above_0.5": float((s[valid] >= 0.5).mean()),
               "mapping": {"a": describe_mapping(model, sa.position) if model else sa.position,
                           "b": describe_mapping(model, sb.position) if model else sb.position}}
    return summary, table

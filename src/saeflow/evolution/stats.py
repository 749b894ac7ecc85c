"""Data-driven co-activation statistics between SAEs (feature evolution), built on sparsity.

For an upstream SAE U and a downstream SAE D read on the same tokens, we accumulate
    per feature:  n (tokens active), S = sum z, Q = sum z^2
    per pair:     C[i, j] = tokens where both are active, P[i, j] = sum z_U[i] z_D[j]
over co-active pairs only: each token activates tens of features, so only those pairs are visited,
never the dense d_U x d_D einsum. From these sums every measure
of the reference follows exactly:
    Pearson   (N P - S_i S_j) / sqrt((N Q_i - S_i^2)(N Q_j - S_j^2))
    Jaccard   C / (n_i + n_j - C)
    sufficiency P(j | i) = C / n_i,  necessity P(i | j) = C / n_j
    binary mutual information of the 2 x 2 table (C, n_i - C, n_j - C, N - n_i - n_j + C)

This module is the stage (which pairs, the pass, its outputs); config.py holds StatsConfig,
sums.py the running sums, measures.py the measures, shard.py one shard of the pass and
tables.py the files.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from saeflow.errors import MissingResultError, StatsError
from saeflow.evolution.config import StatsConfig
from saeflow.evolution.measures import dense_reference, measures
from saeflow.evolution.shard import StatsShard, StatsTargets, flow_predecessors
from saeflow.evolution.sums import PACKED_SORT_MAX_KEYS, PairAccumulator
from saeflow.evolution.tables import (
    COFIRE_FILE,
    STATS_DIR,
    STATS_MANIFEST,
    StatsRun,
    open_stats,
    write_cofire,
    write_groups,
    write_stats,
)
from saeflow.features.tables import open_index
from saeflow.ids import Slot
from saeflow.lm.hooks import capture
from saeflow.lm.model import resolve_dtype
from saeflow.saes.packs import pack_fingerprint
from saeflow.saes.scan import PassJob, PassParts, load_saes, pass_identity
from saeflow.scale import ScaleConfig
from saeflow.scale.shards import run_jobs
from saeflow.store import finished_pass

__all__ = ["COFIRE_FILE", "PACKED_SORT_MAX_KEYS", "PairAccumulator", "StatsConfig",
           "dense_reference", "measures", "run_stats", "stat_pairs", "stats_job",
           "write_cofire"]


def stat_pairs(pack, kind: str = "adjacent", positions: str = "all") -> list[tuple[Slot, Slot]]:
    """(upstream slot, downstream slot) pairs: same position at L -> L+1 ("adjacent", at
    `positions`), and/or R_{L-1} / M_L / A_L -> R_L ("flow")."""
    if kind not in ("adjacent", "flow", "both"):
        raise StatsError("pairs must be adjacent, flow or both")
    wanted = pack.positions if positions == "all" else [p.strip() for p in positions.split(",")]
    missing = [p for p in wanted if p not in pack.positions]
    if missing:
        raise StatsError(f"the pack has no SAEs at {', '.join(missing)} (it has "
                         f"{', '.join(pack.positions)})")
    out = []
    if kind in ("adjacent", "both"):
        for pos in wanted:
            for L in pack.layers(pos):
                if (pos, L + 1) in pack:
                    out.append((Slot(pos, L), Slot(pos, L + 1)))
    if kind in ("flow", "both"):
        for L in pack.layers("resid_post"):
            down = Slot("resid_post", L)
            for up in (Slot("resid_post", L - 1), Slot("mlp_out", L), Slot("attn_out", L)):
                if up in pack and (up, down) not in out:
                    out.append((up, down))
    if not out:
        raise StatsError(f"the pack has no SAE pairs for '{kind}' statistics (positions "
                         f"{pack.positions}, layers {pack.layers()}); adjacent pairs need the "
                         f"same position at consecutive layers, flow pairs need resid_post")
    return out


def stats_job(pack, model, out, cfg: StatsConfig | None = None, *, force: bool = False,
              progress: bool = True, max_by_feature: dict | None = None) -> PassJob | None:
    """The statistics' share of a corpus pass, or None when RUN already holds them."""
    cfg = cfg or StatsConfig()
    frac = cfg.active_fraction()
    pairs = stat_pairs(pack, cfg.pairs, cfg.positions)
    pack.check_model(model)
    root = Path(out) / STATS_DIR
    ident = pass_identity(pack_fingerprint(pack), model, cfg)
    flow = flow_predecessors(out, pack)
    if flow is not None:  # the co-firing counts depend on the flow: part of the identity
        ident["flow"] = flow.cache_key
    predecessors = flow.layers if flow is not None else {}
    if finished_pass(root / STATS_MANIFEST, ident, force, StatsError, "statistics"):
        return None
    slot_set = {s for pr in pairs for s in pr}
    for L, info in predecessors.items():
        slot_set |= {s for s in info.slots.values() if s} | {Slot("resid_post", L)}
    slots = sorted(slot_set)
    spec = cfg.spec(cfg.checkpoint_every_s)
    maxima = None
    if frac is not None:
        maxima = max_by_feature or _maxima_from_index(out, slots)
        if maxima is None:
            maxima = _maxima_pass(pack, model, slots, spec, progress)
        maxima = {s: np.asarray(maxima[s], np.float32) for s in slots}
    targets = StatsTargets(pairs=pairs, slots=slots,
                           widths={s: pack.entries[s].d_sae for s in slots},
                           active_fraction=frac, maxima=maxima, predecessors=predecessors)

    def finish(parts: PassParts, seconds: float, saes=None) -> StatsRun:
        total: StatsShard = parts.parts["stats"]
        write_stats(root, total.acc, cfg, ident, parts.tokens["stats"], seconds)
        if total.cofire:
            write_cofire(root, total.cofire)
        if total.group_counts:
            write_groups(root, total.group_counts)
        return open_stats(out)

    return PassJob("stats", ident, slots, spec,
                   {"stats": (partial(StatsShard, targets), cfg.tokens)},
                   finish, root / ".state" / "state.pt", StatsError)


def run_stats(pack, model, out, cfg: StatsConfig | None = None, *, force: bool = False,
              progress: bool = True, stop_after_batches: int | None = None,
              max_by_feature: dict | None = None,
              scale: ScaleConfig | None = None) -> StatsRun:
    """Accumulate the co-activation sums of every pair over `cfg.tokens` tokens, then write
    RUN/stats/{edges,features}.parquet and stats.json.

    With active="frac:F", "active" means z > F * the feature's maximum; the maxima come from
    the feature index in RUN when there is one, else from `max_by_feature`, else a first pass.
    """
    job = stats_job(pack, model, out, cfg, force=force, progress=progress,
                    max_by_feature=max_by_feature)
    if job is None:
        return open_stats(out)
    return run_jobs(model, pack, [job], scale=scale, force=force, progress=progress,
                    stop_after_batches=stop_after_batches)["stats"]


def _maxima_from_index(run, slots: list[Slot]) -> dict[Slot, np.ndarray] | None:
    """Each feature's maximum activation from the feature index in RUN; None when RUN has no
    index or it lacks one of `slots`."""
    try:
        idx = open_index(run)
    except MissingResultError:
        return None
    out = {}
    for slot in slots:
        maxima = idx.slot_column(slot, "max_act")
        if not maxima:
            return None
        out[slot] = np.array(maxima, np.float32)
    return out


def _maxima_pass(pack, model, slots: list[Slot], spec, progress) -> dict[Slot, np.ndarray]:
    """Each feature's maximum activation over the same tokens (a first, cheaper pass)."""
    saes = load_saes(pack, slots, model.device, resolve_dtype(spec.encoder_dtype, model.device))
    maxima = {s: torch.zeros(saes[s].d_sae) for s in slots}
    points = [Slot.of(s) for s in slots]  # HookPoint is Slot
    for b in spec.batches(model.tokenizer):
        acts = capture(model, b.input_ids, points, attention_mask=b.attention_mask)
        content = b.content_mask()
        with torch.inference_mode():
            for s, pt in zip(slots, points):
                z = saes[s].encode(acts[pt].to(saes[s].dtype)).float().cpu()[content]
                maxima[s] = torch.maximum(maxima[s], z.max(0).values)
    return {s: v.numpy() for s, v in maxima.items()}

"""Co-activation statistics on disk (RUN/stats/) and the analyses built on them.

    edges.parquet     kept pairs of every (upstream, downstream) SAE pair: count and all measures.
                      Kept: each row's and each column's top-k by Pearson, every pair with
                      |Pearson| or Jaccard >= floor, and every pair with sufficiency or necessity
                      >= 0.9 seen at least twice (gate candidates). Pairs never active together
                      have Pearson <= 0 and Jaccard 0, and are not stored.
    features.parquet  per feature of every SAE involved: tokens active, density, mean, max.
    stats.json        manifest (identity: pack hash, model, settings), written last.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saeflow.errors import MissingResultError, StatsError
from saeflow.ids import Slot, group_name
from saeflow.store import (
    open_manifest,
    publish_files,
    recover_files,
    write_json_atomic,
    write_parquet_atomic,
)

MEASURES = ("pearson", "jaccard", "sufficiency", "necessity", "mutual_info")
STATS_DIR = "stats"
STATS_MANIFEST = "stats.json"
STATS_FORMAT = "saeflow-stats"
COFIRE_FILE = "cofire.parquet"
GROUPS_FILE = "groups.json"


def _top_k_mask(group: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """True for the k highest scores within each group."""
    order = np.lexsort((-score, group))
    g = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    lengths = np.diff(np.r_[starts, len(g)])
    rank = np.arange(len(g)) - np.repeat(starts, lengths)
    mask = np.zeros(len(g), bool)
    mask[order[rank < k]] = True
    return mask


def select_pairs(p: dict, top_k: int, floor: float) -> np.ndarray:
    if len(p["up"]) == 0:
        return np.zeros(0, bool)
    keep = _top_k_mask(p["up"], p["pearson"], top_k) | _top_k_mask(p["down"], p["pearson"], top_k)
    keep |= (np.abs(p["pearson"]) >= floor) | (p["jaccard"] >= floor)
    keep |= ((p["sufficiency"] >= 0.9) | (p["necessity"] >= 0.9)) & (p["count"] >= 2)
    return keep


def write_stats(root: Path, acc: dict, cfg, ident: dict, tokens: int, seconds: float) -> None:
    """edges.parquet, features.parquet and stats.json from the sums `acc` {(up, down) slots:
    PairAccumulator}, published together."""
    root.mkdir(parents=True, exist_ok=True)
    edge_tables, feat_rows, seen = [], [], set()
    for pair, a in acc.items():
        u, d = Slot.of(pair[0]), Slot.of(pair[1])
        p = a.pairs()
        keep = select_pairs(p, cfg.top_k, cfg.floor)
        n = int(keep.sum())
        cols = {"up_layer": pa.array(np.full(n, u.layer, np.int16)),
                "up_position": pa.array([u.position] * n),
                "up": pa.array(p["up"][keep].astype(np.int32)),
                "down_layer": pa.array(np.full(n, d.layer, np.int16)),
                "down_position": pa.array([d.position] * n),
                "down": pa.array(p["down"][keep].astype(np.int32)),
                "count": pa.array(p["count"][keep].astype(np.int64))}
        for m in MEASURES:
            cols[m] = pa.array(p[m][keep].astype(np.float32))
        edge_tables.append(pa.table(cols))
        for slot, nn, s, mx in ((u, a.n_up, a.s_up, a.max_up), (d, a.n_down, a.s_down, a.max_down)):
            if slot in seen:
                continue
            seen.add(slot)
            k = len(nn)
            feat_rows.append(pa.table({
                "layer": pa.array(np.full(k, slot.layer, np.int16)),
                "position": pa.array([slot.position] * k),
                "feature": pa.array(np.arange(k, dtype=np.int32)),
                "n_active": pa.array(nn), "density": pa.array(nn / max(a.n_tokens, 1)),
                "mean": pa.array((s / max(a.n_tokens, 1)).astype(np.float32)),
                "max": pa.array(mx.astype(np.float32))}))
    manifest = {
        "format": STATS_FORMAT, "identity": ident, "tokens": tokens, "seconds": round(seconds, 1),
        "pairs": [[str(Slot.of(u)), str(Slot.of(d))] for u, d in acc],  # "6/resid_post"
        "kept": f"top-{cfg.top_k} per row and column by Pearson; |Pearson| or Jaccard >= "
                f"{cfg.floor}; sufficiency or necessity >= 0.9 with count >= 2",
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    edges, feats = pa.concat_tables(edge_tables), pa.concat_tables(feat_rows)
    # The two tables and the manifest are published together (old set or new set, never a mix;
    # store.publish_files), the manifest last.
    publish_files(root, {
        "edges.parquet": lambda path: pq.write_table(edges, path, compression="zstd"),
        "features.parquet": lambda path: pq.write_table(feats, path, compression="zstd"),
        STATS_MANIFEST: lambda path: path.write_text(json.dumps(manifest, indent=2) + "\n")})


def write_cofire(root: Path, cofire: dict[int, np.ndarray]) -> None:
    """stats/cofire.parquet: per (layer, resid_post feature) the tokens it was active on and,
    of those, the tokens its top-1 RES / MLP / ATT predecessor (the flow's) was active too
    (`cofire` {layer: [4, d] counts})."""
    tables = []
    for L, c in sorted(cofire.items()):
        n = c.shape[1]
        tables.append(pa.table({"layer": pa.array(np.full(n, L, np.int16)),
                                "feature": pa.array(np.arange(n, dtype=np.int32)),
                                "n_on": c[0], "both_res": c[1], "both_mlp": c[2],
                                "both_attn": c[3]}))
    write_parquet_atomic(pa.concat_tables(tables), root / COFIRE_FILE)


def write_groups(root: Path, group_counts: dict[int, np.ndarray]) -> None:
    """stats/groups.json: per layer, how many (token, active resid_post feature) fall in each
    predecessor group (`group_counts` {layer: [8] counts by RES + 2 MLP + 4 ATT})."""
    write_json_atomic(root / GROUPS_FILE, {
        "method": "for every active resid_post feature on every content token: which "
                  "of its top-1 data-free predecessors (RES / MLP / ATT) are active on "
                  "that token",
        "layers": {str(L): {group_name(bool(c & 1), bool(c & 2), bool(c & 4)): int(v[c])
                            for c in range(8)}
                   for L, v in group_counts.items()}})


@dataclass
class StatsRun:
    root: Path  # RUN/stats
    manifest: dict

    def edges(self, up: tuple[str, int] | None = None, down: tuple[str, int] | None = None):
        """The kept pairs (pandas), optionally of one (upstream, downstream) SAE pair."""
        filters = []
        if up:
            filters += [("up_position", "=", up[0]), ("up_layer", "=", up[1])]
        if down:
            filters += [("down_position", "=", down[0]), ("down_layer", "=", down[1])]
        return pq.read_table(self.root / "edges.parquet", filters=filters or None).to_pandas()

    def features(self):
        return pq.read_table(self.root / "features.parquet").to_pandas()

    @property
    def pairs(self) -> list[tuple[Slot, Slot]]:
        """The (upstream, downstream) SAE pairs the statistics hold."""
        return [(Slot.parse(u), Slot.parse(d)) for u, d in self.manifest["pairs"]]


def open_stats(run: str | os.PathLike) -> StatsRun:
    """The statistics in RUN. MissingResultError when RUN has none yet; StatsError when their
    manifest is unreadable or not a statistics manifest."""
    recover_files(Path(run) / STATS_DIR)  # finish a publication a kill interrupted
    hint = f"statistics; run `saeflow stats PACK --out {run}`"
    manifest_file = Path(run) / STATS_DIR / STATS_MANIFEST
    if not manifest_file.is_file():
        raise MissingResultError(f"{Path(run)} has no {hint}")
    try:
        return StatsRun(*open_manifest(run, STATS_DIR, STATS_MANIFEST, STATS_FORMAT, StatsError,
                                       hint))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StatsError(f"{manifest_file} is unreadable ({e}); rerun "
                         f"`saeflow stats PACK --out {run} --force`") from None

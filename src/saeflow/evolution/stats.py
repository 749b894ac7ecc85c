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
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch

from saeflow.errors import MissingResultError, StatsError
from saeflow.evolution.tables import (
    MEASURES,
    STATS_DIR,
    STATS_MANIFEST,
    StatsRun,
    open_stats,
    write_stats,
)
from saeflow.features.tables import open_index
from saeflow.flow.predecessors import open_flow
from saeflow.ids import group_name
from saeflow.lm.hooks import HookPoint, capture
from saeflow.lm.model import resolve_dtype
from saeflow.saes.packs import pack_fingerprint
from saeflow.saes.scan import CorpusPassConfig, PassJob, PassParts, load_saes, pass_identity
from saeflow.scale import ScaleConfig
from saeflow.scale.shards import run_jobs
from saeflow.store import finished_pass, write_json_atomic, write_parquet_atomic


def _nonzero_lists(z: torch.Tensor, active: torch.Tensor | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """z [T, d], active [T, d] bool (None: z > 0) -> (index, value, nonzero, active), each
    [T, m] with m the most features nonzero on one token: every token's nonzero features,
    padded to m. Runs on z's device; only the [T, m] lists come back to the host."""
    nz = z > 0 if active is None else (z != 0) | active
    t, f = nz.nonzero(as_tuple=True)  # row-major: grouped by token
    T = z.shape[0]
    per_token = torch.bincount(t, minlength=T)
    m = int(per_token.max()) if T else 0
    dev = z.device
    slot = torch.arange(len(t), device=dev) - (per_token.cumsum(0) - per_token)[t]  # rank in token
    idx = torch.zeros(T, m, dtype=torch.long, device=dev)
    val = torch.zeros(T, m, dtype=torch.float64, device=dev)
    ok = torch.zeros(T, m, dtype=torch.bool, device=dev)
    idx[t, slot], val[t, slot], ok[t, slot] = f, z[t, f].double(), True
    on = ok if active is None else torch.zeros(T, m, dtype=torch.bool, device=dev).index_put_(
        (t, slot), active[t, f])
    return idx.cpu().numpy(), val.cpu().numpy(), ok.cpu().numpy(), on.cpu().numpy()


@dataclass
class PairAccumulator:
    """Running sums for one (upstream, downstream) pair of SAEs.

    Each token contributes only its m_up x m_down pairs of nonzero features (TopK k=32: 1,024
    of the 16.8M entries of a 4096 x 4096 matrix), as flat keys i * d_down + j. C counts the
    pairs where both are *active*, P sums z_i z_j where both are nonzero (Pearson needs every
    token). The sums live
      - in dense tensors (d_up * d_down <= dense_limit), updated in place by index_add_, or
      - as sorted runs of (key, count, product): the pairs of `flush_tokens` tokens are sorted
        and reduced into a run; runs of similar size are merged (a stable sort of two sorted
        runs is a linear merge), so each pair is merged O(log) times, not once per flush.
    """

    d_up: int
    d_down: int
    flush_tokens: int = 8192
    dense_limit: int = 32 * 2**20
    n_tokens: int = 0
    max_block_pairs: int = 4 * 2**20  # pairs materialised at once (bounds memory per update)

    def __post_init__(self):
        self.n_up = np.zeros(self.d_up, np.int64)
        self.n_down = np.zeros(self.d_down, np.int64)
        self.s_up = np.zeros(self.d_up)
        self.s_down = np.zeros(self.d_down)
        self.q_up = np.zeros(self.d_up)
        self.q_down = np.zeros(self.d_down)
        self.max_up = np.zeros(self.d_up)
        self.max_down = np.zeros(self.d_down)
        self.dense = self.d_up * self.d_down <= self.dense_limit
        if self.dense:
            self.C = torch.zeros(self.d_up * self.d_down, dtype=torch.int32)
            self.P = torch.zeros(self.d_up * self.d_down, dtype=torch.float64)
        else:  # sorted unique keys i * d_down + j, with their count and product sums
            self.keys = np.zeros(0, np.int64)
            self.count = np.zeros(0, np.int64)
            self.prod = np.zeros(0, np.float64)
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffer: list[tuple[np.ndarray, ...]] = []
        self._buffered = 0

    def update(self, z_up: torch.Tensor, z_down: torch.Tensor, act_up: torch.Tensor | None = None,
               act_down: torch.Tensor | None = None) -> None:
        """z_up [T, d_up], z_down [T, d_down] on the same T tokens; act_* [T, d] bool
        ("active"; default z > 0)."""
        T = z_up.shape[0]
        self.n_tokens += T
        iu, vu, nz_u, on_u = _nonzero_lists(z_up, act_up)  # [T, m_up]
        id_, vd, nz_d, on_d = _nonzero_lists(z_down, act_down)  # [T, m_down]
        for idx, val, nz, on, side in ((iu, vu, nz_u, on_u, "up"), (id_, vd, nz_d, on_d, "down")):
            d = getattr(self, f"d_{side}")
            f, v = idx[nz], val[nz]
            getattr(self, f"n_{side}")[:] += np.bincount(idx[on], minlength=d)
            getattr(self, f"s_{side}")[:] += np.bincount(f, weights=v, minlength=d)
            getattr(self, f"q_{side}")[:] += np.bincount(f, weights=v * v, minlength=d)
            np.maximum.at(getattr(self, f"max_{side}"), f, v)
        per_token = max(1, iu.shape[1] * id_.shape[1])
        step = max(1, self.max_block_pairs // per_token)
        for a in range(0, T, step):
            b = slice(a, a + step)
            both = nz_u[b, :, None] & nz_d[b, None, :]  # [t, m_up, m_down]
            keys = (iu[b, :, None] * self.d_down + id_[b, None, :])[both]
            prods = (vu[b, :, None] * vd[b, None, :])[both]
            on = (on_u[b, :, None] & on_d[b, None, :])[both]
            if self.dense:
                kt = torch.from_numpy(keys)
                self.C.index_add_(0, kt, torch.from_numpy(on).to(torch.int32))
                self.P.index_add_(0, kt, torch.from_numpy(prods))
            else:
                self._buffer.append((keys, prods, on))
        if not self.dense:
            self._buffered += T
            if self._buffered >= self.flush_tokens:
                self._flush()

    def _flush(self) -> None:
        if self._buffer:
            keys, prods, on = (np.concatenate([b[i] for b in self._buffer]) for i in range(3))
            self._buffer, self._buffered = [], 0
            self._runs.append(_sorted_run(keys, prods, on, self.d_up * self.d_down))
        # Merge while the newest run is at least half the size of the one before it.
        while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            b, a = self._runs.pop(), self._runs.pop()
            self._runs.append(_merge_runs(a, b))

    def _compact(self) -> None:
        if self.dense:
            return
        self._flush()
        runs = [(self.keys, self.count, self.prod), *self._runs] if len(self.keys) else self._runs
        while len(runs) > 1:
            b, a = runs.pop(), runs.pop()
            runs.append(_merge_runs(a, b))
        if runs:
            self.keys, self.count, self.prod = runs[0]
        self._runs = []

    def state(self) -> dict:
        """The running sums; numpy arrays are handed over as tensors that share their memory,
        so torch.save writes them without the pickled copy numpy arrays get (at 4096 x 4096
        that copy is 200 MB a pair)."""
        self._compact()
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                for k, v in vars(self).items() if not k.startswith("_")}

    def load(self, state: dict) -> None:
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and not (self.dense and k in ("C", "P")):
                v = v.numpy()
            setattr(self, k, v)
        self._runs, self._buffer, self._buffered = [], [], 0

    def merge(self, other: "PairAccumulator") -> None:
        """Add the sums of `other` (the same pair over other tokens) into this one: counts and
        float64 sums elementwise (self + other, in that order), maxima by maximum, the sparse
        runs by one linear merge."""
        self.n_tokens += other.n_tokens
        for side in ("up", "down"):
            for name in ("n", "s", "q"):
                getattr(self, f"{name}_{side}")[:] += getattr(other, f"{name}_{side}")
            np.maximum(getattr(self, f"max_{side}"), getattr(other, f"max_{side}"),
                       out=getattr(self, f"max_{side}"))
        if self.dense:
            self.C += other.C
            self.P += other.P
            return
        self._compact()
        other._compact()
        if len(other.keys):
            self.keys, self.count, self.prod = _merge_runs(
                (self.keys, self.count, self.prod), (other.keys, other.count, other.prod))

    # --- measures over the co-active pairs ----------------------------------------------
    def pairs(self) -> dict[str, np.ndarray]:
        """Every pair (i, j) that was ever nonzero together, with count (tokens where both
        were active) and all measures (float64 arrays)."""
        self._compact()
        if self.dense:
            P = self.P.numpy()
            keys = np.flatnonzero(P)  # z > 0 for SAE codes, so a product sum of 0 means unseen
            c, p = self.C.numpy()[keys].astype(np.float64), P[keys]
        else:
            keys, c, p = self.keys, self.count.astype(np.float64), self.prod
        i, j = np.divmod(keys, self.d_down)
        out = {"up": i, "down": j, "count": c, **{m: np.empty(len(c)) for m in MEASURES}}
        step = 2**22  # measures in blocks: their float64 temporaries stay small and reused
        for a in range(0, len(c), step):
            b = slice(a, a + step)
            ib, jb = i[b], j[b]
            for m, v in measures(c[b], p[b], self.n_up[ib], self.n_down[jb], self.s_up[ib],
                                 self.s_down[jb], self.q_up[ib], self.q_down[jb],
                                 self.n_tokens).items():
                out[m][b] = v
        return out


PACKED_SORT_MAX_KEYS = 2**32  # keys fit the high half of a uint64


def _sorted_run(keys, prods, on, n_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw pairs -> (unique sorted keys, active count, product sum)."""
    if n_keys <= PACKED_SORT_MAX_KEYS:
        # Sort one uint64 per pair, the key in the high half and the product's float32 bits in
        # the low half: np.sort is ~10x faster than argsort + gathers. The float32 rounding of
        # one product (relative 6e-8) is far below the 1e-5 the measures are checked to. Views
        # instead of copies: at 30M pairs every extra array costs more in page faults than sort.
        x = keys.astype(np.uint64)
        x <<= np.uint64(32)
        x |= prods.astype(np.float32).view(np.uint32)
        x.sort()
        halves = x.view(np.uint32)  # little-endian: [low, high, low, high, ...]
        k, p = halves[1::2], halves[0::2].view(np.float32)
        starts = _run_starts(k)
        uniq = k[starts].astype(np.int64)
        if on.all():  # "active" = nonzero (the default): the count is the run length
            count = np.diff(np.r_[starts, len(k)])
        else:
            k_on = np.sort(keys[on])
            count = np.zeros(len(starts), np.int64)
            if len(k_on):
                s = _run_starts(k_on)
                count[np.searchsorted(uniq, k_on[s])] = np.diff(np.r_[s, len(k_on)])
        return uniq, count, _sum_at(p, starts)
    order = np.argsort(keys)
    k = keys[order]
    starts = _run_starts(k)
    return k[starts], _sum_at(on[order].astype(np.int64), starts), _sum_at(prods[order], starts)


def _merge_runs(a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = np.concatenate([a[0], b[0]])
    order = np.argsort(keys, kind="stable")  # two sorted runs: timsort merges them linearly
    k = keys[order]
    starts = _run_starts(k)
    return (k[starts], _sum_at(np.concatenate([a[1], b[1]])[order], starts),
            _sum_at(np.concatenate([a[2], b[2]])[order], starts))


def _run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def _sum_at(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of values over [starts[i], starts[i+1]); floats are summed in float64."""
    dtype = np.float64 if values.dtype.kind == "f" else np.int64
    if not len(starts):
        return np.zeros(0, dtype)
    return np.add.reduceat(values, starts, dtype=dtype)


def measures(c, p, n_i, n_j, s_i, s_j, q_i, q_j, N) -> dict[str, np.ndarray]:
    """All measures from the sums (vectorised; float64)."""
    c, p = np.asarray(c, float), np.asarray(p, float)
    n_i, n_j = np.asarray(n_i, float), np.asarray(n_j, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        var_i = N * q_i - s_i ** 2
        var_j = N * q_j - s_j ** 2
        pearson = (N * p - s_i * s_j) / np.sqrt(var_i * var_j)
        pearson = np.where((var_i > 0) & (var_j > 0), pearson, 0.0)
        jaccard = c / (n_i + n_j - c)
        suff = np.where(n_i > 0, c / n_i, 0.0)
        nec = np.where(n_j > 0, c / n_j, 0.0)
        mi = _binary_mi(c, n_i, n_j, N)
    return {"pearson": pearson, "jaccard": np.nan_to_num(jaccard), "sufficiency": suff,
            "necessity": nec, "mutual_info": mi}


def _binary_mi(c, n_i, n_j, N) -> np.ndarray:
    """Mutual information (nats) of two binary variables from their 2 x 2 counts."""
    cells = [c, n_i - c, n_j - c, N - n_i - n_j + c]
    margins = [(n_i, n_j), (n_i, N - n_j), (N - n_i, n_j), (N - n_i, N - n_j)]
    mi = np.zeros_like(c, dtype=float)
    for cell, (a, b) in zip(cells, margins):
        with np.errstate(divide="ignore", invalid="ignore"):
            term = (cell / N) * np.log(cell * N / (a * b))
        mi += np.where(cell > 0, term, 0.0)
    return mi


def dense_reference(z_up: torch.Tensor, z_down: torch.Tensor, act_up=None, act_down=None
                    ) -> dict[str, np.ndarray]:
    """The original method: full d_up x d_down matrices by einsum (tests and benchmarks)."""
    act_up = (z_up > 0) if act_up is None else act_up
    act_down = (z_down > 0) if act_down is None else act_down
    zu, zd = z_up.double(), z_down.double()
    bu, bd = act_up.double(), act_down.double()
    N = zu.shape[0]
    C = torch.einsum("ti,tj->ij", bu, bd).numpy()
    P = torch.einsum("ti,tj->ij", zu, zd).numpy()
    n_i, n_j = bu.sum(0).numpy()[:, None], bd.sum(0).numpy()[None, :]
    s_i, s_j = zu.sum(0).numpy()[:, None], zd.sum(0).numpy()[None, :]
    q_i, q_j = (zu * zu).sum(0).numpy()[:, None], (zd * zd).sum(0).numpy()[None, :]
    out = measures(C, P, n_i, n_j, s_i, s_j, q_i, q_j, N)
    out["count"] = C
    return out


@dataclass
class StatsConfig(CorpusPassConfig):
    pairs: Literal["adjacent", "flow", "both"] = "adjacent"  # SAE pairs: adjacent layers, the flow's module pairs, or both
    # adjacent pairs at these positions (comma list, or all); each pair of 4096-wide SAEs holds
    # 192 MB of sums
    positions: str = "resid_post"
    active: str = "zero"  # zero (z > 0) or frac:F (z > F * the feature's max)
    top_k: int = 10  # pairs kept per row and per column (by Pearson)
    floor: float = 0.1  # and every pair with |Pearson| or Jaccard at or above it
    checkpoint_every_s: float = 600.0  # seconds between saved states (they hold every pair's sums)

    def active_fraction(self) -> float | None:
        if self.active == "zero":
            return None
        if self.active.startswith("frac:"):
            f = float(self.active[5:])
            if not 0 < f < 1:
                raise StatsError("active=frac:F needs 0 < F < 1")
            return f
        raise StatsError(f"active must be 'zero' or 'frac:F' (e.g. frac:0.2), not {self.active!r}")


def stat_pairs(pack, kind: str = "adjacent", positions: str = "all"
               ) -> list[tuple[tuple[str, int], tuple[str, int]]]:
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
                    out.append(((pos, L), (pos, L + 1)))
    if kind in ("flow", "both"):
        for L in pack.layers("resid_post"):
            for up in (("resid_post", L - 1), ("mlp_out", L), ("attn_out", L)):
                if up in pack and (up, ("resid_post", L)) not in out:
                    out.append((up, ("resid_post", L)))
    if not out:
        raise StatsError(f"the pack has no SAE pairs for '{kind}' statistics (positions "
                         f"{pack.positions}, layers {pack.layers()}); adjacent pairs need the "
                         f"same position at consecutive layers, flow pairs need resid_post")
    return out


def stats_job(pack, model, out, cfg: StatsConfig | None = None, *, force: bool = False,
              progress: bool = True, max_by_feature: dict | None = None) -> PassJob | None:
    """The statistics' share of a corpus pass, or None when RUN already holds them."""
    from pathlib import Path

    cfg = cfg or StatsConfig()
    frac = cfg.active_fraction()
    pairs = stat_pairs(pack, cfg.pairs, cfg.positions)
    pack.check_model(model)
    root = Path(out) / STATS_DIR
    ident = pass_identity(pack_fingerprint(pack), model, cfg)
    flow_pred = _flow_predecessors(out, pack)
    if flow_pred:  # the co-firing counts depend on the flow: part of the identity
        ident["flow"] = flow_pred.pop("_key")
    # (checked with the flow's key: without it a finished pass never matched and reran)
    if finished_pass(root / STATS_MANIFEST, ident, force, StatsError, "statistics"):
        return None
    slot_set = {s for pr in pairs for s in pr}
    if flow_pred:
        for L, info in flow_pred.items():
            slot_set |= {s for s in info["slots"].values() if s} | {("resid_post", L)}
    slots = sorted(slot_set)
    spec = cfg.spec(cfg.checkpoint_every_s)
    maxima = None
    if frac is not None:
        maxima = max_by_feature or _maxima_from_index(out, slots)
        if maxima is None:
            maxima = _maxima_pass(pack, model, slots, spec, progress)
        maxima = {s: np.asarray(maxima[s], np.float32) for s in slots}
    plan = {"pairs": pairs, "slots": slots, "frac": frac, "maxima": maxima,
            "d": {s: pack.entries[s].d_sae for s in slots}, "flow_pred": flow_pred}

    def finish(parts: PassParts, seconds: float, saes=None) -> "StatsRun":
        total: _StatsShard = parts.parts["stats"]
        tokens = parts.tokens["stats"]
        write_stats(root, total.acc, cfg, ident, tokens, seconds)
        if total.cofire:
            write_cofire(root, total.cofire)
        if total.group_counts:
            write_json_atomic(root / "groups.json", {
                "method": "for every active resid_post feature on every content token: which "
                          "of its top-1 data-free predecessors (RES / MLP / ATT) are active on "
                          "that token",
                "layers": {str(L): {group_name(bool(c & 1), bool(c & 2), bool(c & 4)): int(v[c])
                                    for c in range(8)}
                           for L, v in total.group_counts.items()}})
        return open_stats(out)

    return PassJob("stats", ident, slots, spec, {"stats": (partial(_StatsShard, plan), cfg.tokens)},
                   finish, root / ".state" / "state.pt", StatsError)


def run_stats(pack, model, out, cfg: StatsConfig | None = None, *, force: bool = False,
              progress: bool = True, stop_after_batches: int | None = None,
              max_by_feature: dict | None = None,
              scale: ScaleConfig | None = None) -> "StatsRun":
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


COFIRE_FILE = "cofire.parquet"


def write_cofire(root, cofire: dict) -> None:
    """stats/cofire.parquet: per (layer, resid_post feature) the tokens it was active on and,
    of those, the tokens its top-1 RES / MLP / ATT predecessor (the flow's) was active too."""
    import pyarrow as pa

    tables = []
    for L, c in sorted(cofire.items()):
        n = c.shape[1]
        tables.append(pa.table({"layer": pa.array(np.full(n, L, np.int16)),
                                "feature": pa.array(np.arange(n, dtype=np.int32)),
                                "n_on": c[0], "both_res": c[1], "both_mlp": c[2],
                                "both_attn": c[3]}))
    write_parquet_atomic(pa.concat_tables(tables), root / COFIRE_FILE)


class _StatsShard:
    """The sums of every pair (and the predecessor-group counts) over one shard of tokens;
    `plan` says which pairs and slots, the activity thresholds and the flow's predecessors."""

    def __init__(self, plan: dict, k: int, device):
        self.plan = plan
        dev = self.dev = torch.device(device)
        self.acc = {pr: PairAccumulator(plan["d"][pr[0]], plan["d"][pr[1]])
                    for pr in plan["pairs"]}
        self.group_counts = {L: np.zeros(8, np.int64) for L in plan["flow_pred"]}
        # per layer: [4, d_sae] counts of the target on, and on with its top-1 RES / MLP / ATT
        # predecessor (the co-firing that tells a real data-free match from a chance one)
        self.cofire = {L: np.zeros((4, plan["d"][("resid_post", L)]), np.int64)
                       for L in plan["flow_pred"]}
        self.thresholds = None
        if plan["frac"] is not None:
            self.thresholds = {s: torch.as_tensor(plan["maxima"][s], dtype=torch.float32,
                                                  device=dev) * plan["frac"]
                               for s in plan["slots"]}
        self.pred_of = {L: {kind: torch.as_tensor(info[kind], device=dev)
                            for kind in ("res", "mlp", "attn") if kind in info}
                        for L, info in plan["flow_pred"].items()}

    @staticmethod
    def _key(u, d) -> str:
        return f"{u[1]}/{u[0]}->{d[1]}/{d[0]}"

    def on_batch(self, z, b, content, acts=None) -> None:
        dev, thresholds = self.dev, self.thresholds
        content = content.to(dev)
        flat = {s: z[s][content] for s in self.plan["slots"]}  # [T_content, d]
        # "active": above the threshold, else nonzero
        act = {s: (flat[s] > thresholds[s]) if thresholds else flat[s] > 0 for s in flat}
        for (u, d), a in self.acc.items():
            if thresholds:
                a.update(flat[u], flat[d], act[u], act[d])
            else:  # the default: the accumulator's own z > 0 (no mask to carry)
                a.update(flat[u], flat[d])
        for L, info in self.plan["flow_pred"].items():  # empirical predecessor groups (5.1)
            r = ("resid_post", L)
            on_r = act[r]
            t, f = on_r.nonzero(as_tuple=True)
            code = torch.zeros(len(t), dtype=torch.long, device=dev)
            n_d = on_r.shape[1]
            self.cofire[L][0] += torch.bincount(f, minlength=n_d).cpu().numpy()
            for row, (bit, kind) in enumerate(((1, "res"), (2, "mlp"), (4, "attn")), start=1):
                slot = info["slots"].get(kind)
                if slot is None:
                    continue
                pred = self.pred_of[L][kind][f]  # top-1 predecessor of each active feature
                ok = pred >= 0
                src = act[slot]
                fired = torch.zeros(len(t), dtype=torch.bool, device=dev)
                fired[ok] = src[t[ok], pred[ok]]
                code += bit * fired.long()
                self.cofire[L][row] += torch.bincount(f[fired], minlength=n_d).cpu().numpy()
            self.group_counts[L] += torch.bincount(code, minlength=8).cpu().numpy()

    def state(self) -> dict:
        return {"pairs": {self._key(u, d): a.state() for (u, d), a in self.acc.items()},
                "groups": {L: v.copy() for L, v in self.group_counts.items()},
                "cofire": {L: v.copy() for L, v in self.cofire.items()}}

    def load(self, st: dict) -> None:
        for (u, d), a in self.acc.items():
            a.load(st["pairs"][self._key(u, d)])
        self.group_counts.update({L: np.array(v, np.int64) for L, v in st["groups"].items()})
        # a state saved before saeflow counted co-firing has none: the pass then starts over
        if "cofire" not in st and self.cofire:
            raise StatsError("this statistics checkpoint predates the co-firing counts; rerun "
                             "with --force")
        self.cofire.update({L: np.array(v, np.int64) for L, v in st.get("cofire", {}).items()})

    def merge(self, other: "_StatsShard") -> None:
        for pr, a in self.acc.items():
            a.merge(other.acc[pr])
        for L, v in other.group_counts.items():
            self.group_counts[L] += v
        for L, v in other.cofire.items():
            self.cofire[L] += v


def _flow_predecessors(run, pack) -> dict:
    """{L: {"res"/"mlp"/"attn": top-1 index array (-1 none), "slots": {kind: slot}}} from the
    flow results in RUN, for layers whose predecessor SAEs are in `pack`; {} without a flow."""

    try:
        fr = open_flow(run)
    except MissingResultError:
        return {}
    if fr.manifest["pack"]["fingerprint"] != pack_fingerprint(pack):
        raise StatsError(f"{run} holds a flow of a different pack; statistics and flow must "
                         f"come from the same pack (use another --out)")
    pred = fr.predecessors()
    out: dict[str | int, Any] = {"_key": fr.manifest["cache_key"]}
    for L in fr.layers:
        sel = pred[pred.layer == L].sort_values("feature")
        slots: dict[str, tuple[str, int] | None] = {}
        info: dict[str, np.ndarray] = {}
        for kind, spec in fr.manifest["predecessor_slots"][str(L)].items():
            if spec is None:
                slots[kind] = None
                continue
            lay, pos = spec.split("/")
            slot = (pos, int(lay))
            if slot not in pack or pos == "attn_z":
                slots[kind] = None
                continue
            slots[kind] = slot
            info[kind] = sel[f"pred_{kind}"].fillna(-1).to_numpy().astype(np.int64)
        out[L] = {**info, "slots": slots}
    return out


def _maxima_from_index(run, slots) -> dict | None:
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


def _maxima_pass(pack, model, slots, spec, progress) -> dict:
    """Each feature's maximum activation over the same tokens (a first, cheaper pass)."""

    saes = load_saes(pack, slots, model.device, resolve_dtype(spec.encoder_dtype, model.device))
    maxima = {s: torch.zeros(saes[s].d_sae) for s in slots}
    points = [HookPoint(p, L) for p, L in slots]
    for b in spec.batches(model.tokenizer):
        acts = capture(model, b.input_ids, points, attention_mask=b.attention_mask)
        content = b.content_mask()
        with torch.inference_mode():
            for s, pt in zip(slots, points):
                z = saes[s].encode(acts[pt].to(saes[s].dtype)).float().cpu()[content]
                maxima[s] = torch.maximum(maxima[s], z.max(0).values)
    return {s: v.numpy() for s, v in maxima.items()}

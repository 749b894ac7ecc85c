"""The running co-activation sums of one (upstream, downstream) pair of SAEs over the co-active
pairs only (`PairAccumulator`), and the sorted-run arithmetic that keeps them sparse."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saeflow.evolution.measures import measures
from saeflow.evolution.tables import MEASURES


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
        # the low half: one np.sort instead of argsort + gathers (docs/decisions.md). The
        # float32 rounding of one product (relative 6e-8) is far below the 1e-5 the measures
        # are checked to. Views, not copies: extra arrays cost page faults.
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

"""The running co-activation sums of one (upstream, downstream) pair of SAEs over the co-active
pairs only (`PairAccumulator`), and the sorted-run arithmetic that keeps them sparse."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from saeflow.evolution.measures import measures
from saeflow.evolution.tables import MEASURES
from saeflow.saes.scan import add_at


class Codes(NamedTuple):
    """One SAE's codes on T tokens, as the sums read them (on the codes' device): every
    nonzero entry flat, grouped by token, and the same entries as per-token lists padded to m,
    the most features nonzero on one token. Of a stack of S SAEs of one width d (`codes_of`
    of [S, T, d]) the lists are [S, T, m] and the flat entries are grouped by SAE, then token,
    with feat = s * d + f."""
    feat: torch.Tensor  # [N] feature of each nonzero entry (row-major: by token)
    val: torch.Tensor  # [N] float64 its value
    on: torch.Tensor  # [N] bool: active
    idx: torch.Tensor  # [T, m] each token's nonzero features (0 in the padding)
    lval: torch.Tensor  # [T, m] float64 their values (0 in the padding)
    ok: torch.Tensor  # [T, m] bool: a real entry, not padding
    lon: torch.Tensor  # [T, m] bool: active
    full: bool  # every token has m nonzero features (TopK): the lists hold no padding


def codes_of(z: torch.Tensor, active: torch.Tensor | None = None) -> Codes:
    """z [T, d] or a stack [S, T, d], active the same shape, bool (None: z > 0) -> Codes, on
    z's device. Two host syncs, for a stack too: the number of nonzero entries and the lists'
    width m (both shape the tensors)."""
    nz = z > 0 if active is None else (z != 0) | active
    ix = nz.nonzero(as_tuple=True)  # row-major: grouped by SAE, then token
    f = ix[-1]
    t = ix[0] if z.dim() == 2 else ix[0] * z.shape[1] + ix[1]  # [N] list row (SAE, token)
    T = z.shape[:-1].numel()
    dev = z.device
    # [rows] features per row (an index_add_: a bool row sum is slow on the CPU, and bincount
    # syncs on a GPU)
    per_token = torch.zeros(T, dtype=torch.long, device=dev).index_add_(0, t, torch.ones_like(t))
    m = int(per_token.max()) if T else 0
    slot = torch.arange(len(t), device=dev) - (per_token.cumsum(0) - per_token)[t]  # rank in token
    val = z[ix].double()
    idx = torch.zeros(T, m, dtype=torch.long, device=dev)
    lval = torch.zeros(T, m, dtype=torch.float64, device=dev)
    ok = torch.zeros(T, m, dtype=torch.bool, device=dev)
    idx[t, slot], lval[t, slot], ok[t, slot] = f, val, True
    full = len(t) == T * m
    shape = (*z.shape[:-1], m)
    idx, lval, ok = idx.view(shape), lval.view(shape), ok.view(shape)
    feat = f if z.dim() == 2 else ix[0] * z.shape[-1] + f
    if active is None:
        return Codes(feat, val, torch.ones_like(f, dtype=torch.bool), idx, lval, ok, ok, full)
    on = active[ix]
    lon = torch.zeros(T, m, dtype=torch.bool, device=dev).index_put_((t, slot), on)
    return Codes(feat, val, on, idx, lval, ok, lon.view(shape), full)


def _block_pairs(up: Codes, down: Codes, b: slice, d_down: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The co-nonzero pairs of the tokens b, in token order: (keys i * d_down + j, products
    z_i z_j float64, both active), each [n_pairs] on the codes' device. Lists with padding
    are compressed to the real pairs (one sync: their number); TopK lists have none."""
    keys = (up.idx[b, :, None] * d_down + down.idx[b, None, :]).reshape(-1)  # [t * m_up * m_down]
    prods = (up.lval[b, :, None] * down.lval[b, None, :]).reshape(-1)
    on = (up.lon[b, :, None] & down.lon[b, None, :]).reshape(-1)
    if up.full and down.full:
        return keys, prods, on
    sel = (up.ok[b, :, None] & down.ok[b, None, :]).reshape(-1).nonzero().squeeze(1)
    return keys[sel], prods[sel], on[sel]


class _HostView:
    """A per-feature sum (n_up, s_down, ...) read as a numpy array: a view on the CPU, a copy
    from another device."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None) -> np.ndarray:
        return obj._sums[self.name].cpu().numpy()


# per-feature sums: (name, dtype); their state order is n, s, q, max, each up then down
SIDE_SUMS = (("n", torch.int64), ("s", torch.float64), ("q", torch.float64),
             ("max", torch.float64))
STATE_SCALARS = ("d_up", "d_down", "flush_tokens", "dense_limit", "n_tokens", "max_block_pairs")


@dataclass
class PairAccumulator:
    """Running sums for one (upstream, downstream) pair of SAEs.

    Each token contributes only its m_up x m_down pairs of nonzero features (TopK k=32: 1,024
    of the 16.8M entries of a 4096 x 4096 matrix), as flat keys i * d_down + j. C counts the
    pairs where both are *active*, P sums z_i z_j where both are nonzero (Pearson needs every
    token). The per-token work runs on `device` (the codes' device in a pass), and the sums
    live
      - in dense tensors on `device` (d_up * d_down <= dense_limit), updated in place, or
      - on the host as sorted runs of (key, count, product): the pairs of `flush_tokens`
        tokens are sorted and reduced into a run; runs of similar size are merged (a stable
        sort of two sorted runs is a linear merge), so each pair is merged O(log) times.
    The per-feature sums (n_up, s_up, q_up, max_up and the down ones) stay on `device`;
    state(), merge() and pairs() hand the host CPU tensors / numpy arrays.
    Determinism: C's int32 counts are added with index_add_ (exact in any order); P's and the
    per-feature float64 sums through `add_at`: index_add_ on the CPU (the order of the
    entries), a stable sort then accumulate (index_put_) on a GPU, where index_add_'s atomics
    would add in another order on every run. A `PairGroup` (batched.py) updates many pairs
    at once with the same adds in the same order.
    """

    d_up: int
    d_down: int
    flush_tokens: int = 8192
    dense_limit: int = 32 * 2**20
    n_tokens: int = 0
    max_block_pairs: int = 4 * 2**20  # pairs materialised at once (bounds memory per update)
    device: torch.device | str | None = None  # None: the CPU

    n_up = _HostView()
    n_down = _HostView()
    s_up = _HostView()
    s_down = _HostView()
    q_up = _HostView()
    q_down = _HostView()
    max_up = _HostView()
    max_down = _HostView()

    def __post_init__(self):
        dev = self.device = torch.device("cpu" if self.device is None else self.device)
        self._sums = {f"{name}_{side}": torch.zeros(self._width(side), dtype=dtype, device=dev)
                      for name, dtype in SIDE_SUMS for side in ("up", "down")}
        self.dense = self.d_up * self.d_down <= self.dense_limit
        if self.dense:
            self.C = torch.zeros(self.d_up * self.d_down, dtype=torch.int32, device=dev)
            self.P = torch.zeros(self.d_up * self.d_down, dtype=torch.float64, device=dev)
        else:  # sorted unique keys i * d_down + j, with their count and product sums
            self.keys = np.zeros(0, np.int64)
            self.count = np.zeros(0, np.int64)
            self.prod = np.zeros(0, np.float64)
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffer: list[tuple[np.ndarray, ...]] = []
        self._buffered = 0
        # in a PairGroup: the per-feature sums (grouped) and C, P (stacked) are views of its
        # stacked tensors, which load() then copies into
        self.grouped = self.stacked = False

    def _width(self, side: str) -> int:
        return self.d_up if side == "up" else self.d_down

    def update(self, z_up: torch.Tensor, z_down: torch.Tensor, act_up: torch.Tensor | None = None,
               act_down: torch.Tensor | None = None) -> None:
        """z_up [T, d_up], z_down [T, d_down] on the same T tokens; act_* [T, d] bool
        ("active"; default z > 0). Moved to this accumulator's device first."""
        dev = self.device
        self.update_codes(
            codes_of(z_up.to(dev), None if act_up is None else act_up.to(dev)),
            codes_of(z_down.to(dev), None if act_down is None else act_down.to(dev)))

    def update_codes(self, up: Codes, down: Codes) -> None:
        """The same from `codes_of` (a pass builds each SAE's codes once for all its pairs)."""
        T = up.idx.shape[0]
        self.n_tokens += T
        self._add_features(up, "up")
        self._add_features(down, "down")
        per_token = max(1, up.idx.shape[1] * down.idx.shape[1])
        step = max(1, self.max_block_pairs // per_token)
        for a in range(0, T, step):
            keys, prods, on = _block_pairs(up, down, slice(a, a + step), self.d_down)
            if self.dense:
                self.C.index_add_(0, keys, on.to(torch.int32))
                add_at(self.P, keys, prods)
            else:
                self._buffer.append((keys.cpu().numpy(), prods.cpu().numpy(), on.cpu().numpy()))
        if not self.dense:
            self._buffered += T
            if self._buffered >= self.flush_tokens:
                self._flush()

    def _add_features(self, c: Codes, side: str) -> None:
        """The per-feature sums of one side: each batch's float sums are formed from zero and
        then added (the order the host bincounts used)."""
        sums, d = self._sums, self._width(side)
        sums[f"n_{side}"].index_add_(0, c.feat, c.on.long())
        for name, v in (("s", c.val), ("q", c.val * c.val)):
            sums[f"{name}_{side}"] += add_at(torch.zeros(d, dtype=torch.float64,
                                                         device=c.val.device), c.feat, v)
        sums[f"max_{side}"].scatter_reduce_(0, c.feat, c.val, "amax")

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
        """The running sums as CPU tensors (the format of every saeflow version). On the CPU
        they share this accumulator's memory, so torch.save writes them without the pickled
        copy numpy arrays get (at 4096 x 4096 that copy is 200 MB a pair)."""
        self._compact()
        out: dict = {k: getattr(self, k) for k in STATE_SCALARS}
        out.update({k: own_cpu(v) for k, v in self._sums.items()})
        out["dense"] = self.dense
        if self.dense:
            out.update(C=own_cpu(self.C), P=own_cpu(self.P))
        else:
            out.update(keys=torch.from_numpy(self.keys), count=torch.from_numpy(self.count),
                       prod=torch.from_numpy(self.prod))
        return out

    def load(self, state: dict) -> None:
        """The sums of `state`, copied into this accumulator's tensors (which may be views of
        a `PairGroup`'s stacked sums)."""
        dev = self.device
        for k, v in state.items():
            if k in self._sums:
                self._sums[k] = load_into(self._sums[k], v, dev, self.grouped)
            elif k in ("C", "P"):
                setattr(self, k, load_into(getattr(self, k, None), v, dev, self.stacked))
            elif k in ("keys", "count", "prod"):
                setattr(self, k, v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            else:
                setattr(self, k, v)
        self._runs, self._buffer, self._buffered = [], [], 0

    def merge(self, other: "PairAccumulator") -> None:
        """Add the sums of `other` (the same pair over other tokens) into this one: counts and
        float64 sums elementwise (self + other, in that order), maxima by maximum, the sparse
        runs by one linear merge."""
        self.n_tokens += other.n_tokens
        for k, v in self._sums.items():
            o = other._sums[k].to(self.device)
            if k.startswith("max_"):
                torch.maximum(v, o, out=v)
            else:
                v += o
        if self.dense:
            self.C += other.C.to(self.device)
            self.P += other.P.to(self.device)
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
            # z > 0 for SAE codes, so a product sum of 0 means unseen; only these leave the device
            seen = self.P.nonzero().squeeze(1)
            keys = seen.cpu().numpy()
            c, p = self.C[seen].cpu().numpy().astype(np.float64), self.P[seen].cpu().numpy()
        else:
            keys, c, p = self.keys, self.count.astype(np.float64), self.prod
        i, j = np.divmod(keys, self.d_down)
        n_up, n_down, s_up, s_down = self.n_up, self.n_down, self.s_up, self.s_down
        q_up, q_down = self.q_up, self.q_down
        out = {"up": i, "down": j, "count": c, **{m: np.empty(len(c)) for m in MEASURES}}
        step = 2**22  # measures in blocks: their float64 temporaries stay small and reused
        for a in range(0, len(c), step):
            b = slice(a, a + step)
            ib, jb = i[b], j[b]
            for m, v in measures(c[b], p[b], n_up[ib], n_down[jb], s_up[ib], s_down[jb],
                                 q_up[ib], q_down[jb], self.n_tokens).items():
                out[m][b] = v
        return out


def own_cpu(v: torch.Tensor) -> torch.Tensor:
    """v as a CPU tensor that owns its memory: pickle (a Ray worker's result) writes a view's
    whole storage, so a view of stacked sums is copied; a tensor of its own is not (on the CPU
    it is returned as is, without a copy)."""
    v = v.cpu()
    whole = v.untyped_storage().nbytes() == v.numel() * v.element_size()
    return v if whole and v.is_contiguous() else v.clone()


def load_into(cur: torch.Tensor | None, v, device, in_place: bool) -> torch.Tensor:
    """A saved tensor `v` on `device`: copied into `cur` when `in_place` (`cur` is a view of a
    `PairGroup`'s stacked sums), else `v` itself moved there (on the CPU: no copy)."""
    v = torch.as_tensor(v)
    if in_place:
        assert cur is not None and cur.shape == v.shape and cur.dtype == v.dtype, \
            f"a saved sum of shape {tuple(v.shape)} ({v.dtype}) loaded into stacked sums"
        return cur.copy_(v)
    return v.to(device)


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

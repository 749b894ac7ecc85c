"""Exact top-k matching between two dictionaries of directions, in bounded memory.

A *dictionary* is any source of rows [n, d] that can be read in blocks (`Directions`): a tensor
in memory, or a safetensors matrix read row-block by row-block from disk (so a 1M-wide SAE never
has to sit in memory), optionally projected (attn_z -> residual through W_O) and scaled
(threshold folding).

    top_k_pairs(A, B, k, cols=True) -> Matches(row_values [n_a, k], row_indices [n_a, k],
                                               col_values [n_b, k], col_indices [n_b, k])

One pass computes each tile of cosine similarities once (a GEMM; the engine is tiles.py) and
feeds it to both a running row top-k (A -> B, e.g. predecessors) and a running column top-k
(B -> A, e.g. successors), so the two directions cost one GEMM, not two; on a GPU both
dictionaries' unit rows, the tiles and the running top-k stay on the device. Memory is
O(block_a * block_b + (n_a + n_b) * k), never n_a * n_b. The result is exact in fp32; `precision="bf16"` ranks candidates in bf16 and
re-scores the best `k + rerank_margin` of them exactly in fp32 (the values are exact; the
membership of the top-k is exact unless bf16 rounding pushed a true member below k + margin
candidates; benchmarks/bench_flow.py measures how often).
"""
from __future__ import annotations

import json
import os
import struct
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from saeflow.errors import MatchError
from saeflow.flow.config import MATCH_METHODS, NULL_MODELS  # noqa: F401 (their old home)
from saeflow.flow.tiles import RANK_DTYPES, Rows, rescore, scan


# --- dictionaries ---------------------------------------------------------------------------
class Directions(ABC):
    """Rows [n, d] readable in blocks, as float32. Subclasses implement `_read(i0, i1)`."""

    n: int
    d: int
    label: str = ""

    def __init__(self, project: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
                 drop_dims: list[int] | None = None):
        self.project = None if project is None else project.float()  # [d_src, d]
        self.row_scale = None if row_scale is None else row_scale.float()  # [n]
        # coordinates of the matching space set to zero before the rows are normalised (the
        # massive residual dimensions, when the flow's geometry leaves them out)
        self.drop_dims = sorted(set(drop_dims)) if drop_dims else None
        self._moved: dict = {}  # project / row_scale on other devices, moved once

    @abstractmethod
    def _read(self, i0: int, i1: int) -> torch.Tensor:  # [i1-i0, d_src]
        """Raw rows i0..i1 of the source dictionary (each subclass reads its own storage)."""

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        t = getattr(self, name)
        if t.device == device:
            return t
        if (name, device) not in self._moved:
            self._moved[name, device] = t.to(device)
        return self._moved[name, device]

    def block(self, i0: int, i1: int, device=None) -> torch.Tensor:
        """Rows i0..i1 in the matching space, float32 [i1-i0, d], on `device` (None: where they
        are stored). The raw rows cross to the device before they are widened: fewer bytes."""
        x = self._read(i0, i1)
        x = (x if device is None else x.to(device)).float()
        if self.project is not None:
            x = x @ self._on("project", x.device)
        if self.drop_dims is not None:
            x = x.clone() if self.project is None else x  # never write into the source rows
            x[:, self.drop_dims] = 0.0
        return x

    def unit_block(self, i0: int, i1: int, device=None) -> torch.Tensor:
        """Unit rows, times `row_scale` when set (folded matching). Zero rows stay zero."""
        x = self.block(i0, i1, device)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.row_scale is not None:
            x = x * self._on("row_scale", x.device)[i0:i1, None]
        return x

    def materialize(self, budget_bytes: int, device=None,
                    block: int | None = None) -> "Directions":
        """An in-memory copy of the unit rows (on `device`; None: the CPU) when it fits in
        `budget_bytes`, else self. Rows already held as unit rows on that device are kept as
        they are. Rows bound for another device are normalised there, `block` rows at a time
        (default 65536; on the CPU, all at once unless `block` is given), so the host holds one
        block."""
        if self.n * self.d * 4 > budget_bytes:
            return self
        dev = indexed_device(device)
        held = _in_memory_rows(self)
        if held is not None and held.device == dev and dev.type != "cpu":
            return self
        if dev.type == "cpu" and block is None:
            return TensorDirections(self.unit_block(0, self.n, device=dev), normalized=True,
                                    label=self.label)
        block = block or 65536
        out = torch.empty(self.n, self.d, device=dev)  # [n, d]
        for i0 in range(0, self.n, block):
            out[i0:i0 + block] = self.unit_block(i0, min(i0 + block, self.n), device=dev)
        return TensorDirections(out, normalized=True, label=self.label)


class TensorDirections(Directions):
    def __init__(self, W: torch.Tensor, normalized: bool = False, label: str = "", **kw):
        super().__init__(**kw)
        if W.ndim != 2:
            raise MatchError(f"a dictionary must be 2-D [n, d], got shape {tuple(W.shape)}")
        self.W, self.normalized, self.label = W, normalized, label
        self.n = W.shape[0]
        self.d = W.shape[1] if self.project is None else self.project.shape[1]
        if self.project is not None and self.project.shape[0] != W.shape[1]:
            raise MatchError(f"projection expects width {self.project.shape[0]}, rows have {W.shape[1]}")

    def _read(self, i0, i1):
        return self.W[i0:i1]

    def unit_block(self, i0, i1, device=None):
        if self.normalized and self.project is None and self.row_scale is None \
                and self.drop_dims is None:
            x = self.W[i0:i1]
            return (x if device is None else x.to(device)).float()
        return super().unit_block(i0, i1, device)


_ST_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F64": torch.float64}


class SafetensorsRows(Directions):
    """Row blocks of one 2-D tensor in a .safetensors file, read with positioned reads.

    Nothing is memory-mapped, so resident memory stays at one block however wide the SAE is.
    """

    def __init__(self, path: str | os.PathLike, key: str, label: str = "", **kw):
        super().__init__(**kw)
        self.path, self.key, self.label = Path(path), key, label
        with open(self.path, "rb") as f:
            (n_header,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n_header))
        if key not in header:
            raise MatchError(f"{self.path} has no tensor {key!r}")
        meta = header[key]
        if len(meta["shape"]) != 2 or meta["dtype"] not in _ST_TORCH:
            raise MatchError(f"{self.path}:{key} is not a 2-D float matrix")
        self.dtype = _ST_TORCH[meta["dtype"]]
        self.n, width = meta["shape"]
        self.d = width if self.project is None else self.project.shape[1]
        self._width = width
        self._item = torch.empty((), dtype=self.dtype).element_size()
        self._offset = 8 + n_header + meta["data_offsets"][0]
        if meta["data_offsets"][1] - meta["data_offsets"][0] != self.n * width * self._item:
            raise MatchError(f"{self.path}:{key} has an inconsistent size; the file is corrupt")
        if os.path.getsize(self.path) < self._offset + self.n * width * self._item:
            raise MatchError(f"{self.path} is truncated; re-download or re-convert it")

    def _read(self, i0, i1):
        row = self._width * self._item
        buf = bytearray((i1 - i0) * row)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._offset + i0 * row)
            f.readinto(buf)
        return torch.frombuffer(buf, dtype=self.dtype).view(i1 - i0, self._width)


# --- top-k ----------------------------------------------------------------------------------
@dataclass
class Matches:
    row_values: torch.Tensor  # [n_a, k] float32, descending
    row_indices: torch.Tensor  # [n_a, k] int64 into B
    col_values: torch.Tensor | None = None  # [n_b, k]
    col_indices: torch.Tensor | None = None  # [n_b, k] int64 into A


def indexed_device(device) -> torch.device:
    """The device with its index ("cuda" -> "cuda:0", the current one), so that it compares
    equal to the device of a tensor held there; None: the CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _as_directions(x) -> Directions:
    return x if isinstance(x, Directions) else TensorDirections(x)


def device_budget(device, host_budget: int) -> int:
    """Bytes one dictionary's unit rows may take where the matching runs: `host_budget` on a
    CPU; on a GPU an eighth of its free memory (both dictionaries, their bf16 copies, the tiles
    and the re-scoring fit inside the rest), never less than `host_budget`."""
    dev = indexed_device(device)
    if dev.type != "cuda":
        return host_budget
    free, _ = torch.cuda.mem_get_info(dev)
    return max(host_budget, free // 8)


def top_k_pairs(A, B, k: int = 5, cols: bool = False, block_a: int = 1024, block_b: int = 4096,
                precision: str = "fp32", rerank_margin: int = 4, memory_budget: int = 512 << 20,
                progress: Callable[[int], None] | None = None, device=None) -> Matches:
    """Top-k rows of B for every row of A (and, with cols=True, top-k rows of A for every row of B).

    A, B: `Directions` or tensors [n, d]. Similarities are cosines of the rows (times B's
    `row_scale` when set). `progress(n_rows_of_A_done)` is called after each A block.
    device: where the tiles and the running top-k run (e.g. "cuda"; None: the CPU). There, the
    unit rows of both dictionaries are held once when they fit (`device_budget`); on a CPU, B
    when it fits `memory_budget`, and A is read block by block. What does not fit is streamed.
    The results come back to the CPU once, at the end.
    """
    dev = indexed_device(device)
    A, B = _as_directions(A), _as_directions(B)
    if A.d != B.d:
        raise MatchError(f"the dictionaries have different widths: {A.d} vs {B.d}; map them into "
                         f"the same space first (e.g. attn_z through W_O)")
    k_max = min(A.n, B.n) if cols else B.n
    if not 0 < k <= k_max:
        raise MatchError(f"k must be in 1..{k_max} (the size of the smaller dictionary)")
    if precision not in RANK_DTYPES:
        raise MatchError("precision must be 'fp32' or 'bf16'")
    budget = device_budget(dev, memory_budget)
    B = B.materialize(budget, device=dev)  # read B once when it fits; else stream it per A block
    if dev.type != "cpu":
        A = A.materialize(budget, device=dev)
    kc = min(k + rerank_margin, B.n) if precision == "bf16" else k  # candidates kept per row
    kc_col = min(k + rerank_margin, A.n) if precision == "bf16" else k
    ra, rb = _rows(A, dev, RANK_DTYPES[precision]), _rows(B, dev, RANK_DTYPES[precision])
    row_v, row_i, col_v, col_i = scan(ra, rb, kc, kc_col, cols, block_a, block_b, progress)
    if precision == "bf16":
        cpu = dev.type == "cpu"
        row_v, row_i = rescore(ra, rb, row_i, k, _taker(B, rb), _rescore_step(dev, kc, rb),
                               per_column=cpu and rb.W is not None)
        if cols:
            assert col_i is not None
            col_v, col_i = rescore(rb, ra, col_i, k, _taker(A, ra), _rescore_step(dev, kc_col, ra),
                                   per_column=cpu and ra.W is not None)
    return Matches(row_v.cpu(), row_i.cpu(), None if col_v is None else col_v.cpu(),
                   None if col_i is None else col_i.cpu())


def _in_memory_rows(D: Directions) -> torch.Tensor | None:
    """The unit rows themselves when D holds them in memory as they are, else None."""
    if isinstance(D, TensorDirections) and D.normalized and D.project is None \
            and D.row_scale is None and D.drop_dims is None:
        return D.W
    return None


def _rows(D: Directions, dev: torch.device, rank_dtype: torch.dtype) -> Rows:
    """D as the tile engine reads it: its unit rows on `dev` when held in memory, else streamed."""
    held = _in_memory_rows(D)
    if held is not None and held.device == dev:  # elsewhere: it did not fit `dev`'s budget
        return Rows(D.n, D.d, dev, rank_dtype, resident=held)
    return Rows(D.n, D.d, dev, rank_dtype, read=lambda i0, i1: D.unit_block(i0, i1, device=dev))


def _taker(D: Directions, rows: Rows) -> Callable[[torch.Tensor], torch.Tensor]:
    """fp32 unit rows D[idx] on the engine's device: gathered there when D is held there, else
    read from D's storage once per distinct index."""
    if rows.W is not None:
        W = rows.W
        return lambda idx: W[idx].float()

    def take(idx: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(idx, return_inverse=True)
        return gather_rows(D, uniq.cpu()).to(rows.dev)[inv]
    return take


def _rescore_step(dev: torch.device, kc: int, cand: Rows) -> int:
    """Rows re-scored at a time: their gathered candidates [step, kc, d] fp32 take 32 MB on a
    CPU (cache-sized), 256 MB on a GPU (a few large gathers and bmms, not hundreds of small
    launches); at least 1024 when the candidates are streamed (each step reads their
    dictionary once)."""
    step = ((32 if dev.type == "cpu" else 256) << 20) // (kc * cand.d * 4)
    return max(1024 if cand.W is None else 1, step)


def gather_rows(D: Directions, idx: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Unit rows D[idx] (idx sorted ascending): gathered where D holds them in memory (so on its
    device), else read from D block by block."""
    held = _in_memory_rows(D)
    if held is not None:
        return held[idx.to(held.device)].float()
    out = None
    for b0 in range(0, D.n, block):
        sel = (idx >= b0) & (idx < b0 + block)
        if sel.any():
            rows = D.unit_block(b0, min(b0 + block, D.n))
            if out is None:
                out = torch.empty(len(idx), D.d, device=rows.device)
            out[sel.to(rows.device)] = rows[(idx[sel] - b0).to(rows.device)]
    return out if out is not None else torch.empty(len(idx), D.d)


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """[n, d] -> float32 rows of unit norm (all-zero rows stay zero)."""
    W = W.float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def top_k_cosine(A: torch.Tensor, B: torch.Tensor, k: int = 5, block_a: int = 1024,
                 block_b: int = 4096, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of A [n_a, d], the k rows of B [n_b, d] with the highest cosine.

    Returns (values [n_a, k] float32, indices [n_a, k] int64), sorted descending.
    """
    for X in (A, B):
        if isinstance(X, torch.Tensor) and X.ndim != 2:
            raise MatchError("top_k_cosine needs 2-D dictionaries [n, d]")
    m = top_k_pairs(A, B, k=k, block_a=block_a, block_b=block_b, precision=precision)
    return m.row_values, m.row_indices


# --- null model -----------------------------------------------------------------------------
def null_top1(A, B, n: int = 2048, null: str = "shuffle", seed: int = 0, *,
              kind: str | None = None, **kw) -> np.ndarray:
    """Top-1 similarities to B of `n` directions that carry no relation to B.

    null="shuffle": rows of A with their coordinates permuted (independently per row): each
    keeps its own distribution of coordinate sizes, but any alignment with B is destroyed.
    null="columns": each coordinate drawn from its own column of A (a random row's value per
    dimension): every dimension keeps its distribution over A's features, so a component that
    all of A's rows share (a massive residual dimension) stays, but the features' identity is
    gone. Stricter where the dictionaries share such a component.
    null="rotation": rows of A turned by one random orthogonal matrix: A's own geometry (its
    norms, its anisotropy, the angles among its features) is kept whole, only its alignment with
    B is gone. The strictest of these: a rotated dictionary scores what any dictionary of the
    same shape would, so a threshold above it says "aligned", not "anisotropic too".
    null="gaussian": isotropic random directions. Returns float32 [n].
    `kind`: the former name of `null` (kept for old callers).
    """
    null = kind if kind is not None else null
    if null not in NULL_MODELS:
        raise MatchError(f"unknown null model {null!r}; use one of {', '.join(NULL_MODELS)}")
    A, B = _as_directions(A), _as_directions(B)
    dev = indexed_device(kw.get("device"))
    draws = null_draws(null, seed, n, A.n, A.d, dev)
    if null == "gaussian":
        X = draws["X"]
    else:
        X = gather_rows(A, draws["rows"]).to(dev)  # [n, d] (columns: [m, d], the pool)
        if null == "shuffle":
            X = X.gather(1, draws["perm"])
        elif null == "columns":
            X = X.gather(0, draws["pick"])
        else:
            X = X @ draws["Q"]
    m = top_k_pairs(TensorDirections(X), B, k=1, **kw)
    return m.row_values[:, 0].numpy()


_DRAWS: OrderedDict = OrderedDict()  # (null, seed, n, n_a, d, device) -> Future of the draws
_DRAWS_LOCK = threading.Lock()
_DRAW_POOL: list[ThreadPoolExecutor] = []


def draws_ahead(dev: torch.device) -> int:
    """Seeds whose null draws start early: the next layers' (seed + 1, ...), on a GPU, where the
    matching outruns the CPU's random draws; none on a CPU (the draws would compete with it)."""
    return 0 if dev.type == "cpu" else 4


def null_draws(null: str, seed: int, n: int, n_a: int, d: int, dev: torch.device) -> dict:
    """The null's random draws (from a CPU generator, so the null is the same on any device),
    prepared on `dev`, memoised: a layer's predecessors share one seed. On a GPU the draws of
    the next `draws_ahead` seeds start on background threads."""
    dev = indexed_device(dev)  # with its index: the threads must use this thread's GPU
    keys = [(null, seed + j, n, n_a, d, dev) for j in range(draws_ahead(dev) + 1)]
    with _DRAWS_LOCK:
        for key in keys[1:]:  # the seeds ahead first: they start while this one is drawn
            if key in _DRAWS:
                _DRAWS.move_to_end(key)
                continue
            if not _DRAW_POOL:
                _DRAW_POOL.append(ThreadPoolExecutor(4, thread_name_prefix="saeflow-null"))
            _DRAWS[key] = _DRAW_POOL[0].submit(_draw, *key)
        future = _DRAWS.get(keys[0])
        if future is None:
            future = _DRAWS[keys[0]] = Future()
            future.set_result(_draw(*keys[0]))
        _DRAWS.move_to_end(keys[0])
        while len(_DRAWS) > len(keys) + 1:  # the current seed's, the ones ahead, one spare
            _DRAWS.popitem(last=False)
    return future.result()


def _draw(null: str, seed: int, n: int, n_a: int, d: int, dev: torch.device) -> dict:
    """One null's draws, in the order the generator has always been used (the same null as
    before), prepared where the matching runs: the argsort and the QR are the costly parts."""
    g = torch.Generator().manual_seed(seed)
    if null == "gaussian":
        return {"X": torch.randn(min(n, n_a), d, generator=g).to(dev)}
    pool = max(n, 8192) if null == "columns" else n
    rows = torch.randperm(n_a, generator=g)[:pool].sort().values
    if null == "shuffle":
        keys = torch.rand((len(rows), d), generator=g)
        return {"rows": rows, "perm": torch.argsort(keys.to(dev), dim=1)}  # [n, d]
    if null == "columns":
        pick = torch.randint(0, len(rows), (min(n, n_a), d), generator=g)  # [n, d]
        return {"rows": rows, "pick": pick.to(dev)}
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64).to(dev))
    Q = Q * torch.sign(torch.diagonal(R))  # Haar-distributed (sign fix of the QR)
    return {"rows": rows, "Q": Q.float()}


# --- one-to-one matching --------------------------------------------------------------------
def permutation_match(A, B, dense_limit: int = 8192 * 8192, candidates: int = 32,
                      **kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching maximising the summed cosine (SAE Match), by linear assignment.

    Returns (rows, cols, cosines): A[rows[i]] is matched to B[cols[i]]; min(n_a, n_b) pairs.
    Up to `dense_limit` entries the full cosine matrix goes to scipy's linear_sum_assignment
    (exact). Beyond it, only each row's `candidates` best columns are kept and the sparse
    problem goes to scipy's min_weight_full_bipartite_matching (exact on that graph).
    """
    from scipy.optimize import linear_sum_assignment

    A, B = _as_directions(A), _as_directions(B)
    if A.d != B.d:
        raise MatchError(f"the dictionaries have different widths: {A.d} vs {B.d}")
    if A.n * B.n <= dense_limit:
        a, b = A.unit_block(0, A.n), B.unit_block(0, B.n)
        sims = (a @ b.T).double().cpu().numpy()  # [n_a, n_b]
        rows, cols = linear_sum_assignment(sims, maximize=True)
        return rows, cols, sims[rows, cols].astype(np.float32)
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    transpose = A.n > B.n  # a full matching must cover the smaller side
    X, Y = (B, A) if transpose else (A, B)
    m = top_k_pairs(X, Y, k=min(candidates, Y.n), cols=True, **kw)
    assert m.col_indices is not None and m.col_values is not None  # cols=True
    r = torch.cat([torch.arange(X.n).repeat_interleave(m.row_indices.shape[1]),
                   m.col_indices.flatten()])
    c = torch.cat([m.row_indices.flatten(),
                   torch.arange(Y.n).repeat_interleave(m.col_indices.shape[1])])
    v = torch.cat([m.row_values.flatten(), m.col_values.flatten()])
    keys, first = np.unique((r * Y.n + c).numpy(), return_index=True)  # a pair found twice once
    cost = csr_matrix(((2.0 - v.double().numpy()[first]), (keys // Y.n, keys % Y.n)),
                      shape=(X.n, Y.n))  # cost 2 - cos > 0: explicit entries stay edges
    try:
        rows, cols = min_weight_full_bipartite_matching(cost)
    except ValueError as e:
        raise MatchError(f"no one-to-one matching exists among the top-{candidates} candidates "
                         f"of each feature; raise `candidates`") from e
    cosines = (2.0 - np.asarray(cost[rows, cols]).ravel()).astype(np.float32)
    return (cols, rows, cosines) if transpose else (rows, cols, cosines)

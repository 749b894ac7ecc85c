"""Exact top-k matching between two dictionaries of directions, in bounded memory.

A *dictionary* is any source of rows [n, d] that can be read in blocks (`Directions`): a tensor
in memory, or a safetensors matrix read row-block by row-block from disk (so a 1M-wide SAE never
has to sit in memory), optionally projected (attn_z -> residual through W_O) and scaled
(threshold folding).

    top_k_pairs(A, B, k, cols=True) -> Matches(row_values [n_a, k], row_indices [n_a, k],
                                               col_values [n_b, k], col_indices [n_b, k])

One pass computes each block of cosine similarities once (a GEMM) and feeds it to both a running
row top-k (A -> B, e.g. predecessors) and a running column top-k (B -> A, e.g. successors), so
the two directions cost one GEMM, not two. Memory is O(block_a * block_b + (n_a + n_b) * k),
never n_a * n_b. The result is exact in fp32; `precision="bf16"` ranks candidates in bf16 and
re-scores the best `k + rerank_margin` of them exactly in fp32 (the values are exact; the
membership of the top-k is exact unless bf16 rounding pushed a true member below k + margin
candidates; benchmarks/bench_flow.py measures how often).
"""
from __future__ import annotations

import json
import os
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from saeflow.errors import MatchError
from saeflow.flow.config import MATCH_METHODS, NULL_MODELS  # noqa: F401 (their old home)


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

    @abstractmethod
    def _read(self, i0: int, i1: int) -> torch.Tensor:  # [i1-i0, d_src]
        """Raw rows i0..i1 of the source dictionary (each subclass reads its own storage)."""

    def block(self, i0: int, i1: int) -> torch.Tensor:
        """Rows i0..i1 in the matching space, float32 [i1-i0, d]."""
        x = self._read(i0, i1).float()
        if self.project is not None:
            x = x @ self.project
        if self.drop_dims is not None:
            x = x.clone() if self.project is None else x  # never write into the source rows
            x[:, self.drop_dims] = 0.0
        return x

    def unit_block(self, i0: int, i1: int) -> torch.Tensor:
        """Unit rows, times `row_scale` when set (folded matching). Zero rows stay zero."""
        x = self.block(i0, i1)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.row_scale is not None:
            x = x * self.row_scale[i0:i1, None]
        return x

    def materialize(self, budget_bytes: int) -> "Directions":
        """An in-memory copy of the unit rows when it fits in `budget_bytes`, else self."""
        if self.n * self.d * 4 > budget_bytes:
            return self
        return TensorDirections(self.unit_block(0, self.n), normalized=True, label=self.label)


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

    def unit_block(self, i0, i1):
        if self.normalized and self.project is None and self.row_scale is None \
                and self.drop_dims is None:
            return self.W[i0:i1].float()
        return super().unit_block(i0, i1)


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


def _merge(best_v, best_i, v, i):
    cat_v = torch.cat([best_v, v], dim=1)
    cat_i = torch.cat([best_i, i], dim=1)
    top_v, pos = cat_v.topk(best_v.shape[1], dim=1)
    return top_v, cat_i.gather(1, pos)


def _as_directions(x) -> Directions:
    return x if isinstance(x, Directions) else TensorDirections(x)


def top_k_pairs(A, B, k: int = 5, cols: bool = False, block_a: int = 1024, block_b: int = 4096,
                precision: str = "fp32", rerank_margin: int = 4, memory_budget: int = 512 << 20,
                progress: Callable[[int], None] | None = None, device=None) -> Matches:
    """Top-k rows of B for every row of A (and, with cols=True, top-k rows of A for every row of B).

    A, B: `Directions` or tensors [n, d]. Similarities are cosines of the rows (times B's
    `row_scale` when set). `progress(n_rows_of_A_done)` is called after each A block.
    device: where the products and running top-k run (e.g. "cuda"); blocks are read on the host
    and moved there, and the result comes back to the CPU. None: the CPU.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    A, B = _as_directions(A), _as_directions(B)
    if A.d != B.d:
        raise MatchError(f"the dictionaries have different widths: {A.d} vs {B.d}; map them into "
                         f"the same space first (e.g. attn_z through W_O)")
    k_max = min(A.n, B.n) if cols else B.n
    if not 0 < k <= k_max:
        raise MatchError(f"k must be in 1..{k_max} (the size of the smaller dictionary)")
    if precision not in ("fp32", "bf16"):
        raise MatchError("precision must be 'fp32' or 'bf16'")
    B = B.materialize(memory_budget)  # read B once when it fits; else stream it per A block
    kc = min(k + rerank_margin, B.n) if precision == "bf16" else k  # candidates kept per row
    kc_col = min(k + rerank_margin, A.n) if precision == "bf16" else k
    n_a, n_b = A.n, B.n
    rows_b = _in_memory_rows(B)
    if rows_b is not None:
        rows_b = rows_b.to(dev)  # moved once
    B_low = rows_b.bfloat16() if precision == "bf16" and rows_b is not None else None  # once

    def b_block(b0: int, b1: int) -> torch.Tensor:
        if B_low is not None:
            return B_low[b0:b1]
        if rows_b is not None:
            return rows_b[b0:b1]
        return B.unit_block(b0, b1).to(dev)

    row_v = torch.empty(n_a, kc)
    row_i = torch.empty(n_a, kc, dtype=torch.long)
    col_v = torch.full((n_b, kc_col), float("-inf"), device=dev) if cols else None
    col_i = torch.zeros((n_b, kc_col), dtype=torch.long, device=dev) if cols else None
    on_host_a = _in_memory_rows(A)  # unit rows already: moved as they are
    for a0 in range(0, n_a, block_a):
        a1 = min(a0 + block_a, n_a)
        a = (on_host_a[a0:a1] if on_host_a is not None else A.unit_block(a0, a1)).to(dev)  # [ba, d]
        if precision == "bf16":
            a = a.bfloat16()
        best_v = torch.full((a.shape[0], kc), float("-inf"), device=dev)
        best_i = torch.zeros((a.shape[0], kc), dtype=torch.long, device=dev)
        for b0 in range(0, n_b, block_b):
            b = b_block(b0, min(b0 + block_b, n_b))  # [bb, d]
            sims = (a @ b.to(a.dtype).T).float()  # [ba, bb]
            v, i = sims.topk(min(kc, sims.shape[1]), dim=1)
            best_v, best_i = _merge(best_v, best_i, v, i + b0)
            if cols:
                assert col_v is not None and col_i is not None
                v, i = sims.T.topk(min(kc_col, sims.shape[0]), dim=1)  # [bb, kc]
                cv, ci = _merge(col_v[b0:b0 + b.shape[0]], col_i[b0:b0 + b.shape[0]], v, i + a0)
                col_v[b0:b0 + b.shape[0]], col_i[b0:b0 + b.shape[0]] = cv, ci
        row_v[a0:a0 + a.shape[0]], row_i[a0:a0 + a.shape[0]] = best_v.cpu(), best_i.cpu()
        if progress:
            progress(a.shape[0])
    if cols:
        assert col_v is not None and col_i is not None
        col_v, col_i = col_v.cpu(), col_i.cpu()
    if precision == "bf16":
        row_v, row_i = _rerank(A, B, row_i, k, device=dev)
        if cols:
            assert col_i is not None
            col_v, col_i = _rerank(B, A, col_i, k, device=dev)
    return Matches(row_v, row_i, col_v, col_i)


def _in_memory_rows(D: Directions) -> torch.Tensor | None:
    """The unit rows themselves when D holds them in memory as they are, else None."""
    if isinstance(D, TensorDirections) and D.normalized and D.project is None \
            and D.row_scale is None and D.drop_dims is None:
        return D.W
    return None


def _rerank(A: Directions, B: Directions, cand: torch.Tensor, k: int, block: int = 1024,
            device=None):
    """Exact fp32 scores of candidate pairs, re-sorted; keeps the best k. cand [n_a, kc]."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out_v = torch.empty(A.n, k)
    out_i = torch.empty(A.n, k, dtype=torch.long)
    rows_b = _in_memory_rows(B)
    if rows_b is not None:
        rows_b = rows_b.to(dev)
    for a0 in range(0, A.n, block):
        a = A.unit_block(a0, min(a0 + block, A.n)).float().to(dev)  # [ba, d]
        c = cand[a0:a0 + a.shape[0]].to(dev)  # [ba, kc]
        if rows_b is not None:
            # One candidate column at a time: a [ba, d] gather stays in cache, [ba, kc, d] not.
            s = torch.stack([(a * rows_b.index_select(0, c[:, j]).float()).sum(1)
                             for j in range(c.shape[1])], dim=1)  # [ba, kc]
        else:
            uniq, inv = torch.unique(c.cpu(), return_inverse=True)
            rows = gather_rows(B, uniq).to(dev)
            s = torch.einsum("ad,akd->ak", a, rows[inv.to(dev)])  # [ba, kc]
        v, pos = s.topk(k, dim=1)
        out_v[a0:a0 + a.shape[0]], out_i[a0:a0 + a.shape[0]] = v.cpu(), c.gather(1, pos).cpu()
    return out_v, out_i


def gather_rows(D: Directions, idx: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Unit rows D[idx] (idx sorted ascending), reading D block by block."""
    out = torch.empty(len(idx), D.d)
    for b0 in range(0, D.n, block):
        sel = (idx >= b0) & (idx < b0 + block)
        if sel.any():
            out[sel] = D.unit_block(b0, min(b0 + block, D.n))[idx[sel] - b0]
    return out


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
    A, B = _as_directions(A), _as_directions(B)
    g = torch.Generator().manual_seed(seed)  # draws on the CPU: the same null on any device
    dev = torch.device(kw.get("device") or "cpu")
    if null == "shuffle":
        rows = torch.randperm(A.n, generator=g)[:n].sort().values
        X = gather_rows(A, rows)  # [n, d]
        # the argsort of n x d random keys is the costly part; it runs where the matching does
        perm = torch.argsort(torch.rand(X.shape, generator=g).to(dev), dim=1)
        X = X.to(dev).gather(1, perm).cpu()
    elif null == "columns":
        rows = torch.randperm(A.n, generator=g)[:max(n, 8192)].sort().values
        S = gather_rows(A, rows)  # [m, d] unit rows: the pool each column is drawn from
        pick = torch.randint(0, len(rows), (min(n, A.n), A.d), generator=g)  # [n, d]
        X = S.gather(0, pick)
    elif null == "rotation":
        rows = torch.randperm(A.n, generator=g)[:n].sort().values
        Q, R = torch.linalg.qr(torch.randn(A.d, A.d, generator=g, dtype=torch.float64))
        Q = Q * torch.sign(torch.diagonal(R))  # Haar-distributed (sign fix of the QR)
        X = gather_rows(A, rows) @ Q.float()  # [n, d]
    elif null == "gaussian":
        X = torch.randn(min(n, A.n), A.d, generator=g)
    else:
        raise MatchError(f"unknown null model {null!r}; use one of {', '.join(NULL_MODELS)}")
    m = top_k_pairs(TensorDirections(X), B, k=1, **kw)
    return m.row_values[:, 0].numpy()


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
        sims = (a @ b.T).double().numpy()  # [n_a, n_b]
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

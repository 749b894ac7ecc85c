"""The tiled top-k engine behind `match.top_k_pairs`: GEMM tiles on one device, the running
top-k kept there, one copy back to the host at the end.

Similarities come tile by tile ([block_a, block_b], one GEMM each, in the ranking dtype). Every
tile feeds a running row top-k (each row's best columns so far) and a running column top-k, both
held on the computing device and merged by a top-k over [running, tile's best]; nothing is copied
back before the end. With bf16 ranking the best k + margin candidates of every row and column are
then re-scored in fp32 from the unit rows (a batched gather and a bmm, on the device) and cut to
k. On a CPU with the default tiles the operations are those of the former per-block loop, so the
fp32 results (values, indices, and how ties fall) are unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch

RANK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Rows:
    """One dictionary's unit rows as the engine reads them on `dev`.

    resident: the unit rows themselves [n, d] on `dev` (any float dtype; exact reads are fp32),
    or None: `read(i0, i1)` gives fp32 unit row blocks on `dev` (a dictionary streamed from the
    host). `rank_dtype` is what the tiles are computed in; a resident dictionary keeps one copy in
    it (none when it is stored in that dtype already).
    """

    def __init__(self, n: int, d: int, dev: torch.device, rank_dtype: torch.dtype,
                 resident: torch.Tensor | None = None,
                 read: Callable[[int, int], torch.Tensor] | None = None):
        if resident is None and read is None:
            raise ValueError("Rows needs resident rows or a reader")
        self.n, self.d, self.dev, self.rank_dtype = n, d, dev, rank_dtype
        self.W = resident  # [n, d] on dev, or None
        self._read = read
        self.low = None if resident is None else resident.to(rank_dtype)  # [n, d], made once

    def exact(self, i0: int, i1: int) -> torch.Tensor:  # [i1-i0, d] float32 on dev
        if self.W is not None:
            return self.W[i0:i1].float()
        assert self._read is not None
        return self._read(i0, i1)

    def rank(self, i0: int, i1: int) -> torch.Tensor:  # [i1-i0, d] in rank_dtype on dev
        if self.low is not None:
            return self.low[i0:i1]
        return self.exact(i0, i1).to(self.rank_dtype)


def merge(best_v, best_i, v, i):
    """The running top-k [m, k] merged with a tile's best [m, k']: top-k of the concatenation."""
    cat_v = torch.cat([best_v, v], dim=1)
    cat_i = torch.cat([best_i, i], dim=1)
    top_v, pos = cat_v.topk(best_v.shape[1], dim=1)
    return top_v, cat_i.gather(1, pos)


def col_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of every column of a tile [ba, bb] -> ([bb, k], [bb, k]). Transposed into a
    contiguous copy first: a top-k over strided slices is slow on a CPU and uncoalesced on a GPU,
    and the slices (so the results, ties included) are the same."""
    return sims.T.contiguous().topk(k, dim=1)


def scan(A: Rows, B: Rows, kc: int, kc_col: int, cols: bool, block_a: int, block_b: int,
         progress: Callable[[int], None] | None = None):
    """Running top-kc of every row of A over B (and top-kc_col of every row of B over A), in
    tiles. Returns (row_v [n_a, kc], row_i, col_v [n_b, kc_col] | None, col_i | None) on the
    device, values in the ranking dtype, indices int64, each row sorted descending."""
    dev, dt = A.dev, A.rank_dtype
    n_a, n_b = A.n, B.n
    row_v = torch.empty(n_a, kc, dtype=dt, device=dev)
    row_i = torch.empty(n_a, kc, dtype=torch.long, device=dev)
    col_v = torch.full((n_b, kc_col), float("-inf"), dtype=dt, device=dev) if cols else None
    col_i = torch.zeros((n_b, kc_col), dtype=torch.long, device=dev) if cols else None
    for a0 in range(0, n_a, block_a):
        a1 = min(a0 + block_a, n_a)
        a = A.rank(a0, a1)  # [ba, d]
        best_v = torch.full((a1 - a0, kc), float("-inf"), dtype=dt, device=dev)
        best_i = torch.zeros((a1 - a0, kc), dtype=torch.long, device=dev)
        for b0 in range(0, n_b, block_b):
            b1 = min(b0 + block_b, n_b)
            sims = a @ B.rank(b0, b1).T  # [ba, bb], the tile's GEMM
            v, i = sims.topk(min(kc, b1 - b0), dim=1)
            best_v, best_i = merge(best_v, best_i, v, i + b0)
            if cols:
                assert col_v is not None and col_i is not None
                v, i = col_topk(sims, min(kc_col, a1 - a0))  # [bb, kc_col]
                col_v[b0:b1], col_i[b0:b1] = merge(col_v[b0:b1], col_i[b0:b1], v, i + a0)
        row_v[a0:a1], row_i[a0:a1] = best_v, best_i
        if progress:
            progress(a1 - a0)
    return row_v, row_i, col_v, col_i


def rescore(X: Rows, Y: Rows, cand: torch.Tensor, k: int,
            take: Callable[[torch.Tensor], torch.Tensor], step: int, per_column: bool = False):
    """Exact fp32 cosines of candidate pairs, re-sorted; keeps the best k.

    cand [n_x, kc] (on the device): indices into Y per row of X. `take(idx)` gives Y's fp32 unit
    rows [m, d] on the device for a 1-D index. Rows of X go `step` at a time (the gathered
    candidate rows [step, kc, d] are the memory this takes). per_column: one candidate column
    at a time instead (a [step, d] gather stays in a CPU's cache, [step, kc, d] does not).
    Returns (values [n_x, k] fp32, indices) on the device.
    """
    n, kc = cand.shape
    out_v = torch.empty(n, k, device=cand.device)
    out_i = torch.empty(n, k, dtype=torch.long, device=cand.device)
    for c0 in range(0, n, step):
        c1 = min(c0 + step, n)
        x = X.exact(c0, c1)  # [c, d]
        c = cand[c0:c1]  # [c, kc]
        if per_column:
            s = torch.stack([(x * take(c[:, j])).sum(1) for j in range(kc)], dim=1)  # [c, kc]
        else:
            rows = take(c.reshape(-1)).view(c1 - c0, kc, X.d)  # [c, kc, d]
            s = torch.einsum("ad,akd->ak", x, rows)  # [c, kc], a batched matrix-vector product
        v, pos = s.topk(k, dim=1)
        out_v[c0:c1], out_i[c0:c1] = v, c.gather(1, pos)
    return out_v, out_i

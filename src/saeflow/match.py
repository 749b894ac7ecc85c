"""Exact top-k cosine matching between two dictionaries of directions, in bounded memory.

    top_k_cosine(A [n_a, d], B [n_b, d], k) -> (values [n_a, k], indices [n_a, k])

Rows are unit-normalised once; then A is processed in row blocks and B in column blocks, so
memory is O(block_a * block_b) rather than O(n_a * n_b): no n_a x n_b similarity matrix is ever
held. Each block's top-k is merged into a running top-k. The result is exact (not approximate).
"""
from __future__ import annotations

import torch


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """[n, d] -> float32 rows of unit norm (all-zero rows stay zero)."""
    W = W.float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def top_k_cosine(A: torch.Tensor, B: torch.Tensor, k: int = 5, block_a: int = 4096,
                 block_b: int = 16384, normalized: bool = False,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of A, the k rows of B with the highest cosine similarity.

    A [n_a, d], B [n_b, d] -> (values [n_a, k] float32, indices [n_a, k] int64), sorted
    descending. Ties keep the lower index of B first within a block.
    """
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError("top_k_cosine needs 2-D dictionaries [n, d]")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"the dictionaries have different widths: {A.shape[1]} vs {B.shape[1]}; "
                         f"map them into the same space first (e.g. attn_z through W_O)")
    if not 0 < k <= B.shape[0]:
        raise ValueError(f"k must be in 1..{B.shape[0]} (the size of the second dictionary)")
    if not normalized:
        A, B = unit_rows(A), unit_rows(B)
    A, B = A.to(dtype), B.to(dtype)
    n_a = A.shape[0]
    out_v = torch.empty(n_a, k, dtype=torch.float32, device=A.device)
    out_i = torch.empty(n_a, k, dtype=torch.long, device=A.device)
    for a0 in range(0, n_a, block_a):
        a = A[a0:a0 + block_a]  # [ba, d]
        best_v = torch.full((a.shape[0], k), float("-inf"), device=A.device)
        best_i = torch.zeros((a.shape[0], k), dtype=torch.long, device=A.device)
        for b0 in range(0, B.shape[0], block_b):
            sims = (a @ B[b0:b0 + block_b].T).float()  # [ba, bb]
            kk = min(k, sims.shape[1])
            v, i = sims.topk(kk, dim=1)
            cat_v = torch.cat([best_v, v], dim=1)
            cat_i = torch.cat([best_i, i + b0], dim=1)
            best_v, pos = cat_v.topk(k, dim=1)
            best_i = cat_i.gather(1, pos)
        out_v[a0:a0 + a.shape[0]] = best_v
        out_i[a0:a0 + a.shape[0]] = best_i
    return out_v, out_i

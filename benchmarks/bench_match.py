"""Blocked exact top-k cosine vs the naive full similarity matrix, in one run.

    .venv/bin/python benchmarks/bench_match.py [--n 16384 --d 640 --k 5]

Prints the time of each, the GFLOP/s of the blocked version, the peak size of the similarity
buffer each holds, and checks that both give the same indices.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=640)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--block-a", type=int, default=4096)
    ap.add_argument("--block-b", type=int, default=16384)
    args = ap.parse_args()

    from saeflow.flow.match import top_k_cosine, unit_rows

    g = torch.Generator().manual_seed(0)
    A = torch.randn(args.n, args.d, generator=g)
    B = torch.randn(args.n, args.d, generator=g)
    top_k_cosine(A[:256], B[:256], k=args.k)  # warm-up

    t = time.perf_counter()
    nA, nB = unit_rows(A), unit_rows(B)
    full = nA @ nB.T  # [n, n]: the baseline keeps the whole matrix
    rv, ri = full.topk(args.k, dim=1)
    t_naive = time.perf_counter() - t
    naive_bytes = full.numel() * 4
    del full

    t = time.perf_counter()
    v, i = top_k_cosine(A, B, k=args.k, block_a=args.block_a, block_b=args.block_b)
    t_block = time.perf_counter() - t
    block_bytes = min(args.block_a, args.n) * min(args.block_b, args.n) * 4
    same = float((i == ri).all(dim=1).float().mean())

    flop = 2 * args.n * args.n * args.d
    print(f"{args.n} x {args.n} directions, d={args.d}, k={args.k}, {torch.get_num_threads()} threads")
    print(f"naive full matrix: {t_naive:6.2f} s, similarity buffer {naive_bytes / 2**20:7.0f} MiB (1.00x)")
    print(f"blocked exact:     {t_block:6.2f} s, similarity buffer {block_bytes / 2**20:7.0f} MiB "
          f"({t_naive / t_block:.2f}x speed, {naive_bytes / block_bytes:.1f}x less memory), "
          f"{flop / t_block / 1e9:.0f} GFLOP/s")
    print(f"rows with identical top-{args.k} indices: {same:.4%}")


if __name__ == "__main__":
    main()

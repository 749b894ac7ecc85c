"""Shard arithmetic shared by the in-process and the Ray paths: which batches each shard holds,
and how shard accumulators are added in shard order (what makes any worker count give the same
bits)."""
from __future__ import annotations

import math
from typing import Callable


def shard_ranges(n_batches: int, per: int, first: int = 0) -> list[tuple[int, int, int]]:
    """(shard index, first batch, end batch) for shards `first`.. of `per` batches each."""
    return [(k, k * per, min(n_batches, (k + 1) * per))
            for k in range(first, math.ceil(n_batches / per))]


def merge_in_order(total, part):
    """`part` (the next shard) added into `total` (the shards before it). The first shard is
    taken as it is: 0 + x is x exactly, and the sums are not held twice."""
    if total is None:
        return part
    total.merge(part)
    return total


def load_shard(make_shard: Callable, k: int, device, state: dict | None):
    """An accumulator holding `state` (None: nothing merged yet)."""
    if state is None:
        return None
    acc = make_shard(max(k, 0), device)
    acc.load(state)
    return acc

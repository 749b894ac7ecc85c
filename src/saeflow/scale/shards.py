"""A corpus pass cut into shards of whole batches, accumulated shard by shard and merged in
shard order.

A consumer of the pass (the statistics, the feature index) is a factory `make_shard(k, device)`
of per-shard accumulators with four methods:
    on_batch(z, batch, content)   add one batch (the scan's callback)
    state() -> dict               CPU tensors/arrays (a checkpoint, or what a worker returns)
    load(state)                   the inverse
    merge(other)                  add another accumulator's sums into this one
Every shard starts from a fresh accumulator and the shards are merged into the total in shard
order, here and on Ray alike, so a float sum is formed in one order whatever the number of
workers: the results are bit-identical for 0, 1 or N workers at the same shard size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from saeflow.saes.scan import ScanSpec, scan
from saeflow.scale import ScaleConfig, shard_batches
from saeflow.scale.merge import load_shard, merge_in_order
from saeflow.scale.ray_backend import run_sharded


def sharded_scan(model, pack, slots, spec: ScanSpec, state_file: Path, identity: dict,
                 make_shard: Callable, *, scale: ScaleConfig | None = None, force: bool = False,
                 progress: bool = True, desc: str = "scan",
                 stop_after_batches: int | None = None, codes_on_device: bool = False,
                 error: type[Exception] = Exception) -> dict:
    """The pass, in this process (scale.workers == 0) or on Ray; returns scan's dict plus
    "total", the merged accumulator. The checkpoint has one format for both, so a pass started
    on Ray resumes in this process and the other way round."""
    per = shard_batches(scale, spec.batch_size, spec.ctx_len)
    if scale is not None and scale.distributed:

        return run_sharded(model, pack, slots, spec, state_file, identity, make_shard, per,
                           scale, force=force, progress=progress, desc=desc,
                           codes_on_device=codes_on_device, error=error)
    dev = model.device
    total = [None]  # the merged shards; None until the first (then it *is* the first shard)
    cur = {"shard": 0, "in_shard": 0, "merged_tokens": 0, "tokens": 0}
    local = [make_shard(0, dev)]

    def on_batch(z, b, content):
        local[0].on_batch(z, b, content)
        cur["in_shard"] += 1
        cur["tokens"] += int(content.sum())
        if cur["in_shard"] == per:
            total[0] = merge_in_order(total[0], local[0])
            cur["shard"] += 1
            cur["in_shard"] = 0
            cur["merged_tokens"] = cur["tokens"]
            local[0] = make_shard(cur["shard"], dev)

    def get_state():
        return {"total": None if total[0] is None else total[0].state(),
                "local": local[0].state(), "per": per, **cur}

    def set_state(st):
        if st.get("per") != per:
            raise error(f"{state_file} was cut into shards of {st.get('per')} batches, not "
                        f"{per}; resume with the same --shard-tokens (or --force)")
        total[0] = load_shard(make_shard, st["shard"] - 1, dev, st["total"])
        cur.update({k: st[k] for k in cur})
        local[0] = make_shard(cur["shard"], dev)
        local[0].load(st["local"])

    res = scan(model, pack, slots, spec, state_file, identity, on_batch, get_state, set_state,
               force=force, progress=progress, desc=desc, stop_after_batches=stop_after_batches,
               codes_on_device=codes_on_device, error=error)
    if cur["in_shard"] or total[0] is None:  # the last, shorter shard
        total[0] = merge_in_order(total[0], local[0])
    res["total"] = total[0]
    return res



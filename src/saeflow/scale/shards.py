"""A corpus pass cut into shards of whole batches, accumulated shard by shard and merged in
shard order.

A consumer of the pass (the statistics, the feature index) is a factory `make_shard(k, device)`
of per-shard accumulators with four methods:
    on_batch(z, batch, content, acts)   add one batch (the scan's callback)
    state() -> dict               CPU tensors/arrays (a checkpoint, or what a worker returns)
    load(state)                   the inverse
    merge(other)                  add another accumulator's sums into this one
Every shard starts from a fresh accumulator and the shards are merged into the total in shard
order, here and on Ray alike, so a float sum is formed in one order whatever the number of
workers: the results are bit-identical for 0, 1 or N workers at the same shard size.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

from saeflow.saes.pass_config import ScanSpec
from saeflow.saes.scan import (
    PassJob,
    PassParts,
    batch_budgets,
    check_memory,
    in_pass_order,
    scan,
)
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

    def on_batch(z, b, content, acts):
        local[0].on_batch(z, b, content, acts)
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




# The settings a pass's consumers must share to read one pass (the token budget may differ).
SHARED_SETTINGS = ("corpus", "seed", "batch_size", "ctx_len", "encoder_dtype", "split")


def can_share(jobs: list[PassJob]) -> bool:
    """Whether the jobs read the same corpus in the same batches (one pass can feed them)."""
    return all(getattr(j.spec, k) == getattr(jobs[0].spec, k)
               for j in jobs for k in SHARED_SETTINGS)


def run_jobs(model, pack, jobs: list[PassJob], *, scale: ScaleConfig | None = None,
             force: bool = False, progress: bool = True, state_file: Path | None = None,
             stop_after_batches: int | None = None) -> dict:
    """One corpus pass feeding every job (each over its own prefix of the batches), sharded
    and resumable like any pass; returns {job name: what its `finish` gives}.

    A single job checkpoints to its own state file; several share `state_file`. The codes stay
    on the model's device (the consumers' bookkeeping runs there)."""
    if not can_share(jobs):
        raise ValueError("these passes read the corpus differently; run them one by one")
    slots = in_pass_order({s for j in jobs for s in j.slots})
    check_memory(model, pack, slots, jobs[0].spec, jobs[0].error)  # before reading any text
    # the budgets are checked here, once for every part
    spec = replace(jobs[0].spec, tokens=max(j.spec.tokens for j in jobs), require_tokens=False)
    error = jobs[0].error
    per = shard_batches(scale, spec.batch_size, spec.ctx_len)
    tokens = {n: t for j in jobs for n, (_, t) in j.parts.items()}
    caps = {n for j in jobs if not j.spec.require_tokens for n in j.parts}
    budgets = batch_budgets(model.tokenizer, spec, tokens, error, caps)
    parts = {n: (make, budgets[n]) for j in jobs for n, (make, _) in j.parts.items()}
    one = len(jobs) == 1
    identity = jobs[0].identity if one else {j.name: j.identity for j in jobs}
    state_file = jobs[0].state_file if one else state_file
    if state_file is None:
        raise ValueError("a pass shared by several jobs needs its own state_file")
    res = sharded_scan(model, pack, slots, spec, state_file,
                       identity, partial(PassParts, parts, per), scale=scale, force=force,
                       progress=progress, desc="+".join(j.name for j in jobs),
                       stop_after_batches=stop_after_batches, codes_on_device=True, error=error)
    out = {j.name: j.finish(res["total"], res["seconds"], res["saes"]) for j in jobs}
    # published: the checkpoint is spent (a rerun with other settings starts afresh instead
    # of finding "a partial pass over a different config")
    state_file.unlink(missing_ok=True)
    return out

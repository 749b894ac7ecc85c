"""Scale-out on Ray: wall time of the statistics pass and of the flow in this process, on 1 Ray
worker and on 2, in one run; the speed-up, and the driver's merge overhead as a share of the
total. Every distributed result is checked bit-identical to the in-process one.

    .venv/bin/python benchmarks/bench_scale.py [--pack embedded-quick] [--tokens 16k]
        [--shard-tokens 4k] [--workers 1,2] [--skip-flow] [--json out.json]

The statistics: the 17 adjacent resid_post pairs of the pack over --tokens tokens, cut into
shards of --shard-tokens. The flow: every layer of the pack, computed from an empty cache.
"in-process" is the pass without Ray (the same shard-then-merge accumulation); the Ray rows
include the workers' model load (one per worker process) and Ray's own scheduling; Ray's start
is timed apart. On a 2-core machine the two workers share the cores with the driver: expect
little speed-up there; the figure that carries over to a cluster is the overhead.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def _same(a: Path, b: Path, names) -> bool:
    import pyarrow.parquet as pq

    return all(pq.read_table(a / n).equals(pq.read_table(b / n)) for n in names)


def pair_rate(width: int, l0: int, tokens: int, chunk: int = 512) -> dict:
    """One PairAccumulator (the driver-independent part of a shard's work, on one CPU core) on
    synthetic codes with power-law feature frequencies, half of the downstream activity copied
    from upstream: tokens/s per pair, and the unique co-active pairs it holds afterwards."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_stats import synthetic_acts

    from saeflow.evolution.stats import PairAccumulator

    acc = PairAccumulator(width, width)
    t_total = 0.0
    for a in range(0, tokens, chunk):
        zu = synthetic_acts(chunk, width, l0, seed=a)
        zd = synthetic_acts(chunk, width, l0, seed=a + 1, base=zu)
        t = time.perf_counter()
        acc.update(zu, zd)
        t_total += time.perf_counter() - t
        del zu, zd
    t = time.perf_counter()
    acc._compact()
    t_total += time.perf_counter() - t
    n_keys = len(acc.keys) if not acc.dense else int((acc.C > 0).sum())
    return {"width": width, "l0": l0, "tokens": tokens, "dense": acc.dense,
            "tokens_per_s_per_pair": round(tokens / t_total, 1), "unique_pairs": n_keys,
            "bytes_per_unique_pair": 24, "threads": torch.get_num_threads()}


def main() -> None:
    from saeflow.cli.options import _token_count

    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", default="embedded-quick")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tokens", type=_token_count, default=16384)
    ap.add_argument("--shard-tokens", type=_token_count, default=4096)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-flow", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep-dir", action="store_true",
                    help="keep the runs' folder (several GB) instead of removing it at exit")
    ap.add_argument("--pair-width", type=int, default=0,
                    help="instead: the per-pair accumulation rate at this width (e.g. 65536)")
    ap.add_argument("--pair-l0", type=int, default=64)
    ap.add_argument("--pair-tokens", type=int, default=4096)
    args = ap.parse_args()
    if args.pair_width:
        import torch

        torch.set_num_threads(1)
        res = pair_rate(args.pair_width, args.pair_l0, args.pair_tokens)
        print(json.dumps(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        return
    workers = [int(w) for w in args.workers.split(",")]

    import ray
    import torch

    from saeflow.evolution.stats import StatsConfig, run_stats
    from saeflow.flow.compute import run_flow
    from saeflow.flow.config import FlowConfig
    from saeflow.lm.model import load_model
    from saeflow.saes.recipes import open_pack
    from saeflow.scale import ScaleConfig
    from saeflow.scale import ray_backend as rb

    model = load_model(args.model, device=args.device)
    pack = open_pack(args.pack, model=model)
    cfg = StatsConfig(tokens=args.tokens, batch_size=args.batch_size, ctx_len=128,
                      pairs="adjacent", positions="resid_post")
    out: dict = {"pack": args.pack, "saes": len(pack), "tokens": args.tokens,
                 "shard_tokens": args.shard_tokens, "device": args.device,
                 "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "stats": [], "flow": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    if args.keep_dir:
        print(f"runs kept in {tmp}")
    else:  # each run writes GBs of caches and stats; a disk left full broke a later CI run
        atexit.register(shutil.rmtree, tmp, True)

    def stats_run(w: int, name: str | None = None) -> dict:
        scale = ScaleConfig(workers=w, shard_tokens=args.shard_tokens)
        t = time.perf_counter()
        st = run_stats(pack, model, tmp / (name or f"stats-{w}"), cfg, progress=False,
                       scale=scale)
        wall = time.perf_counter() - t
        row = {"workers": w, "wall_s": round(wall, 2), "run": name or ("in-process" if not w else f"{w} workers"),
               "tokens_per_s": round(st.manifest["tokens"] / wall, 1)}
        if w:
            job = dict(rb.last_job)
            over = job["merge_seconds"] + job["fetch_seconds"]
            row.update(shards=job["shards"], merge_s=round(job["merge_seconds"], 3),
                       fetch_s=round(job["fetch_seconds"], 3),
                       overhead_share=round(over / wall, 4),
                       mean_task_s=round(sum(job["task_seconds"]) / len(job["task_seconds"]), 2),
                       identical=_same(tmp / "stats-0" / "stats", tmp / f"stats-{w}" / "stats",
                                       ["edges.parquet", "features.parquet"]))
        return row

    def flow_run(w: int, name: str = "") -> dict:
        before = os.environ.get("SAEFLOW_CACHE")
        name = name or str(w)
        os.environ["SAEFLOW_CACHE"] = str(tmp / f"cache-{name}")  # empty: all computed
        scale = ScaleConfig(workers=w)
        t = time.perf_counter()
        try:
            run_flow(pack, tmp / f"flow-{name}", FlowConfig(device="cpu"), progress=False,
                     scale=scale)
        finally:  # the workers Ray starts later must find the model cache where it is
            if before is None:
                os.environ.pop("SAEFLOW_CACHE")
            else:
                os.environ["SAEFLOW_CACHE"] = before
        wall = time.perf_counter() - t
        row = {"workers": w, "wall_s": round(wall, 2), "layers": len(pack.layers("resid_post"))}
        if w:
            row["identical"] = _same(tmp / "flow-0", tmp / f"flow-{w}",
                                     ["predecessors.parquet", "successors.parquet"])
        return row

    # Warm-up (corpus files, tokenizer, SAE loads), not timed.
    run_stats(pack, model, tmp / "warm-up", replace(cfg, tokens=args.batch_size * 128),
              progress=False)
    out["stats"].append(stats_run(0))
    if not args.skip_flow:  # warm-up of the flow (the pack's files, first calls), not timed
        flow_run(0, "warm-up")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each Ray worker gets (a task of 1 CPU: OMP_NUM_THREADS=1)
    out["stats"].append(stats_run(0, "in-process, 1 thread"))
    torch.set_num_threads(threads)
    if not args.skip_flow:
        out["flow"].append(flow_run(0))
    t = time.perf_counter()
    ray.init(num_cpus=max(workers), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    out["ray_start_s"] = round(time.perf_counter() - t, 2)
    for w in workers:
        out["stats"].append(stats_run(w))
        if not args.skip_flow:
            out["flow"].append(flow_run(w))
    ray.shutdown()

    for what in ("stats", "flow"):
        rows = {r["workers"]: r for r in out[what] if r.get("run", "") != "in-process, 1 thread"}
        if 1 in rows:
            for r in out[what]:
                if r["workers"] > 1:
                    r["speedup_vs_1_worker"] = round(rows[1]["wall_s"] / r["wall_s"], 2)
    print(f"pack {args.pack} ({len(pack)} SAEs), {os.cpu_count()} CPUs, device {args.device}; "
          f"Ray start {out['ray_start_s']} s")
    print(f"stats: {args.tokens} tokens, 17 resid_post pairs, shards of {args.shard_tokens}")
    for r in out["stats"]:
        extra = "" if not r["workers"] else (
            f"  shards {r['shards']}  merge {r['merge_s']} s + fetch {r['fetch_s']} s = "
            f"{100 * r['overhead_share']:.1f}% of the total  identical {r['identical']}"
            + (f"  speed-up vs 1 worker x{r['speedup_vs_1_worker']}"
               if "speedup_vs_1_worker" in r else ""))
        label = r["run"] if not r["workers"] else f"{r['workers']} Ray worker(s)"
        print(f"  {label:<24} {r['wall_s']:>7.1f} s  {r['tokens_per_s']:>7.0f} tok/s{extra}")
    if out["flow"]:
        print(f"flow: {out['flow'][0]['layers']} layers from an empty cache")
        for r in out["flow"]:
            extra = "" if not r["workers"] else f"  identical {r['identical']}" + (
                f"  speed-up vs 1 worker x{r['speedup_vs_1_worker']}"
                if "speedup_vs_1_worker" in r else "")
            label = "in-process" if not r["workers"] else f"{r['workers']} Ray worker(s)"
            print(f"  {label:<24} {r['wall_s']:>7.1f} s{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

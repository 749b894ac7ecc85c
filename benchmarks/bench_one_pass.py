"""Eval, the feature index and the statistics from one corpus pass, against three (issue 28).

On the embedded pack (trained once into the cache), `saeflow run` stages go into fresh RUN
folders, each command a process of its own:
  fused      --only flow,eval,index,stats      eval's pass also feeds the index and statistics
  separate   --only flow,eval; --only index; --only stats      three passes over the text
Each stage's seconds come from RUN/pipeline.json, each command's peak RSS from wait4. The
tables of the two runs are compared exactly (index, statistics, eval.json's measures).
`--baseline-src DIR` adds the same stages run by an older checkout's code (its own pipeline:
`git worktree add /tmp/base <commit>`). The last line is `ratio N.NN`: separate / fused over
eval + index + stats (flow excluded: it is the same work in both).

    .venv/bin/python benchmarks/bench_one_pass.py --quick
    .venv/bin/python benchmarks/bench_one_pass.py --baseline-src /tmp/base
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parents[1]
STAGES = ("eval", "index", "stats")
QUICK = {"eval_tokens": 1024, "ce_tokens": 256, "dead_tokens": 8192, "index_tokens": 8000,
         "stats_tokens": 8000}
# the pipeline through its Python API (PipelineConfig fields; the CLI exposes only some)
RUN = ("import json, sys\n"
       "from saeflow.pipeline.config import PipelineConfig\n"
       "from saeflow.pipeline.stages import run_pipeline\n"
       "run_pipeline(sys.argv[1], PipelineConfig.from_flat(**json.loads(sys.argv[3])),\n"
       "             only=sys.argv[2].split(','), progress=False)\n")
FULL: dict[str, int] = {}  # the default profile's budgets
TABLES = ["index/features.parquet", "index/examples.parquet", "index/tokens.parquet",
          "stats/edges.parquet", "stats/features.parquet", "stats/cofire.parquet"]


def run(src: Path, out: Path, only: str, budgets: dict) -> tuple[float, float]:
    """One `saeflow run --only ...` with the code under `src`: (wall s, peak RSS GB)."""
    args = [sys.executable, "-c", RUN, str(out), only, json.dumps(budgets)]
    env = {**os.environ, "PYTHONPATH": str(src / "src"), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode() if p.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{err[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20


def stage_seconds(run_dir: Path) -> dict[str, float]:
    stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    return {s: stages[s]["seconds"] for s in stages if s in ("flow",) + STAGES}


def same_tables(a: Path, b: Path) -> list[str]:
    """The tables that differ between two RUN folders (empty: all identical)."""
    bad = []
    for t in TABLES:
        if (a / t).exists() != (b / t).exists():
            bad.append(t)
        elif (a / t).exists():
            try:
                pd.testing.assert_frame_equal(pq.read_table(a / t).to_pandas(),
                                              pq.read_table(b / t).to_pandas(), check_exact=True)
            except AssertionError:
                bad.append(t)
    ea, eb = (json.loads((r / "eval.json").read_text()) for r in (a, b))
    if [r for r in ea["saes"]] != [r for r in eb["saes"]]:
        bad.append("eval.json saes")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small budgets (<10 min on 2 cores)")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="an older checkout whose pipeline runs the same stages")
    ap.add_argument("--keep", type=Path, default=None, help="keep the RUN folders here")
    a = ap.parse_args()
    budgets = QUICK if a.quick else FULL
    root = a.keep or Path(tempfile.mkdtemp(prefix="bench-one-pass-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"budgets: {budgets or 'the default profile'}; runs in {root}", flush=True)
    rows = {}
    # flow first, in every run: the statistics count co-firing with its predecessors
    wall, rss = run(HERE, root / "fused", "flow,eval,index,stats", budgets)
    rows["fused"] = {**stage_seconds(root / "fused"), "peak_rss_gb": rss}
    rss_sep = []
    for only in ("flow,eval", "index", "stats"):
        rss_sep.append(run(HERE, root / "separate", only, budgets)[1])
    rows["separate"] = {**stage_seconds(root / "separate"), "peak_rss_gb": max(rss_sep)}
    if a.baseline_src is not None:
        rss = run(a.baseline_src, root / "baseline", "flow,eval,index,stats", budgets)[1]
        rows["baseline"] = {**stage_seconds(root / "baseline"), "peak_rss_gb": rss}
    table = pd.DataFrame(rows).T
    table["eval+index+stats"] = table[list(STAGES)].sum(1)
    print(table.round(2).to_string())
    ev = json.loads((root / "fused" / "eval.json").read_text())
    print(f"fused eval stage: pass {ev['seconds']['pass']} s (eval + index + stats), "
          f"splice {ev['seconds']['splice']} s")
    diff = same_tables(root / "fused", root / "separate")
    print("fused vs separate tables: " + ("identical" if not diff else f"DIFFER: {diff}"))
    total = table["eval+index+stats"]
    if "baseline" in rows:
        print(f"baseline / fused: {total['baseline'] / total['fused']:.2f}")
    print(f"ratio {total['separate'] / total['fused']:.2f}")


if __name__ == "__main__":
    main()

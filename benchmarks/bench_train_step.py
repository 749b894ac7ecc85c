"""One sparse-engine training step (SAETrainer.step) with n latents marked dead, this checkout
against another one (its own SAETrainer), in one run.

Width 4096, k 32, batch 1024, d 640 (the embedded default's shapes), the encoder dtype that
training picks here, random inputs with uneven per-dimension scales. Before each timed step the
first n latents are marked dead, so AuxK runs on exactly n of them. Each side runs in its own
process; the ratio is baseline / current per dead count.

    git worktree add /tmp/prev bb272dd
    .venv/bin/python benchmarks/bench_train_step.py --baseline-src /tmp/prev [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEAD = (0, 30, 60, 200, 1000)


def measure(steps: int) -> dict:
    """{dead count: mean ms per step} with the SAETrainer importable here."""
    import time

    import torch

    from saeflow.lm.model import resolve_dtype
    from saeflow.saes.train import SAETrainer, TrainConfig

    torch.manual_seed(0)
    d = 640
    cfg = TrainConfig(width=4096, k=32, tokens=300_000, batch_size=1024, dead_tokens=16384)
    dev = torch.device("cpu")
    t = SAETrainer(d, cfg, 293, dev, 0, resolve_dtype("auto", dev))
    x = torch.randn(8192, d) * torch.rand(d) * 3
    t.init_from(x)
    for i in range(3):  # warm-up
        t.step(x[:1024])
    out = {}
    for n in DEAD:
        total = 0.0
        for i in range(steps):
            t.since_fired[:n] = 10**6
            t0 = time.perf_counter()
            t.step(x[(i % 8) * 1024:(i % 8 + 1) * 1024])
            total += time.perf_counter() - t0
        out[n] = 1e3 * total / steps
    return out


def _run(src: Path, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src / "src")}
    res = subprocess.run([sys.executable, __file__, "--measure", "--steps", str(steps)], env=env,
                         check=True, capture_output=True, text=True)
    return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-src", type=Path, required=False)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.steps)))
        return
    here = Path(__file__).resolve().parents[1]
    cur = _run(here, args.steps)
    base = _run(args.baseline_src, args.steps) if args.baseline_src else None
    print(f"SAETrainer.step, width 4096, k 32, batch 1024, d 640; mean of {args.steps} steps")
    for n in DEAD:
        line = f"  dead {n:>5}: current {cur[n]:6.1f} ms"
        if base:
            line += f"   baseline {base[n]:6.1f} ms   baseline / current {base[n] / cur[n]:.2f}x"
        print(line)


if __name__ == "__main__":
    main()

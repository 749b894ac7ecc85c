"""Training-step timings, each against a baseline in the same run.

Sparse engine (default): one SAETrainer.step with n latents marked dead, this checkout
against another one (its own SAETrainer).

Width 4096, k 32, batch 1024, d 640 (the embedded default's shapes), the encoder dtype that
training picks here, random inputs with uneven per-dimension scales. Before each timed step the
first n latents are marked dead, so AuxK runs on exactly n of them. Each side runs in its own
process; the ratio is baseline / current per dead count.

    git worktree add /tmp/prev bb272dd
    .venv/bin/python benchmarks/bench_train_step.py --baseline-src /tmp/prev [--steps 30]

Stacked engine (--stacked): StackedTrainer.step against `old_stacked_step` below (the step as it
was before issue 29: autograd through the encoder's input, AuxK's dense masked top-k on every
step), two trainers from the same init stepped in turn on the same batches, with no dead latent,
a few per SAE (AuxK on them alone) and more than aux_k per SAE (the dense AuxK):

    .venv/bin/python benchmarks/bench_train_step.py --stacked --device cpu \
        --saes 6 --width 1024 --d 640 --batch 256 --steps 5
    .venv/bin/python benchmarks/bench_train_step.py --stacked --device cuda \
        --saes 54 --width 4096 --d 640 --batch 1024 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEAD = (0, 30, 60, 200, 1000)


def old_code(pre, k: int, batch_level: bool, linear: bool = False):
    """StackedTrainer._code before issue 29 (unchanged since, as stacked_kernels.code)."""
    import torch

    S, B, n = pre.shape
    if batch_level:
        vals, pos = pre.reshape(S, B * n).topk(B * k, dim=1)  # [S, B*k]
        z = torch.zeros_like(pre).reshape(S, B * n).scatter(1, pos, torch.relu(vals))
        return z.reshape(S, B, n), vals
    vals, idx = pre.topk(k, dim=-1)  # [S, B, k]
    acts = torch.where(torch.isfinite(vals), vals, 0.0) if linear else torch.relu(vals)
    return torch.zeros_like(pre).scatter(-1, idx, acts), vals


def old_stacked_loss(t, x):
    """The loss of StackedTrainer.step before issue 29, on trainer t; (loss, x, z, vals, err,
    dead, mse, aux), as that step's update used them."""
    import torch

    cfg, dt = t.cfg, t.enc_dtype
    S, B, _ = x.shape
    x = x.float() * t.input_scale[:, None, None]
    if t.dim_scale is not None:
        x = x * t.dim_scale[:, None, :]
    xc = x - t.b_dec[:, None, :]
    pre = torch.baddbmm(t.b_enc[:, None, :].to(dt), xc.to(dt), t.W_enc.to(dt))
    z, vals = old_code(pre, cfg.k, cfg.architecture == "batchtopk")  # [S, B, n]
    W_dec = t.W_dec.to(dt)
    recon = torch.bmm(z, W_dec).float() + t.b_dec[:, None, :]
    err = recon - x
    mse = err.pow(2).sum((1, 2)) / B  # [S]
    with torch.no_grad():
        dead = t.since_fired > t.dead_tokens  # [S, n]
        has_dead = dead.any(1)
    masked = pre.masked_fill(~dead[:, None, :], float("-inf"))
    az, _ = old_code(masked, min(t.aux_k, t.n), False, linear=cfg.aux_activation == "linear")
    arecon = torch.bmm(az, W_dec).float()
    aux = (arecon - err.detach().neg()).pow(2).sum((1, 2)) / B * has_dead  # [S]
    return (mse + cfg.aux_coef * aux).sum(), x, z, vals, err, dead, mse, aux


def old_stacked_step(t, x) -> None:
    """StackedTrainer.step before issue 29, on trainer t (its update is unchanged)."""
    from saeflow.saes.train.stacked import _Step

    loss, *parts = old_stacked_loss(t, x)
    for p in t.params:
        p.grad = None
    loss.backward()
    t._update(_Step(*parts))
    t.step_i += 1


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


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_stacked(args) -> None:
    """Old and new stacked steps, interleaved, per dead-latent scenario; prints tok/s."""
    import time

    import torch

    from saeflow.lm.model import resolve_dtype
    from saeflow.saes.train import StackedTrainer, TrainConfig, recipe

    torch.manual_seed(0)
    dev = torch.device(args.device)
    S, n, d, B = args.saes, args.width, args.d, args.batch
    dt = resolve_dtype(args.dtype, dev)
    cfg = TrainConfig(width=n, k=args.k, tokens=10**8, batch_size=B)
    x = (torch.randn(S, 8 * B, d) * torch.rand(d) * 3).to(dev)
    sides = {"old": (StackedTrainer(d, cfg, 10**5, dev, list(range(S)), dt), old_stacked_step),
             "new": (StackedTrainer(d, cfg, 10**5, dev, list(range(S)), dt), StackedTrainer.step)}
    for t, _ in sides.values():
        t.init_from(x)
    aux_k = recipe.aux_k_of(cfg, d)
    print(f"stacked step: {S} SAEs, width {n}, d {d}, k {args.k}, batch {B}, aux_k {aux_k}, "
          f"{str(dt).removeprefix('torch.')} products, {dev}; mean of {args.steps} steps each")
    for n_dead in (0, max(1, aux_k // 4), min(n, 2 * aux_k)):
        ms = {}
        for i in range(2 + args.steps):  # 2 warm-up steps
            for side, (t, fn) in sides.items():
                if n_dead:
                    with torch.no_grad():
                        t.since_fired[:, :n_dead] = 10**9
                    t.refresh_dead_bound()
                _sync(dev)
                t0 = time.perf_counter()
                fn(t, x[:, (i % 8) * B:(i % 8 + 1) * B])
                _sync(dev)
                if i >= 2:
                    ms[side] = ms.get(side, 0.0) + 1e3 * (time.perf_counter() - t0) / args.steps
        path = sides["new"][0].aux_path
        print(f"  dead {n_dead:>5} per SAE (new AuxK: {path:<7}): old {B / ms['old'] * 1e3:9.0f} "
              f"tok/s ({ms['old']:7.1f} ms)   new {B / ms['new'] * 1e3:9.0f} tok/s "
              f"({ms['new']:7.1f} ms)   new / old {ms['old'] / ms['new']:.2f}x")
    diff = max(float((a - b).detach().abs().max()) for a, b in
               zip(sides["old"][0].params, sides["new"][0].params, strict=True))
    print(f"  parameters after {3 * (2 + args.steps)} steps: max |old - new| = {diff:.2e}")


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
    ap.add_argument("--stacked", action="store_true", help="the stacked engine, old vs new")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="encoder product dtype (auto: bf16 on cuda)")
    ap.add_argument("--saes", type=int, default=6)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--d", type=int, default=640)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    if args.stacked:
        measure_stacked(args)
        return
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

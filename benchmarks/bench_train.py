"""Training throughput of a whole SAE family, and which side bounds it.

One run measures, over the same tokens:
  (a) the model's plain forward (capture dtype as training uses it, no hooks);
  (b) the SAE updates alone (every SAE's steps on activations captured beforehand), for each
      engine asked: "sparse" (one SAE at a time, sparse products: the CPU engine, and what the
      GPU ran before the stacked engine) and "stacked" (all SAEs of one width as one bmm);
  (c) the full training loop (train_family: capture + all SAE updates) with the last engine;
and the roofline of the card for the same products, measured in the same run:
  - a bf16 GEMM of 8192^3 (the card's practical peak),
  - the stacked SAE's own product shapes ([S, B, d] x [S, d, n]) alone.
SAE work is counted as 12 * d * n FLOP per token and SAE (forward and backward of a dense encoder
and decoder; AuxK and the sparse/dense choice are overhead on top of it).

    .venv/bin/python benchmarks/bench_train.py [--chunks 2] [--engine both] [--device cuda]

Side by side against an older checkout (its own code and its own default recipe), whole
`saeflow train` runs alternated in one run, the ratio pair by pair:

    git worktree add /tmp/base 79f34da   # main when issue 15 was taken up
    .venv/bin/python benchmarks/bench_train.py --baseline-src /tmp/base --tokens 49152 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _gemm_tflops(dev, shape, dtype, reps=10) -> float:
    """TFLOP/s of a batched product of `shape` = (S, B, d, n) on dev."""
    S, B, d, n = shape
    a = torch.randn(S, B, d, device=dev, dtype=dtype)
    b = torch.randn(S, d, n, device=dev, dtype=dtype)
    torch.bmm(a, b)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        torch.bmm(a, b)
    _sync(dev)
    return 2 * S * B * d * n * reps / (time.perf_counter() - t) / 1e12


def _train_run(src: Path, tokens: int, out: Path) -> float:
    """Training tok/s of one `saeflow train` (54 SAEs of the embedded model, that checkout's
    default recipe) with the code under `src`; the pack's own wall_seconds (loop only)."""
    cmd = [sys.executable, "-m", "saeflow.cli", "train", "--model", "embedded", "--positions",
           "resid_post,mlp_out,attn_out", "--layers", "all", "--width", "4096", "--k", "32",
           "--tokens", str(tokens), "--out", str(out), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(src / "src")}
    where = subprocess.run([sys.executable, "-c", "import saeflow; print(saeflow.__file__)"],
                           env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(src / "src")), f"{where} is not the code under {src}"
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prov = json.loads((out / "pack.json").read_text())["provenance"]
    return prov["tokens"] / prov["wall_seconds"]


def side_by_side(baseline: Path, tokens: int, repeats: int) -> None:
    here = Path(__file__).resolve().parents[1]
    print(f"whole training runs, {tokens} tokens, 54 SAEs; baseline {baseline}, current {here}; "
          f"alternated {repeats}x", flush=True)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            base = _train_run(baseline, tokens, Path(tmp) / "base")
            cur = _train_run(here, tokens, Path(tmp) / "cur")
            ratios.append(cur / base)
            print(f"  pair {r + 1}: baseline {base:6.0f} tok/s, current {cur:6.0f} tok/s, "
                  f"current / baseline = {cur / base:.2f}", flush=True)
    print(f"median current / baseline: {statistics.median(ratios):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="an older checkout: compare whole training runs side by side")
    ap.add_argument("--tokens", type=int, default=49152, help="with --baseline-src")
    ap.add_argument("--repeats", type=int, default=2, help="with --baseline-src")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--chunks", type=int, default=2, help="chunks of 8192 tokens")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--device", default=None)
    ap.add_argument("--engine", default="both", choices=["sparse", "stacked", "both"])
    ap.add_argument("--skip-loop", action="store_true", help="skip (c), the full loop")
    args = ap.parse_args()
    if args.baseline_src is not None:
        side_by_side(args.baseline_src, args.tokens, args.repeats)
        return

    from saeflow import HookPoint, capture, load_model
    from saeflow.lm.corpora import Corpus
    from saeflow.lm.hookpoints import parse_layers
    from saeflow.lm.hooks import model_body
    from saeflow.lm.model import resolve_dtype
    from saeflow.saes.train import SAETrainer, StackedTrainer, TrainConfig, train_family

    model = load_model(args.model, device=args.device)
    dev = model.device
    layers = parse_layers(args.layers, model.n_layers)
    engines = ["sparse", "stacked"] if args.engine == "both" else [args.engine]
    cfg = TrainConfig(layers=layers, width=args.width, k=args.k,
                      tokens=args.chunks * 8192, checkpoint_every_s=1e9, engine=engines[-1])
    slots = [(p, L) for p in cfg.positions for L in layers]
    cap_dtype = resolve_dtype(cfg.model_dtype, dev)
    enc_dtype = resolve_dtype(cfg.encoder_dtype, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev} " \
        f"({torch.get_num_threads()} threads)"
    print(f"{len(slots)} SAEs (width {cfg.width}, k {cfg.k}), {cfg.tokens} tokens, "
          f"capture {cap_dtype}, encoder {enc_dtype}, on {name}; torch {torch.__version__}")

    batches, n = [], 0
    for b in Corpus.from_spec(cfg.corpus, seed=0).token_batches(model.tokenizer, cfg.model_batch,
                                                               cfg.ctx_len):
        batches.append(b)
        n += int(b.content_mask().sum())
        if n >= cfg.tokens:
            break

    # (a) plain forward
    model.hf.to(cap_dtype)
    body = model_body(model)
    with torch.inference_mode():
        body(input_ids=batches[0].input_ids.to(dev), use_cache=False)
        _sync(dev)
        t = time.perf_counter()
        for b in batches:
            body(input_ids=b.input_ids.to(dev), use_cache=False)
        _sync(dev)
        t_fwd = time.perf_counter() - t

    # (b) SAE updates alone, on one chunk of activations captured beforehand (reused per chunk)
    points = [HookPoint(p, L) for p, L in slots]
    chunk = {s: [] for s in slots}
    got = 0
    for b in batches:
        acts = capture(model, b.input_ids, points)
        m = b.content_mask().to(dev)
        for s, pt in zip(slots, points):
            chunk[s].append(acts[pt][m])
        got += int(b.content_mask().sum())
        if got >= cfg.chunk_tokens:
            break
    model.hf.to(torch.float32)
    xs = {s: torch.cat(chunk[s])[:cfg.chunk_tokens] for s in slots}
    del chunk
    steps_total = cfg.chunk_tokens // cfg.batch_size * args.chunks
    t_sae = {}
    for engine in engines:
        _sync(dev)
        t_sae[engine] = 0.0
        if engine == "sparse":
            for i, s in enumerate(slots):
                tr = SAETrainer(xs[s].shape[1], cfg, steps_total, dev, i, enc_dtype)
                tr.init_from(xs[s])
                tr.step(xs[s][:cfg.batch_size])  # warm-up
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(args.chunks):
                    for xb in xs[s].split(cfg.batch_size):
                        tr.step(xb)
                _sync(dev)
                t_sae[engine] += time.perf_counter() - t0
        else:
            widths: dict[int, list] = {}
            for s in slots:
                widths.setdefault(xs[s].shape[1], []).append(s)
            for w, group in widths.items():
                x = torch.stack([xs[s] for s in group])  # [S, N, d]
                tr = StackedTrainer(w, cfg, steps_total, dev, list(range(len(group))), enc_dtype)
                tr.init_from(x)
                tr.step(x[:, :cfg.batch_size])  # warm-up
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(args.chunks):
                    for b0 in range(0, x.shape[1], cfg.batch_size):
                        tr.step(x[:, b0:b0 + cfg.batch_size])
                tr.metrics()
                _sync(dev)
                t_sae[engine] += time.perf_counter() - t0
                del x, tr

    tok = cfg.tokens
    print(f"(a) plain forward:              {tok / t_fwd:9.0f} tok/s  ({t_fwd:6.2f} s)")
    for engine, t in t_sae.items():
        print(f"(b) SAE updates alone, {engine:<8} {tok / t:9.0f} tok/s  ({t:6.2f} s)")
    if len(t_sae) == 2:
        print(f"    stacked / sparse: {t_sae['sparse'] / t_sae['stacked']:.1f}x faster")
    flop_tok = sum(12 * xs[s].shape[1] * cfg.width for s in slots)  # per token, all SAEs
    last = t_sae[engines[-1]]
    achieved = flop_tok * tok / last / 1e12
    print(f"    SAE work: {flop_tok / 1e9:.2f} GFLOP per token -> {achieved:.1f} TFLOP/s "
          f"({engines[-1]})")
    if dev.type == "cuda":
        peak = _gemm_tflops(dev, (1, 8192, 8192, 8192), torch.bfloat16)
        own = _gemm_tflops(dev, (len(slots) // len(cfg.positions), cfg.batch_size, model.d_model,
                                 cfg.width), enc_dtype)
        print(f"    roofline in this run: bf16 8192^3 GEMM {peak:.0f} TFLOP/s; the SAE's own "
              f"product shapes in {str(enc_dtype).removeprefix('torch.')} {own:.0f} TFLOP/s")
        print(f"    SAE updates reach {achieved / peak:.1%} of the GEMM peak and "
              f"{achieved / own:.1%} of their own shapes' GEMM rate")
    if not args.skip_loop:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            res = train_family(model, replace(cfg), f"{tmp}/pack", progress=False)
            t_all = time.perf_counter() - t
        t_loop = res.wall_seconds
        t_b = t_sae[engines[-1]]
        print(f"(c) full training loop ({engines[-1]}): {tok / t_loop:9.0f} tok/s  ({t_loop:6.2f} s; "
              f"{t_all:.1f} s with pack writing)")
        print(f"    (a)+(b) predicts {tok / (t_fwd + t_b):.0f} tok/s; (c) reaches "
              f"{(t_fwd + t_b) / t_loop:.2f} of that; (c) / plain forward = {t_fwd / t_loop:.2f}. "
              f"Share: forward {t_fwd / (t_fwd + t_b):.0%}, SAE updates {t_b / (t_fwd + t_b):.0%}")


if __name__ == "__main__":
    main()

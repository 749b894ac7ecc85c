"""Training throughput of a whole SAE family, and which side bounds it.

One run measures, over the same tokens and at the same shapes (model batch, SAE batch, chunk):
  (a) the model's forward alone (capture dtype as training uses it, no hooks; with --layers
      short of the last layer, the forward up to the deepest layer, as the capture stops there);
  (b) the SAE updates alone (every SAE's steps on a chunk of activations captured beforehand,
      each batch gathered by a shuffled permutation as the loop does), for each engine asked:
      "sparse" (one SAE at a time, sparse products: the CPU engine) and "stacked" (all SAEs of
      one width as one bmm);
  (c) the full training loop (train_family: capture + all SAE updates) with the last engine;
and on a GPU the roofline of the card for the same products, measured in the same run:
  - a bf16 GEMM of 8192^3 (the card's practical peak),
  - the stacked SAE's own product shapes ([S, B, d] x [S, d, n]) alone.
SAE work is counted as 12 * d * n FLOP per token and SAE (forward and backward of a dense encoder
and decoder; AuxK and the sparse/dense choice are overhead on top of it).

    .venv/bin/python benchmarks/bench_train.py [--chunks 2] [--engine both] [--device cuda]
    # the embedded-gpu profile's shapes (model batch 256, SAE batch 4096, chunk 131,072):
    .venv/bin/python benchmarks/bench_train.py --profile gpu --tokens 2M --device cuda
    # the same shapes, tiny, on a CPU (a check that it runs):
    .venv/bin/python benchmarks/bench_train.py --profile gpu --layers 0 --width 256 \
        --model-batch 16 --chunk-tokens 8192 --tokens 16k

Side by side against an older checkout (its own code), whole `saeflow train` runs of the
configuration given here (profile and overrides) alternated in one run, the ratio pair by pair:

    git worktree add /tmp/base 79f34da   # main when issue 15 was taken up
    .venv/bin/python benchmarks/bench_train.py --baseline-src /tmp/base --tokens 49152 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import math
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


# --- the configuration: a profile's shapes (or TrainConfig's defaults) and overrides ------------
def make_config(args):
    """The TrainConfig measured: --profile's (or the defaults), overridden by the flags given."""
    from saeflow.lm.corpus_spec import parse_tokens
    from saeflow.saes.recipes import PROFILES
    from saeflow.saes.train import TrainConfig

    cfg = PROFILES[args.profile] if args.profile else TrainConfig()
    over = {k: v for k, v in (("width", args.width), ("k", args.k), ("batch_size", args.batch_size),
                              ("model_batch", args.model_batch), ("corpus", args.corpus))
            if v is not None}
    if args.chunk_tokens is not None:
        over["chunk_tokens"] = parse_tokens(args.chunk_tokens)
    chunk = over.get("chunk_tokens", cfg.chunk_tokens)
    tokens = parse_tokens(args.tokens) if args.tokens is not None else args.chunks * chunk
    over["tokens"] = math.ceil(tokens / chunk) * chunk  # whole chunks, as training counts them
    if cfg.dead_tokens is not None and "batch_size" in over:  # keep the dead window in steps
        over["dead_tokens"] = cfg.dead_tokens // cfg.batch_size * over["batch_size"]
    return replace(cfg, **over, checkpoint_every_s=1e9)


def _train_flags(cfg, layers: str) -> list[str]:
    """`saeflow train` flags for cfg (the flags every checkout compared here knows)."""
    flags = ["--positions", ",".join(cfg.positions), "--layers", layers]
    for name in ("width", "k", "architecture", "tokens", "batch_size", "lr", "model_batch",
                 "chunk_tokens", "dead_tokens", "corpus", "input_norm", "dim_cap",
                 "aux_activation"):
        value = getattr(cfg, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


# --- side by side with an older checkout --------------------------------------------------------
def _train_run(src: Path, flags: list[str], out: Path, device: str | None) -> float:
    """Training tok/s of one `saeflow train` with the code under `src`; the pack's own
    wall_seconds (loop only)."""
    cmd = [sys.executable, "-m", "saeflow.cli", "train", "--model", "embedded", *flags,
           "--out", str(out), "--overwrite"] + (["--device", device] if device else [])
    env = {**os.environ, "PYTHONPATH": str(src / "src")}
    where = subprocess.run([sys.executable, "-c", "import saeflow; print(saeflow.__file__)"],
                           env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(src / "src")), f"{where} is not the code under {src}"
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prov = json.loads((out / "pack.json").read_text())["provenance"]
    return prov["tokens"] / prov["wall_seconds"]


def side_by_side(baseline: Path, flags: list[str], repeats: int, device: str | None) -> None:
    here = Path(__file__).resolve().parents[1]
    print(f"whole training runs, saeflow train {' '.join(flags)}; baseline {baseline}, current "
          f"{here}; alternated {repeats}x", flush=True)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            base = _train_run(baseline, flags, Path(tmp) / "base", device)
            cur = _train_run(here, flags, Path(tmp) / "cur", device)
            ratios.append(cur / base)
            print(f"  pair {r + 1}: baseline {base:6.0f} tok/s, current {cur:6.0f} tok/s, "
                  f"current / baseline = {cur / base:.2f}", flush=True)
    print(f"median current / baseline: {statistics.median(ratios):.2f}")


# --- (a) and (b) ----------------------------------------------------------------------------------
def time_forward(model, batches, layers) -> float:
    """Seconds of the forwards of `batches` (to the deepest layer used)."""
    from saeflow import HookPoint, capture
    from saeflow.lm.hooks import model_body

    dev = model.device
    body = model_body(model)
    deepest = [HookPoint("resid_post", max(layers))]

    def fwd(b):
        if max(layers) == model.n_layers - 1:
            body(input_ids=b.input_ids.to(dev), use_cache=False)
        else:
            capture(model, b.input_ids, deepest)
    with torch.inference_mode():
        fwd(batches[0])
        _sync(dev)
        t = time.perf_counter()
        for b in batches:
            fwd(b)
        _sync(dev)
        return time.perf_counter() - t


def capture_chunk(model, batches, cfg, slots, groups):
    """One chunk of every slot's activations, captured as the loop does: a buffer per group."""
    from saeflow.lm.hooks import capture
    from saeflow.saes.train import chunks

    bufs = [chunks.ChunkBuffer(g, cfg.chunk_tokens + cfg.model_batch * cfg.ctx_len) for g in groups]
    dev = torch.device(model.device)
    got = 0
    for b in batches:
        mask = b.content_mask()
        rows = chunks.to_device(mask.reshape(-1).nonzero().squeeze(1), dev)
        acts = capture(model, b.input_ids, slots, attention_mask=b.attention_mask)
        for buf in bufs:
            buf.add(acts, rows, got)
        got += rows.shape[0]
        if got >= cfg.chunk_tokens:
            return bufs, got
    raise SystemExit(f"the batches hold {got} tokens, less than one chunk ({cfg.chunk_tokens})")


def time_updates(engine, bufs, n_buf, groups, cfg, dev, enc_dtype, n_chunks) -> float:
    """Seconds of n_chunks chunks of SAE steps on the captured chunk (a fresh permutation per
    chunk, each batch gathered by it, as the loop does), every SAE of the family."""
    from saeflow.saes.train import SAETrainer, StackedTrainer

    steps_total = cfg.chunk_tokens // cfg.batch_size * n_chunks
    gen = torch.Generator().manual_seed(0)
    perms = [torch.randperm(n_buf, generator=gen)[:cfg.chunk_tokens].to(dev)
             for _ in range(n_chunks)]
    total = 0.0
    for group, buf in zip(groups, bufs):
        x0 = buf.rows(perms[0])  # [S, N, d]: the init's chunk
        d = x0.shape[2]
        # the sparse engine: one SAE at a time (made when it is timed); stacked: all at once
        units = [slice(i, i + 1) for i in range(len(group))] if engine == "sparse" \
            else [slice(None)]
        for sl in units:
            if engine == "sparse":
                tr = SAETrainer(d, cfg, steps_total, dev, sl.start, enc_dtype)
            else:
                tr = StackedTrainer(d, cfg, steps_total, dev, list(range(len(group))), enc_dtype)
            tr.init_from(x0[sl])
            tr.step(buf.rows(perms[0][:cfg.batch_size])[sl])  # warm-up
            _sync(dev)
            t0 = time.perf_counter()
            for perm in perms:
                for b0 in range(0, perm.shape[0], cfg.batch_size):
                    tr.step(buf.rows(perm[b0:b0 + cfg.batch_size])[sl])  # [S, B, d]
            tr.metrics()
            _sync(dev)
            total += time.perf_counter() - t0
            del tr
        del x0
    return total


def report_gemm(dev, n_slots, n_positions, d_model, cfg, enc_dtype, flop_tok, tok, t_b) -> None:
    peak = _gemm_tflops(dev, (1, 8192, 8192, 8192), torch.bfloat16)
    own = _gemm_tflops(dev, (n_slots // n_positions, cfg.batch_size, d_model, cfg.width), enc_dtype)
    achieved = flop_tok * tok / t_b / 1e12
    print(f"    roofline in this run: bf16 8192^3 GEMM {peak:.0f} TFLOP/s; the SAE's own "
          f"product shapes in {str(enc_dtype).removeprefix('torch.')} {own:.0f} TFLOP/s")
    print(f"    SAE updates reach {achieved / peak:.1%} of the GEMM peak and "
          f"{achieved / own:.1%} of their own shapes' GEMM rate")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="an older checkout: compare whole training runs side by side")
    ap.add_argument("--repeats", type=int, default=2, help="with --baseline-src")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--profile", default=None, help="a training profile's shapes: default, "
                    "quick or gpu (default: TrainConfig's defaults)")
    ap.add_argument("--tokens", default=None, help="tokens measured (e.g. 2M); default --chunks "
                    "chunks (49152 with --baseline-src)")
    ap.add_argument("--chunks", type=int, default=2, help="chunks measured, without --tokens")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--model-batch", type=int, default=None)
    ap.add_argument("--chunk-tokens", default=None)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--device", default=None)
    ap.add_argument("--engine", default=None, choices=["sparse", "stacked", "both"],
                    help="(b)'s engines; default both, or with --profile the device's engine")
    ap.add_argument("--skip-loop", action="store_true", help="skip (c), the full loop")
    ap.add_argument("--overlap", action="store_true", help="(c) also with SAEFLOW_OVERLAP=1 "
                    "(capture on a side CUDA stream), checked against the serial pack")
    args = ap.parse_args()
    if args.baseline_src is not None:
        if args.tokens is None:
            args.tokens = "49152"
        side_by_side(args.baseline_src, _train_flags(make_config(args), args.layers),
                     args.repeats, args.device)
        return
    measure(args)


def measure(args) -> None:
    from saeflow import load_model
    from saeflow.ids import Slot
    from saeflow.lm.corpora import Corpus
    from saeflow.lm.hookpoints import parse_layers
    from saeflow.lm.model import resolve_dtype
    from saeflow.saes.train import family as fam

    model = load_model(args.model, device=args.device)
    dev = torch.device(model.device)
    layers = parse_layers(args.layers, model.n_layers)
    engine = args.engine or ("both" if args.profile is None else
                             "stacked" if dev.type == "cuda" else "sparse")
    engines = ["sparse", "stacked"] if engine == "both" else [engine]
    cfg = replace(make_config(args), layers=layers, engine=engines[-1])
    slots = [Slot(p, L) for p in cfg.positions for L in layers]
    groups: dict[int, list] = {}
    for s in slots:
        groups.setdefault(model.width(s.position), []).append(s)
    cap_dtype = resolve_dtype(cfg.model_dtype, dev)
    enc_dtype = resolve_dtype(cfg.encoder_dtype, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev} " \
        f"({torch.get_num_threads()} threads)"
    tok, n_chunks = cfg.tokens, cfg.tokens // cfg.chunk_tokens
    print(f"{len(slots)} SAEs (width {cfg.width}, k {cfg.k}), {tok} tokens in chunks of "
          f"{cfg.chunk_tokens}, SAE batch {cfg.batch_size}, model batch {cfg.model_batch} x "
          f"{cfg.ctx_len}, capture {cap_dtype}, encoder {enc_dtype}, on {name}; torch "
          f"{torch.__version__}", flush=True)

    batches, n = [], 0
    for b in Corpus.from_spec(cfg.corpus, seed=0).token_batches(model.tokenizer, cfg.model_batch,
                                                               cfg.ctx_len):
        batches.append(b)
        n += int(b.content_mask().sum())
        if n >= tok:
            break
    with fam._model_in(model, cap_dtype):  # the weights come back exact afterwards
        t_fwd = time_forward(model, batches, layers)
        print(f"(a) forward alone:              {tok / t_fwd:9.0f} tok/s  ({t_fwd:6.2f} s)",
              flush=True)
        bufs, n_buf = capture_chunk(model, batches, cfg, slots, list(groups.values()))
    del batches
    t_sae = {}
    for e in engines:
        t_sae[e] = time_updates(e, bufs, n_buf, list(groups.values()), cfg, dev, enc_dtype,
                                n_chunks)
        print(f"(b) SAE updates alone, {e:<8} {tok / t_sae[e]:9.0f} tok/s  ({t_sae[e]:6.2f} s)",
              flush=True)
    del bufs
    if len(t_sae) == 2:
        print(f"    stacked / sparse: {t_sae['sparse'] / t_sae['stacked']:.1f}x faster")
    flop_tok = sum(12 * model.width(s.position) * cfg.width for s in slots)  # per token
    t_b = t_sae[engines[-1]]
    print(f"    SAE work: {flop_tok / 1e9:.2f} GFLOP per token -> "
          f"{flop_tok * tok / t_b / 1e12:.1f} TFLOP/s ({engines[-1]})")
    if dev.type == "cuda":
        report_gemm(dev, len(slots), len(cfg.positions), model.d_model, cfg, enc_dtype,
                    flop_tok, tok, t_b)
    if args.skip_loop:
        return
    full_loops(model, cfg, tok, t_fwd, t_b, engines[-1], overlap=args.overlap)


def full_loops(model, cfg, tok: int, t_fwd: float, t_b: float, engine: str,
               overlap: bool) -> None:
    """(c) the full loop, serial; with `overlap` (a GPU) also with the capture on a side
    stream (SAEFLOW_OVERLAP=1), whose pack must equal the serial one's bit for bit."""
    from saeflow.saes.train import train_family

    packs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ["serial", "overlap"] if overlap else ["serial"]:
            os.environ["SAEFLOW_OVERLAP"] = "1" if mode == "overlap" else "0"
            t = time.perf_counter()
            res = train_family(model, cfg, f"{tmp}/{mode}", progress=False)
            t_all = time.perf_counter() - t
            t_loop = res.wall_seconds
            print(f"(c) full training loop ({engine}, {mode}): {tok / t_loop:9.0f} tok/s  "
                  f"({t_loop:6.2f} s; {t_all:.1f} s with the corpus count and pack writing)",
                  flush=True)
            if mode == "serial":
                print(f"    (a)+(b) predicts {tok / (t_fwd + t_b):.0f} tok/s; (c) reaches "
                      f"{(t_fwd + t_b) / t_loop:.2f} of that; (c) / forward alone = "
                      f"{t_fwd / t_loop:.2f}. Share: forward {t_fwd / (t_fwd + t_b):.0%}, "
                      f"SAE updates {t_b / (t_fwd + t_b):.0%}")
            packs[mode] = {s: res.pack.sae(*s).tensors() for s in res.pack.entries}
        os.environ.pop("SAEFLOW_OVERLAP")
    if "overlap" in packs:
        a, b = packs["serial"], packs["overlap"]
        same = all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])
        print(f"    overlap pack identical to the serial one: {same}"
              + ("" if same else "  <-- a stream hand-over bug: keep SAEFLOW_OVERLAP off"))


if __name__ == "__main__":
    main()

"""Training throughput of a whole SAE family, and which side bounds it.

One run measures, over the same tokens:
  (a) the model's plain forward (capture dtype as training uses it, no hooks);
  (b) the SAE updates alone (every SAE's steps on activations captured beforehand);
  (c) the full training loop (train_family: capture + all SAE updates).
and prints tokens/s for each and the ratios.

    .venv/bin/python benchmarks/bench_train.py [--chunks 2] [--width 4096 --k 32] [--layers all]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--chunks", type=int, default=2, help="chunks of 8192 tokens")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    from saeflow import HookPoint, capture, load_model
    from saeflow.corpora import Corpus
    from saeflow.hookpoints import parse_layers
    from saeflow.hooks import _body
    from saeflow.train import SAETrainer, TrainConfig, _resolve_dtype, train_family

    model = load_model(args.model, device=args.device)
    dev = model.device
    layers = parse_layers(args.layers, model.n_layers)
    cfg = TrainConfig(layers=layers, width=args.width, k=args.k,
                      tokens=args.chunks * 8192, checkpoint_every_s=1e9)
    slots = [(p, L) for p in cfg.positions for L in layers]
    cap_dtype = _resolve_dtype(cfg.model_dtype, dev)
    enc_dtype = _resolve_dtype(cfg.encoder_dtype, dev)
    print(f"{len(slots)} SAEs (width {cfg.width}, k {cfg.k}), {cfg.tokens} tokens, "
          f"capture {cap_dtype}, encoder {enc_dtype}, {torch.get_num_threads()} threads, {dev}")

    batches = []
    n = 0
    for b in Corpus.from_spec(cfg.corpus, seed=0).token_batches(model.tokenizer, cfg.model_batch,
                                                               cfg.ctx_len):
        batches.append(b)
        n += int(b.content_mask().sum())
        if n >= cfg.tokens:
            break

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # (a) plain forward
    model.hf.to(cap_dtype)
    body = _body(model)
    with torch.inference_mode():
        body(input_ids=batches[0].input_ids.to(dev), use_cache=False)
        sync()
        t = time.perf_counter()
        for b in batches:
            body(input_ids=b.input_ids.to(dev), use_cache=False)
        sync()
        t_fwd = time.perf_counter() - t

    # (b) SAE updates alone, on activations captured beforehand (one chunk's worth, reused)
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
    steps_per_chunk = cfg.chunk_tokens // cfg.batch_size
    sync()
    t_sae = 0.0
    for i, s in enumerate(slots):
        x = torch.cat(chunk[s])[:cfg.chunk_tokens]
        tr = SAETrainer(x.shape[1], cfg, steps_per_chunk * args.chunks, dev, i, enc_dtype)
        tr.init_from(x)
        tr.step(x[:cfg.batch_size])  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(args.chunks):
            for xb in x.split(cfg.batch_size):
                tr.step(xb)
        sync()
        t_sae += time.perf_counter() - t0

    # (c) the full loop
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = train_family(model, cfg, f"{tmp}/pack", progress=False)
        t_all = time.perf_counter() - t
        t_loop = res.wall_seconds

    tok = cfg.tokens
    print(f"(a) plain forward:          {tok / t_fwd:8.0f} tok/s  ({t_fwd:6.1f} s)")
    print(f"(b) SAE updates alone:      {tok / t_sae:8.0f} tok/s  ({t_sae:6.1f} s, "
          f"{1000 * t_sae / (len(slots) * steps_per_chunk * args.chunks):.1f} ms per SAE step)")
    print(f"(c) full training loop:     {tok / t_loop:8.0f} tok/s  ({t_loop:6.1f} s; "
          f"{t_all:.1f} s with pack writing)")
    print(f"(a)+(b) predicts {tok / (t_fwd + t_sae):.0f} tok/s; (c) reaches "
          f"{(t_fwd + t_sae) / t_loop:.2f} of that. Share of time: forward "
          f"{t_fwd / (t_fwd + t_sae):.0%}, SAE updates {t_sae / (t_fwd + t_sae):.0%}")


if __name__ == "__main__":
    main()

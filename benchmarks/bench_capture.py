"""Model load times and hook-point capture throughput on the embedded model.

Prints, from one run:
  - cold load (empty cache: GGUF de-quantisation + writing the safetensors copy) and warm load;
  - tokens/s of a plain forward of the transformer body (no hooks, no LM head): the baseline;
  - tokens/s when capturing all 5 positions of all layers in the same forward, and the ratio;
  - tokens/s when capturing only layers <= 5 with early stop, and its ratio to the baseline.

    .venv/bin/python benchmarks/bench_capture.py [--batch 8 --ctx 256 --batches 4 --skip-cold]

On a machine without the model's weights (e.g. a lent GPU box), `--config config.json` builds
a randomly initialised model of that architecture (same shapes, so the same cost) and feeds
random token ids; the load-time lines are then skipped.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--device", default=None)
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--config", default=None, help="HF config.json: random-init model, random tokens")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()

    from saeflow import load_model
    from saeflow.lm.corpora import Corpus

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.config:
        model = _random_model(args.config, args.device, args.dtype)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(4, model.vocab_size, (args.batch, args.ctx), generator=g)
                   for _ in range(args.batches)]
        print(f"random-init {model.arch.family} from {args.config} on {model.device} "
              f"({str(model.dtype).removeprefix('torch.')})")
        return _measure(model, batches, args)
    if not args.skip_cold and args.model == "embedded":
        tmp = tempfile.mkdtemp(prefix="saeflow-bench-cache-")
        old = os.environ.get("SAEFLOW_CACHE")
        os.environ["SAEFLOW_CACHE"] = tmp
        try:
            m = load_model(args.model, device="cpu", progress=False)
            print(f"cold load (de-quantise + cache): {m.load_seconds:.1f} s")
            del m
            m = load_model(args.model, device="cpu")
            print(f"warm load (from that cache):     {m.load_seconds:.1f} s")
            del m
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is None:
                os.environ.pop("SAEFLOW_CACHE", None)
            else:
                os.environ["SAEFLOW_CACHE"] = old
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"warm load (user cache): {model.load_seconds:.1f} s on {model.device}")

    corpus = Corpus.from_spec(seed=0)
    batches = [b.input_ids for b in corpus.token_batches(
        model.tokenizer, args.batch, args.ctx, max_tokens=args.batch * args.ctx * args.batches)]
    _measure(model, batches, args)


def _random_model(config_path, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from saeflow.lm.hookpoints import architecture_for
    from saeflow.lm.model import LoadedModel, default_device, parse_dtype

    cfg = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).to(parse_dtype(dtype))
    hf.to(torch.device(device) if device else default_device()).eval()
    return LoadedModel(hf=hf, tokenizer=None, arch=architecture_for(cfg.model_type),
                       name=f"random-{cfg.model_type}", source=str(config_path))


def _measure(model, batches, args):
    from saeflow import POSITIONS, HookPoint, capture
    from saeflow.lm.hooks import model_body

    n_tok = sum(b.numel() for b in batches)
    body = model_body(model)
    dev = model.device

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_plain():
        with torch.inference_mode():
            for b in batches:
                body(input_ids=b.to(dev), use_cache=False)

    all_points = [HookPoint(p, L) for L in range(model.n_layers) for p in POSITIONS]
    early_points = [HookPoint(p, L) for L in range(6) for p in POSITIONS]

    def run_capture(points):
        def go():
            for b in batches:
                acts = capture(model, b, points)
                assert len(acts) == len(points)
        return go

    def timed(fn, reps=2):
        fn()  # warm-up (allocations, kernels)
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return n_tok / best

    base = timed(run_plain)
    full = timed(run_capture(all_points))
    early = timed(run_capture(early_points))
    print(f"tokens per run: {n_tok} ({args.batches} x {args.batch} x {args.ctx})")
    print(f"plain body forward (baseline):                    {base:8.0f} tok/s  1.00x")
    print(f"capture all {len(all_points)} hook points (5 pos x {model.n_layers} layers): "
          f"{full:8.0f} tok/s  {full / base:.2f}x")
    print(f"capture layers 0-5 only, early stop ({len(early_points)} points):  "
          f"{early:8.0f} tok/s  {early / base:.2f}x")


if __name__ == "__main__":
    main()

"""Issue 15, step 1: cache resid_post activations of a few layers of the embedded model on disk.

Train split: the first TOKENS content tokens of the default corpus (bf16 capture, as training
does); held-out split: HELDOUT content tokens (fp32). Also prints, per layer, how the residual's
variance is spread: the share of the top dimensions, and the share of the massive dimensions'
variance that comes from the 1% of tokens with the largest norm (are the massive dimensions a
property of a few outlier tokens, or of every token?).

    PYTHONPATH=src .venv/bin/python benchmarks/experiments/recipe15_cache.py \
        --out /tmp/exp15 --layers 0,3,5,6,9 --tokens 100k --heldout 25k
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def grab(m, layers, n_tokens, split, dtype, position="resid_post"):
    from saeflow import HookPoint, capture
    from saeflow.lm.corpora import Corpus

    pts = [HookPoint(position, L) for L in layers]
    xs = {L: [] for L in layers}
    ids_kept = []
    n = 0
    for b in Corpus.from_spec("wiki=0.8,python=0.2", seed=0).token_batches(
            m.tokenizer, 16, 128, split=split):
        mask = b.content_mask()
        with torch.inference_mode():
            acts = capture(m, b.input_ids, pts, attention_mask=b.attention_mask)
        for L, p in zip(layers, pts):
            xs[L].append(acts[p][mask].to(dtype))
        ids_kept.append(b.input_ids[mask])
        n += int(mask.sum())
        if n >= n_tokens:
            break
    return {L: torch.cat(v)[:n_tokens] for L, v in xs.items()}, torch.cat(ids_kept)[:n_tokens]


def main():
    from saeflow import load_model
    from saeflow.lm.corpora import parse_tokens
    from saeflow.saes.evaluate import massive_dims

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/exp15")
    ap.add_argument("--layers", default="0,3,5,6,9")
    ap.add_argument("--tokens", default="100k")
    ap.add_argument("--heldout", default="25k")
    ap.add_argument("--position", default="resid_post")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    layers = [int(v) for v in a.layers.split(",")]
    m = load_model("embedded", device="cpu")
    t = time.time()
    ho, ho_ids = grab(m, layers, parse_tokens(a.heldout), "heldout", torch.float32,
                      a.position)
    print(f"held-out capture {time.time() - t:.0f}s", flush=True)
    m.hf.to(torch.bfloat16)
    t = time.time()
    tr, _ = grab(m, layers, parse_tokens(a.tokens), "train", torch.bfloat16, a.position)
    print(f"train capture {time.time() - t:.0f}s ({parse_tokens(a.tokens) / (time.time() - t):.0f} tok/s)",
          flush=True)
    for L in layers:
        torch.save(tr[L].clone(), out / f"train_{L}.pt")
        torch.save(ho[L].clone(), out / f"heldout_{L}.pt")
        x = ho[L].double()
        var = x.var(0)
        mass = massive_dims(var.float())
        top = var.sort(descending=True).values
        norms = x.norm(dim=1)
        big = norms >= norms.quantile(0.99)
        xm = (x - x.mean(0))[:, mass]
        share_big = float(xm[big].pow(2).sum() / xm.pow(2).sum().clamp_min(1e-30)) if mass else 0.0
        print(f"layer {L}: top-1/5 dims {float(top[0] / var.sum()):.1%}/{float(top[:5].sum() / var.sum()):.1%}"
              f" of variance; massive dims {mass}; median norm {float(norms.median()):.1f}, "
              f"99th pct {float(norms.quantile(0.99)):.1f}, max {float(norms.max()):.1f}; "
              f"top-1% tokens by norm hold {share_big:.1%} of the massive dims' variance",
              flush=True)
    torch.save(ho_ids, out / "heldout_ids.pt")


if __name__ == "__main__":
    main()

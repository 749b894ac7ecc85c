"""The index's table writing (features/writer.write_index): the logit lens and the examples'
quantiles, the current form against the earlier one, on the embedded model in one run.

- Logit lens: every decoder row of `--saes` SAEs of the pack through the real unembedding
  (262,144 tokens), top and bottom 10. The earlier form turned each bf16 logit block into
  float32 before its top-k; the current one (`labels.logit_lens`) takes the top-k in bf16 and
  converts only the selected values. Both use the same bf16 product.
- Quantiles: where each kept example's activation falls in its feature's histogram, for a
  4096-feature SAE with 24 examples per feature: one Python call per example (earlier) against
  one vectorised call per SAE (`writer._quantiles_from_hist`).

Prints each form's time, their ratio, and whether the results are identical.

    .venv/bin/python benchmarks/bench_index_tables.py [--pack embedded] [--saes 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def logit_lens_float_blocks(model, dirs, n=10, vocab_block=16384):
    """The earlier form: each [N, vocab_block] bf16 block converted to float32, then top-k."""
    from saeflow.features.labels import unembed_directions

    W_U = model.hf.get_output_embeddings().weight.detach().to(torch.bfloat16)
    V, b = W_U.shape[0], dirs.shape[0]
    top_v = torch.full((b, n), -float("inf"))
    bot_v = torch.full((b, n), float("inf"))
    top_i = torch.zeros(b, n, dtype=torch.long)
    bot_i = torch.zeros(b, n, dtype=torch.long)
    for j in range(0, V, vocab_block):
        logits = unembed_directions(model, dirs, W_U[j:j + vocab_block])  # float32
        tv, ti = logits.topk(n, dim=1)
        bv, bi = logits.topk(n, dim=1, largest=False)
        top_v, sel = torch.cat([top_v, tv], 1).topk(n, dim=1)
        top_i = torch.cat([top_i, ti + j], 1).gather(1, sel)
        bot_v, sel = torch.cat([bot_v, bv], 1).topk(n, dim=1, largest=False)
        bot_i = torch.cat([bot_i, bi + j], 1).gather(1, sel)
    return top_i, top_v, bot_i, bot_v


def quantiles_per_example(hist, features, values):
    """The earlier form: the CDF of one feature rebuilt for each example."""
    from saeflow.features.writer import HIST_EDGES

    edges = HIST_EDGES.numpy()
    out = []
    for f, v in zip(features, values):
        cdf = np.cumsum(hist[f]) / max(hist[f].sum(), 1)
        b = np.clip(np.searchsorted(edges, np.array([v])) - 1, 0, hist.shape[1] - 1)
        out.append(cdf[b][0])
    return np.array(out, np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", default="embedded")
    ap.add_argument("--saes", type=int, default=3, help="resid_post SAEs of layers 0, 1, ...")
    args = ap.parse_args()

    from saeflow.features.labels import logit_lens
    from saeflow.features.writer import HIST_EDGES, _quantiles_from_hist
    from saeflow.lm.model import load_model
    from saeflow.saes.recipes import open_pack

    model = load_model("embedded")
    pack = open_pack(args.pack, model=model)
    print(f"{torch.get_num_threads()} threads; vocabulary {model.vocab_size}")
    t_old = t_new = 0.0
    same = True
    for L in range(args.saes):
        dirs = pack.sae("resid_post", L).W_dec.float()  # [d_sae, d_model]
        t = time.perf_counter()
        old = logit_lens_float_blocks(model, dirs)
        t_old += time.perf_counter() - t
        t = time.perf_counter()
        new = logit_lens(model, dirs)
        t_new += time.perf_counter() - t
        same &= all(torch.equal(a, b) for a, b in zip(old, new))
    print(f"logit lens, {args.saes} SAEs of {dirs.shape[0]} features: float32 blocks "
          f"{t_old:.1f} s, bf16 top-k (current) {t_new:.1f} s, ratio {t_old / t_new:.2f}x; "
          f"identical: {same}")

    rng = np.random.default_rng(0)
    d, per = 4096, 24
    hist = rng.integers(0, 200, size=(d, len(HIST_EDGES) - 1))
    feats = np.repeat(np.arange(d), per)
    vals = rng.lognormal(0, 1, size=d * per).astype(np.float32)
    t = time.perf_counter()
    q_old = quantiles_per_example(hist, feats, vals)
    t_q_old = time.perf_counter() - t
    t = time.perf_counter()
    q_new = _quantiles_from_hist(hist, feats, vals).astype(np.float32)
    t_q_new = time.perf_counter() - t
    print(f"quantiles, {d * per} examples of one SAE: per example {t_q_old:.2f} s, vectorised "
          f"{t_q_new * 1e3:.1f} ms, ratio {t_q_old / t_q_new:.0f}x; identical: "
          f"{bool(np.array_equal(q_old, q_new))}")


if __name__ == "__main__":
    main()

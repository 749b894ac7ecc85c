"""Sparse co-activation statistics vs the dense einsum of the original work, in one run.

    .venv/bin/python benchmarks/bench_stats.py synthetic [--width 24576 --l0 64 --tokens 16384]
    .venv/bin/python benchmarks/bench_stats.py embedded [--tokens 8192]

synthetic: two SAEs' activations with a realistic L0 (power-law feature frequencies, and half of
    the downstream activity copied from upstream features). Times saeflow's PairAccumulator and
    the dense reference (per batch: einsum of the activations and of the indicators into
    d_up x d_down matrices) on the same tokens, and checks they agree.
embedded: the embedded model and pack: one capture + encode of every resid_post SAE (timed),
    then the 17 adjacent resid_post pairs accumulated sparsely and densely (timed); tokens/s
    of each with the encode included.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def synthetic_acts(T: int, d: int, l0: int, seed: int, base: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    freq = 1.0 / torch.arange(1, d + 1).float() ** 0.7  # power-law feature frequencies
    freq = freq[torch.randperm(d, generator=g)]
    idx = torch.multinomial(freq, l0 * T, replacement=True, generator=g).view(T, l0)
    z = torch.zeros(T, d)
    z.scatter_(1, idx, torch.rand(T, l0, generator=g) * 4 + 0.1)
    if base is not None:  # half of the downstream activity follows upstream features
        perm = torch.randperm(d, generator=g)
        z[:, perm[: d // 2]] = torch.maximum(z[:, perm[: d // 2]], base[:, : d // 2] * 0.9)
    return z


def dense_update(Cd, Pd, zu, zd):
    Cd += (zu > 0).float().T @ (zd > 0).float()
    Pd += zu.T @ zd


def bench_synthetic(args) -> dict:
    from saeflow.evolution.stats import PairAccumulator

    T, d = args.tokens, args.width
    zu = synthetic_acts(T, d, args.l0, 0)
    zd = synthetic_acts(T, d, args.l0, 1, base=zu)
    acc = PairAccumulator(d, d, dense_limit=0)  # at 24k the sums are kept sparse
    t = time.perf_counter()
    for i in range(0, T, args.batch):
        acc.update(zu[i:i + args.batch], zd[i:i + args.batch])
    acc._compact()
    accumulate_s = time.perf_counter() - t
    n_pairs = len(acc.pairs()["up"])  # every measure of every co-active pair, once at the end
    sparse_s = time.perf_counter() - t
    del acc  # the dense reference below needs 2 x 2.4 GB at width 24k
    n_dense = min(T, args.dense_tokens)
    Cd = torch.zeros(d, d)
    Pd = torch.zeros(d, d)
    t = time.perf_counter()
    for i in range(0, n_dense, args.batch):
        dense_update(Cd, Pd, zu[i:i + args.batch], zd[i:i + args.batch])
    dense_s = time.perf_counter() - t
    # Agreement on the same tokens: accumulate the first n_dense tokens sparsely too.
    check = PairAccumulator(d, d, dense_limit=0)
    for i in range(0, n_dense, args.batch):
        check.update(zu[i:i + args.batch], zd[i:i + args.batch])
    q = check.pairs()
    count_err = float(np.abs(Cd[q["up"], q["down"]].numpy() - q["count"]).max())
    nnz_dense = int((Cd > 0).sum())
    del Cd, Pd
    sparse_tps, dense_tps = T / sparse_s, n_dense / dense_s
    return {"case": f"synthetic, width {d}, L0 {args.l0}", "tokens_sparse": T,
            "tokens_dense": n_dense, "sparse_accumulate_s": round(accumulate_s, 1),
            "sparse_measures_s": round(sparse_s - accumulate_s, 1),
            "sparse_tokens_per_s": round(sparse_tps, 1),
            "dense_tokens_per_s": round(dense_tps, 2), "speedup": round(sparse_tps / dense_tps, 1),
            "co_active_pairs": n_pairs, "same_pairs_as_dense": nnz_dense == len(q["up"]),
            "max_count_difference": count_err}


def bench_embedded(args) -> dict:
    from saeflow.evolution.stats import PairAccumulator
    from saeflow.lm.corpora import Corpus
    from saeflow.lm.hooks import HookPoint, capture
    from saeflow.lm.model import load_model
    from saeflow.saes.recipes import open_pack

    model = load_model("embedded")
    pack = open_pack("embedded")
    layers = pack.layers("resid_post")
    saes = {L: pack.sae("resid_post", L) for L in layers}
    pts = [HookPoint("resid_post", L) for L in layers]
    corpus = Corpus.from_spec("wiki=0.8,python=0.2", seed=0)
    zs = {L: [] for L in layers}
    t = time.perf_counter()
    for b in corpus.token_batches(model.tokenizer, 32, 128, max_tokens=args.tokens):
        acts = capture(model, b.input_ids, pts, attention_mask=b.attention_mask)
        with torch.inference_mode():
            for L, pt in zip(layers, pts):
                zs[L].append(saes[L].encode(acts[pt]).float()[b.content_mask()])
    encode_s = time.perf_counter() - t
    zs = {L: torch.cat(v) for L, v in zs.items()}
    T = zs[layers[0]].shape[0]
    pairs = [(L, L + 1) for L in layers if L + 1 in zs]
    t = time.perf_counter()
    for u, d in pairs:
        acc = PairAccumulator(zs[u].shape[1], zs[d].shape[1])
        for i in range(0, T, 4096):
            acc.update(zs[u][i:i + 4096], zs[d][i:i + 4096])
        acc.pairs()
    sparse_s = time.perf_counter() - t
    n = zs[layers[0]].shape[1]
    t = time.perf_counter()
    for u, d in pairs:
        Cd, Pd = torch.zeros(n, n), torch.zeros(n, n)
        for i in range(0, T, 4096):
            dense_update(Cd, Pd, zs[u][i:i + 4096], zs[d][i:i + 4096])
    dense_s = time.perf_counter() - t
    return {"case": f"embedded pack, {len(pairs)} adjacent resid_post pairs, width {n}",
            "tokens": T, "forward_and_encode_s": round(encode_s, 1),
            "sparse_pairs_s": round(sparse_s, 1), "dense_pairs_s": round(dense_s, 1),
            "sparse_tokens_per_s_with_encode": round(T / (encode_s + sparse_s), 1),
            "dense_tokens_per_s_with_encode": round(T / (encode_s + dense_s), 1),
            "speedup_pairs_only": round(dense_s / sparse_s, 1),
            "speedup_with_encode": round((encode_s + dense_s) / (encode_s + sparse_s), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["synthetic", "embedded"])
    ap.add_argument("--width", type=int, default=24576)
    ap.add_argument("--l0", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dense-tokens", type=int, default=1024,
                    help="synthetic: tokens the dense reference is timed on (it is slow)")
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    res = bench_synthetic(args) if args.mode == "synthetic" else bench_embedded(args)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

"""Issue 15, step 2: train resid_post SAEs of a few layers under recipe variants, on activations
cached by recipe15_cache.py, and measure them on held-out text.

For each variant and layer: dead fraction (never active on the cached held-out tokens), FVU
overall and without the massive dimensions, L0, ΔCE / KL of the spliced reconstruction on
HELDOUT_CE held-out tokens; for layers 5 -> 6 the flow proxy: the share of layer-6 features
whose best layer-5 decoder cosine is >= 0.5 (s_res >= 0.5), over all features and alive ones.

    PYTHONPATH=src .venv/bin/python benchmarks/experiments/recipe15_train.py \
        --cache /tmp/exp15 --variants base,dim,dim_lr3 [--layers 0,3,5,6,9] [--out results.jsonl]

Variants are named below (VARIANTS): TrainConfig overrides plus `epochs` (passes over the
cached tokens) and `drop_outliers` (leave out training tokens whose norm is above that many
times the median).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

BASE = dict(width=4096, k=32, batch_size=1024, lr=1e-3, chunk_tokens=8192)
VARIANTS = {
    "base": {},
    "dim": dict(input_norm="dim"),
    "dc3": dict(input_norm="dim", dim_cap=3.0),
    "dc10": dict(input_norm="dim", dim_cap=10.0),
    "dc30": dict(input_norm="dim", dim_cap=30.0),
    "dc10_lr2": dict(input_norm="dim", dim_cap=10.0, lr=2e-3),
    "dc10_btk": dict(input_norm="dim", dim_cap=10.0, architecture="batchtopk"),
    "dc10_lr4": dict(input_norm="dim", dim_cap=10.0, lr=4e-3),
    "dc10_lr4_btk": dict(input_norm="dim", dim_cap=10.0, lr=4e-3, architecture="batchtopk"),
    "dc10_lr2_ep2": dict(input_norm="dim", dim_cap=10.0, lr=2e-3, epochs=2),
    "dc3_lr2": dict(input_norm="dim", dim_cap=3.0, lr=2e-3),
    "dc3_btk": dict(input_norm="dim", dim_cap=3.0, architecture="batchtopk"),
    "dim_lr2": dict(input_norm="dim", lr=2e-3),
    "dim_lr4": dict(input_norm="dim", lr=4e-3),
    "dim_ep3": dict(input_norm="dim", epochs=3),
    "dim_btk": dict(input_norm="dim", architecture="batchtopk"),
    "dim_drop": dict(input_norm="dim", drop_outliers=4.0),
    "base_drop": dict(drop_outliers=4.0),
    "dim_aux": dict(input_norm="dim", aux_coef=1 / 4, dead_tokens=8192),
    # dead latents of attn_out / mlp_out (the default recipe is dc10_lr4)
    "lin": dict(input_norm="dim", dim_cap=10.0, lr=4e-3, aux_activation="linear"),
    "lin_w8": dict(input_norm="dim", dim_cap=10.0, lr=4e-3, aux_activation="linear",
                   dead_tokens=8192),
    "lin_w8_a8": dict(input_norm="dim", dim_cap=10.0, lr=4e-3, aux_activation="linear",
                      dead_tokens=8192, aux_coef=1 / 8),
    "rs": dict(input_norm="dim", dim_cap=10.0, lr=4e-3, resample_dead=True),
    "rs_w8": dict(input_norm="dim", dim_cap=10.0, lr=4e-3, resample_dead=True, dead_tokens=8192),
    "rs_lin": dict(input_norm="dim", dim_cap=10.0, lr=4e-3, resample_dead=True,
                   aux_activation="linear"),
    "lin_ak128": dict(input_norm="dim", dim_cap=10.0, lr=4e-3, aux_activation="linear",
                      aux_k=128),
    "lin_w16": dict(input_norm="dim", dim_cap=10.0, lr=4e-3, aux_activation="linear",
                    dead_tokens=16384),
    "w8_a8": dict(input_norm="dim", dim_cap=10.0, lr=4e-3, dead_tokens=8192, aux_coef=1 / 8),
}


def train_one(x, cfg, epochs, seed, drop):
    from saeflow.saes.train import SAETrainer

    if drop:
        n = x.float().norm(dim=1)
        x = x[n <= drop * n.median()]
    N = (x.shape[0] // cfg.chunk_tokens) * cfg.chunk_tokens
    x = x[:N]
    steps_total = epochs * N // cfg.batch_size
    t = SAETrainer(x.shape[1], cfg, steps_total, torch.device("cpu"), seed, torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    t.init_from(x[:cfg.chunk_tokens])
    for ep in range(epochs):
        for c0 in range(0, N, cfg.chunk_tokens):  # same chunked shuffle as train_family
            xc = x[c0:c0 + cfg.chunk_tokens]
            perm = torch.randperm(xc.shape[0], generator=g)
            xc = xc[perm]
            t.resample(xc)
            for b0 in range(0, xc.shape[0], cfg.batch_size):
                t.step(xc[b0:b0 + cfg.batch_size])
    return t, x.shape[0]


@torch.no_grad()
def measure(sae, xh):
    from saeflow.saes.evaluate import massive_dims

    fire = torch.zeros(sae.d_sae, dtype=torch.long)
    sse_dim = torch.zeros(sae.d_in, dtype=torch.float64)
    l0 = 0.0
    for b0 in range(0, xh.shape[0], 4096):
        xb = xh[b0:b0 + 4096]
        z = sae.encode(xb)
        on = z > 0
        fire += on.sum(0)
        l0 += float(on.sum())
        sse_dim += (sae.decode(z) - xb).double().pow(2).sum(0)
    var = xh.double().var(0, unbiased=False) * xh.shape[0]
    mass = massive_dims(var.float())
    rest = torch.ones(sae.d_in, dtype=torch.bool)
    rest[mass] = False
    return {"dead": float((fire == 0).float().mean()), "fvu": float(sse_dim.sum() / var.sum()),
            "fvu_rest": float(sse_dim[rest].sum() / var[rest].sum()), "l0": l0 / xh.shape[0],
            "alive": fire > 0}


@torch.no_grad()
def splice_ce(m, L, sae, ids, am, mask, clean_logp, tgt, tm, position="resid_post"):
    from saeflow import HookPoint, Hooks

    def edit(a):
        out = a.clone()
        out[mask] = sae(a[mask].float()).to(a.dtype)
        return out
    with Hooks(m, edits={HookPoint(position, L): edit}):
        logp = torch.log_softmax(m.hf(input_ids=ids, attention_mask=am).logits[:, :-1][tm].float(), -1)
    nll = -logp.gather(1, tgt[:, None])[:, 0]
    clean_nll = -clean_logp.gather(1, tgt[:, None])[:, 0]
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(1)
    return float(nll.mean() - clean_nll.mean()), float(kl.mean())


def main():
    from saeflow import load_model
    from saeflow.lm.corpora import Corpus
    from saeflow.saes.train import TrainConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/exp15")
    ap.add_argument("--variants", default="base,dim")
    ap.add_argument("--layers", default="0,3,5,6,9")
    ap.add_argument("--ce-rows", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--position", default="resid_post")
    a = ap.parse_args()
    torch.set_grad_enabled(True)
    cache = Path(a.cache)
    layers = [int(v) for v in a.layers.split(",")]
    m = load_model("embedded", device="cpu")
    b = next(Corpus.from_spec("wiki=0.8,python=0.2", seed=0).token_batches(
        m.tokenizer, a.ce_rows, 128, split="heldout"))
    ids, am, mask = b.input_ids, b.attention_mask, b.content_mask()
    tm = mask[:, 1:]
    tgt = ids[:, 1:][tm]
    with torch.no_grad():
        clean_logp = torch.log_softmax(m.hf(input_ids=ids, attention_mask=am).logits[:, :-1][tm].float(), -1)
    print(f"ΔCE on {tgt.numel()} held-out tokens", flush=True)
    for name in a.variants.split(","):
        spec = dict(VARIANTS[name])
        epochs, drop = spec.pop("epochs", 1), spec.pop("drop_outliers", None)
        cfg = TrainConfig(**{**BASE, **spec}, checkpoint_every_s=1e9)
        saes, alive = {}, {}
        for L in layers:
            x = torch.load(cache / f"train_{L}.pt")
            xh = torch.load(cache / f"heldout_{L}.pt")
            cfg.tokens = x.shape[0]
            t0 = time.time()
            tr, n_used = train_one(x, cfg, epochs, seed=L, drop=drop)
            wall = time.time() - t0
            sae = tr.export({})
            (cache / "saes").mkdir(exist_ok=True)
            torch.save(sae, cache / "saes" / f"{name}_{L}.pt")
            r = measure(sae, xh)
            alive[L] = r.pop("alive")
            saes[L] = sae
            dce, kl = splice_ce(m, L, sae, ids, am, mask, clean_logp, tgt, tm, a.position)
            row = {"variant": name, "position": a.position, "layer": L,
                   "train_dead": round(float(tr.last["dead"]), 4), **{k: round(v, 4) for k, v in r.items()},
                   "delta_ce": round(dce, 3), "kl": round(kl, 3), "train_tokens": n_used,
                   "epochs": epochs, "steps": tr.step_i, "train_s": round(wall, 1),
                   "heldout_tokens": xh.shape[0]}
            if cfg.architecture == "batchtopk":
                row["threshold"] = round(float(sae.threshold[0]), 4)
            print(json.dumps(row), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if 5 in saes and 6 in saes:
            u, d = saes[5].unit_directions(), saes[6].unit_directions()
            best = (d @ u.T).max(1).values
            row = {"variant": name, "flow_5_6": {
                "sres05_all": round(float((best >= 0.5).float().mean()), 4),
                "sres05_alive": round(float((best[alive[6]] >= 0.5).float().mean()), 4),
                "sres05_alive_both": round(float(((d[alive[6]] @ u[alive[5]].T).max(1).values >= 0.5)
                                                 .float().mean()), 4)}}
            print(json.dumps(row), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""Why resid_post ΔCE is large although FVU is small: the residual's massive dimensions.

Part 1 (needs a trained pack): for resid_post layers 0 and 6, the share of variance in the top
5 dimensions, FVU overall and outside them, and the CE of the model with (a) identity splicing,
(b) the SAE spliced in, (c) random error of the same per-token norm.
Part 2: trains two layer-6 resid_post SAEs on the same 98k tokens (one scalar input scale vs
per-dimension standardisation) and compares FVU and ΔCE.

    .venv/bin/python benchmarks/experiments/resid_dims.py --pack packs/gemma3-270m [--skip-train]
"""
from __future__ import annotations

import argparse
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", default="embedded")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()

    from saeflow import HookPoint, Hooks, capture, load_model
    from saeflow.lm.corpora import Corpus
    from saeflow.saes.recipes import open_pack
    from saeflow.saes.train import SAETrainer, TrainConfig

    torch.manual_seed(0)
    m = load_model("embedded", device="cpu")
    pack = open_pack(args.pack, model=m)
    b = next(Corpus.from_spec(seed=0).token_batches(m.tokenizer, 4, 128, split="heldout"))
    mask = b.content_mask()
    tm = mask[:, 1:]
    tgt = b.input_ids[:, 1:][tm]

    def ce(edit=None, p=None):
        with torch.no_grad(), Hooks(m, edits={p: edit} if edit else {}):
            lg = m.hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1][tm]
        return torch.nn.functional.cross_entropy(lg.float(), tgt).item()

    base = ce()
    print(f"part 1: {int(mask.sum())} held-out tokens, clean CE {base:.3f}")
    for L in (0, 6):
        p = HookPoint("resid_post", L)
        sae = pack.sae("resid_post", L)
        xm = capture(m, b.input_ids, [p])[p][mask]
        err = sae(xm) - xm
        var = (xm - xm.mean(0)).pow(2).sum(0)
        top = var.argsort(descending=True)[:5]
        rest = torch.ones(xm.shape[1], dtype=torch.bool)
        rest[top] = False

        def splice(a, f):
            out = a.clone()
            out[mask] = f(a[mask])
            return out

        def noise(x, e=err):
            r = torch.randn_like(e)
            return x + r / r.norm(dim=1, keepdim=True) * e.norm(dim=1, keepdim=True)
        print(f"  layer {L}: top-5 dims hold {float(var[top].sum() / var.sum()):.2%} of variance; "
              f"FVU {float(err.pow(2).sum() / var.sum()):.4f} overall, "
              f"{float(err[:, rest].pow(2).sum() / var[rest].sum()):.3f} outside them")
        print(f"    CE identity {ce(lambda a: splice(a, lambda x: x), p):.3f}, "
              f"SAE spliced {ce(lambda a: splice(a, sae), p):.3f}, "
              f"random error of the same norm {ce(lambda a: splice(a, noise), p):.3f}")
    if args.skip_train:
        return

    # Part 2: scalar vs per-dimension input normalisation, same tokens and recipe.
    p = HookPoint("resid_post", 6)
    xs, n = [], 0
    m.hf.to(torch.bfloat16)
    for bb in Corpus.from_spec(seed=0).token_batches(m.tokenizer, 16, 128):
        xs.append(capture(m, bb.input_ids, [p])[p][bb.content_mask()].float())
        n += len(xs[-1])
        if n >= 98304:
            break
    m.hf.to(torch.float32)
    X = torch.cat(xs)[:98304]
    X = X[torch.randperm(len(X))]
    sd = X.std(0).clamp_min(1e-3)
    cfg = TrainConfig(tokens=98304, lr=1e-3)

    def train(Z):
        t = SAETrainer(640, cfg, 96, torch.device("cpu"), 0, torch.bfloat16)
        t.init_from(Z[:8192])
        for xb in Z.split(1024):
            t.step(xb)
        return t.export({})
    plain, diag = train(X), train(X / sd)
    b = next(Corpus.from_spec(seed=0).token_batches(m.tokenizer, 8, 128, split="heldout"))
    mask = b.content_mask()
    tm = mask[:, 1:]
    tgt = b.input_ids[:, 1:][tm]
    base = ce()
    x = capture(m, b.input_ids, [p])[p][mask]
    var = (x - x.mean(0)).pow(2).sum()
    print(f"part 2: layer 6 resid_post, 96 steps of 1024 tokens; ΔCE on {len(tgt)} tokens")
    for name, rec in [("one scalar scale", lambda a: plain(a)),
                      ("per-dimension standardised", lambda a: diag(a / sd) * sd)]:
        e = rec(x) - x

        def spl(a, rec=rec):
            out = a.clone()
            out[mask] = rec(a[mask])
            return out
        print(f"  {name:27s} FVU {float(e.pow(2).sum() / var):.3f}  ΔCE {ce(spl, p) - base:.3f}")


if __name__ == "__main__":
    main()

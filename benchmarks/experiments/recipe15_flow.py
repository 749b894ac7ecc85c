"""Issue 15: is a high s_res share real or an artefact of the massive dimensions?

For SAEs saved by recipe15_train.py: the share of layer-B features whose best layer-A decoder
cosine is >= 0.5, (a) over all dimensions (what `saeflow flow` computes), (b) leaving out the
massive dimensions of both layers, and (c) for a far pair (0 -> 9) as a null; plus the share of
each decoder row's squared norm that lies in the massive dimensions (median over features).

    PYTHONPATH=src .venv/bin/python benchmarks/experiments/recipe15_flow.py --variants base,dim
"""
import argparse
from pathlib import Path

import torch


def share(d, u, keep=None):
    if keep is not None:
        d, u = d[:, keep], u[:, keep]
    d = torch.nn.functional.normalize(d, dim=1)
    u = torch.nn.functional.normalize(u, dim=1)
    return float(((d @ u.T).max(1).values >= 0.5).float().mean())


def main():
    from saeflow.saes.evaluate import massive_dims

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/exp15")
    ap.add_argument("--variants", default="base,dim")
    a = ap.parse_args()
    c = Path(a.cache)
    mass = set()
    for L in (0, 5, 6, 9):
        x = torch.load(c / f"heldout_{L}.pt")
        mass |= set(massive_dims(x.double().var(0).float()))
    keep = torch.ones(640, dtype=torch.bool)
    keep[sorted(mass)] = False
    print(f"massive dims (layers 0,5,6,9): {sorted(mass)}")
    for v in a.variants.split(","):
        W = {L: torch.load(c / "saes" / f"{v}_{L}.pt", weights_only=False).W_dec.float()
             for L in (0, 5, 6, 9) if (c / "saes" / f"{v}_{L}.pt").exists()}
        if 5 not in W or 6 not in W:
            continue
        frac = float((W[6][:, ~keep].pow(2).sum(1) / W[6].pow(2).sum(1)).median())
        row = (f"{v}: 5->6 s_res>=0.5 {share(W[6], W[5]):.1%} (all dims), "
               f"{share(W[6], W[5], keep):.1%} (massive dims left out); "
               f"median share of a layer-6 decoder row in the massive dims {frac:.1%}")
        if 0 in W and 9 in W:
            row += f"; null 0->9: {share(W[9], W[0]):.1%} / {share(W[9], W[0], keep):.1%}"
        print(row, flush=True)


if __name__ == "__main__":
    main()

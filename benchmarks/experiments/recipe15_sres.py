"""Issue 15: the share of residual features with s_res >= 0.5 on a whole pack, per layer, over
all dimensions (what `saeflow flow` computes) and with the massive dimensions left out; and the
median share of a decoder row's squared norm in those dimensions. Live latents as a flow run
marks them (RUN/predecessors.parquet).

    PYTHONPATH=src .venv/bin/python benchmarks/experiments/recipe15_sres.py PACK RUN 163,400,639
"""
import sys

import pandas as pd
import torch

from saeflow.saes.packs import load_pack

pack = load_pack(sys.argv[1]); run = sys.argv[2]
mass = [int(v) for v in sys.argv[3].split(",")]
d = pd.read_parquet(f"{run}/predecessors.parquet")
keep = torch.ones(640, dtype=torch.bool); keep[mass] = False
out = {}
for L in range(1, 18):
    u = pack.sae("resid_post", L - 1).W_dec.float(); w = pack.sae("resid_post", L).W_dec.float()
    lu = torch.tensor(d[d.layer == L - 1].sort_values("feature").live.values)
    lw = torch.tensor(d[d.layer == L].sort_values("feature").live.values)
    def best(a, b):
        a = torch.nn.functional.normalize(a, dim=1); b = torch.nn.functional.normalize(b, dim=1)
        return (a @ b.T).max(1).values
    full = best(w[lw], u[lu]); nom = best(w[lw][:, keep], u[lu][:, keep])
    frac = (w[lw][:, ~keep].pow(2).sum(1) / w[lw].pow(2).sum(1)).median()
    out[L] = (float((full >= .5).float().mean()), float((nom >= .5).float().mean()), float(frac))
    print(L, *[f"{v:.1%}" for v in out[L]], flush=True)
import statistics

print("median 4-13: all dims", f"{statistics.median(out[L][0] for L in range(4,14)):.1%}", "massive left out", f"{statistics.median(out[L][1] for L in range(4,14)):.1%}")

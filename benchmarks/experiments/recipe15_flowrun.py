"""Issue 15: live-feature class shares and the share of residual features with s_res >= 0.5
per layer (median over layers 4-13) from one or more `saeflow run` folders.

    .venv/bin/python benchmarks/experiments/recipe15_flowrun.py runs/embedded runs/issue15
"""
import sys

import pandas as pd

for run in sys.argv[1:]:
    d = pd.read_parquet(f"{run}/predecessors.parquet")
    live = d[d.live]
    sh = live.groupby("layer").apply(lambda g: (g.s_res >= 0.5).mean())
    allsh = d.groupby("layer").apply(lambda g: (g.s_res >= 0.5).mean())
    cls = live.groupby("layer")["class"].value_counts(normalize=True).unstack().fillna(0)
    print(run, "live", len(live), "of", len(d))
    print("s_res>=0.5 share (live) per layer:", " ".join(f"{L}:{v:.1%}" for L, v in sh.items()))
    print("median layers 4-13 (live):", f"{sh.loc[4:13].median():.1%}", " (all latents):", f"{allsh.loc[4:13].median():.1%}")
    print("class shares over all live resid features:", (live["class"].value_counts(normalize=True) * 100).round(1).to_dict())
    print(cls.round(3).to_string())

"""Recipe probes behind docs/decisions.md ("learning rate 1e-3 ..."): train the three layer-6
SAEs of the embedded model on 98k tokens under a few settings and print their final training
FVU / dead fraction. (The "decoder rows from data" variant was removed from the code after it
diverged.)

    .venv/bin/python benchmarks/experiments/train_recipe.py
"""
import time
import warnings

warnings.filterwarnings("ignore")
from saeflow import load_model
from saeflow.saes.train import TrainConfig, train_family

m = load_model("embedded", device="cpu")
for i, (name, kw) in enumerate([("lr4e-4", dict(lr=4e-4)), ("lr1e-3", dict(lr=1e-3)),
                 ("lr1e-3 aux1/8", dict(lr=1e-3, aux_coef=1 / 8)),
                 ("lr1e-3 aux1/4 k128", dict(lr=1e-3, aux_coef=0.25, aux_k=128))]):
    cfg = TrainConfig(layers=[6], tokens=98304, checkpoint_every_s=1e9, **kw)
    t=time.time()
    r = train_family(m, cfg, f"/tmp/saeflow-recipe-{i}", overwrite=True, progress=False)
    print(name, "wall", round(time.time()-t))
    for k,v in r.metrics.items(): print("  ", k, {a: round(b,3) for a,b in v.items()}, flush=True)

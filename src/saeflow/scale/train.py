"""Training a family on Ray: the family's layers split into groups, one Ray task per group.

Each task trains its group with `train_family` over the same token stream as the whole family
(the chunk shuffles come from the same seeded generator) and gives each SAE the seed it has in
the whole family, so the merged pack equals the one-process pack to fp32 rounding (the stacked
GPU engine batches fewer SAEs per group; the sparse CPU engine steps each SAE alone). A task
runs the model only up to the deepest layer of its group (capture stops early), so the
shallow groups are cheaper: the groups are contiguous runs of layers.

The group packs come back through Ray (their files), so workers need no shared disk for
them; finished groups are kept in OUT.groups/ until the merge, so a stopped job resumes.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from saeflow.ids import Slot
from saeflow.saes.packs import PACK_MANIFEST, load_pack, save_pack
from saeflow.saes.train import TrainResult, prepare_training, train_family
from saeflow.scale import ScaleConfig
from saeflow.scale.ray_backend import model_recipe, run_tasks, worker_model
from saeflow.store import atomic_dir, write_text_atomic


def layer_groups(layers: list[int], n: int) -> list[list[int]]:
    """`layers` cut into min(n, len(layers)) contiguous groups of near-equal size."""
    n = max(1, min(n, len(layers)))
    q, r = divmod(len(layers), n)
    out, a = [], 0
    for i in range(n):
        b = a + q + (i < r)
        out.append(layers[a:b])
        a = b
    return out


def train_group(recipe, cfg, family_slots) -> dict:
    """On a worker: train one group into a temporary pack; return its files and numbers."""

    model = worker_model(recipe)
    with tempfile.TemporaryDirectory(prefix="saeflow-group-") as d:
        root = Path(d) / "pack"
        res = train_family(model, cfg, root, progress=False, family_slots=family_slots)
        files = {p.relative_to(root).as_posix(): p.read_bytes()
                 for p in root.rglob("*") if p.is_file()}
    return {"files": files, "wall": res.wall_seconds, "tokens": res.tokens,
            "metrics": res.metrics}


def train_family_on_ray(model, cfg, out, scale: ScaleConfig, *, overwrite: bool = False,
                        progress: bool = True):
    """train_family's result, with the layers split into scale.workers groups on Ray."""

    out = Path(out)
    cfg, ident, done = prepare_training(model, cfg, out, overwrite)
    if done is not None:
        return done
    family_slots = [Slot(p, L) for p in cfg.positions for L in cfg.layers]
    groups = layer_groups(list(cfg.layers), scale.workers)
    work = out.with_name(out.name + ".groups")
    marker = work / "family.json"
    if marker.is_file() and (overwrite or json.loads(marker.read_text()) != ident):
        shutil.rmtree(work)  # groups of another run

    def group_dir(i: int) -> Path:
        return work / f"g{i}-layers-{groups[i][0]}-{groups[i][-1]}"

    todo = [i for i in range(len(groups)) if not (group_dir(i) / PACK_MANIFEST).is_file()]
    results: dict[int, dict] = {}

    def on_result(j: int, res: dict) -> None:
        i = todo[j]
        if not marker.is_file():
            write_text_atomic(marker, json.dumps(ident))
        with atomic_dir(group_dir(i), overwrite=True) as tmp:
            for rel, data in res["files"].items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
        results[i] = res

    t0 = time.perf_counter()
    recipe = model_recipe(model)
    if todo:
        run_tasks(train_group, [(recipe, replace(cfg, layers=groups[i]), family_slots)
                                for i in todo], scale, desc=f"training {len(groups)} groups",
                  on_result=on_result, progress=progress,
                  weights=[len(groups[i]) for i in todo])
    packs = [load_pack(group_dir(i)) for i in range(len(groups))]
    where = {s: pk for pk in packs for s in pk.entries}
    saes = [(s.position, s.layer, where[s].sae(*s)) for s in family_slots]
    prov = dict(packs[0].provenance)
    metrics = {k: v for pk in packs
               for k, v in pk.provenance.get("final_train_metrics", {}).items()}
    wall = time.perf_counter() - t0
    prov.update({"train_config": ident, "final_train_metrics": metrics,
                 "wall_seconds": round(wall, 1),
                 "scale": {"workers": scale.workers, "groups": groups,
                           "group_wall_seconds": [pk.provenance.get("wall_seconds")
                                                  for pk in packs]}})
    pack = save_pack(saes, out, model_name=model.name, d_model=model.d_model,
                     n_layers=model.n_layers, provenance=prov, overwrite=True)
    shutil.rmtree(work, ignore_errors=True)
    return TrainResult(pack, wall, prov.get("tokens", 0), metrics)

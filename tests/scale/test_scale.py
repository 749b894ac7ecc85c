"""Scale-out on Ray (saeflow.scale): a local Ray of 2 workers gives the same tables as the
in-process pass, bit for bit; a killed worker's shard is retried; a shard that fails every try
stops the job naming it and the same command resumes; bad addresses and versions are refused.
"""
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from saeflow.errors import ScaleError
from saeflow.evolution.stats import PairAccumulator, StatsConfig, dense_reference, run_stats
from saeflow.evolution.tables import MEASURES
from saeflow.saes.packs import save_pack
from saeflow.saes.sae import random_sae
from saeflow.scale import ScaleConfig

ray = pytest.importorskip("ray")

# ~1,500 tokens in batches of ~190: 8 batches, cut into shards of 3 batches (3 shards).
STATS = StatsConfig(tokens=1500, batch_size=4, ctx_len=48, pairs="both", encoder_dtype="float32")
SHARD = 400
RAY2 = ScaleConfig(workers=2, shard_tokens=SHARD)
LOCAL = ScaleConfig(shard_tokens=SHARD)


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray of 2 CPUs for the whole session (started once: ~5 s)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fresh_model(tiny_model_dirs):
    """The tiny Gemma 3 as loaded from disk, as the workers load it (the session's shared
    instance may have been changed in memory by other tests, e.g. trained on by sparsify)."""
    from saeflow.lm.model import load_model

    return load_model(str(tiny_model_dirs["gemma3"]), device="cpu")


@pytest.fixture(scope="module")
def pack_and_model(fresh_model, tmp_path_factory):
    model = fresh_model
    d = model.d_model
    saes = [(p, L, random_sae(d, 48, "relu", seed=10 * L + i))
            for L in range(3) for i, p in enumerate(("resid_post", "mlp_out", "attn_out"))]
    pack = save_pack(saes, tmp_path_factory.mktemp("scale") / "pack", model_name="tiny",
                     d_model=d, n_layers=3)
    return pack, model


def _tables(root, names):
    return {n: pq.read_table(root / n).to_pandas() for n in names}


def _same_tables(a, b, names):
    ta, tb = _tables(a, names), _tables(b, names)
    for n in names:
        pd.testing.assert_frame_equal(ta[n], tb[n], check_exact=True, obj=n)


STATS_TABLES = ["edges.parquet", "features.parquet"]


@pytest.fixture(scope="module")
def stats_local(pack_and_model, tmp_path_factory):
    pack, model = pack_and_model
    out = tmp_path_factory.mktemp("stats_local")
    st = run_stats(pack, model, out, STATS, progress=False, scale=LOCAL)
    return st, out


def test_sparse_merge_equals_dense_reference():
    g = np.random.default_rng(0)
    import torch

    zu = torch.from_numpy((g.random((300, 37)) < 0.1) * g.random((300, 37)) * 3)
    zd = torch.from_numpy((g.random((300, 29)) < 0.15) * g.random((300, 29)) * 3)
    parts = []
    for a in range(0, 300, 100):
        acc = PairAccumulator(37, 29, flush_tokens=30, dense_limit=0)
        acc.update(zu[a:a + 100], zd[a:a + 100])
        parts.append(acc)
    total = PairAccumulator(37, 29, dense_limit=0)
    for p in parts:
        total.merge(p)
    p, ref = total.pairs(), dense_reference(zu, zd)
    for m in (*MEASURES, "count"):
        np.testing.assert_allclose(p[m], ref[m][p["up"], p["down"]], atol=1e-5, err_msg=m)


def test_stats_on_two_workers_equal_the_single_process_run(local_ray, pack_and_model,
                                                           stats_local, tmp_path):
    pack, model = pack_and_model
    st, out = stats_local
    dist = run_stats(pack, model, tmp_path, STATS, progress=False, scale=RAY2)
    assert dist.manifest["tokens"] == st.manifest["tokens"]
    _same_tables(st.root, dist.root, STATS_TABLES)


def test_a_killed_worker_is_retried_and_a_shard_failing_every_try_resumes(
        local_ray, pack_and_model, stats_local, tmp_path, monkeypatch):
    import saeflow.scale.ray_backend as rb

    pack, model = pack_and_model
    st, _ = stats_local
    # Killed once, mid-shard (SIGKILL of the worker process): Ray runs the shard again.
    marker = tmp_path / "killed"
    monkeypatch.setattr(rb, "FAULT_INJECTION", {"shard": 1, "marker": str(marker)})
    once = run_stats(pack, model, tmp_path / "once", STATS, progress=False, scale=RAY2)
    assert marker.read_text() == "x"
    _same_tables(st.root, once.root, STATS_TABLES)
    # Killed on every try: the job stops naming the shard, shard 0 stays merged on disk.
    marker = tmp_path / "killed-always"
    monkeypatch.setattr(rb, "FAULT_INJECTION", {"shard": 1, "marker": str(marker),
                                                "always": True})
    with pytest.raises(ScaleError, match=r"shard 1 \(batches 3-5\) failed 3 times"):
        run_stats(pack, model, tmp_path / "always", STATS, progress=False, scale=RAY2)
    assert marker.read_text() == "xxx"
    import torch

    state = torch.load(tmp_path / "always" / "stats" / ".state" / "state.pt", weights_only=False)
    assert state["consumer"]["shard"] >= 1 and not (tmp_path / "always" / "stats" /
                                                    "stats.json").exists()
    monkeypatch.setattr(rb, "FAULT_INJECTION", None)
    resumed = run_stats(pack, model, tmp_path / "always", STATS, progress=False, scale=RAY2)
    _same_tables(st.root, resumed.root, STATS_TABLES)


def test_unreachable_address_and_other_versions_are_refused(local_ray, pack_and_model,
                                                            tmp_path, monkeypatch):
    import saeflow.scale.ray_backend as rb

    pack, model = pack_and_model
    bad = replace(RAY2, ray_address="127.0.0.1:1")
    with pytest.raises(ScaleError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        run_stats(pack, model, tmp_path / "r", STATS, progress=False, scale=bad)
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr(rb, "local_versions", lambda: {"saeflow": "0.0.1", "torch": "1.0"})
    with pytest.raises(ScaleError, match=r"saeflow 0\.1\.0 / torch .*the driver has "
                                         r"saeflow 0\.0\.1 / torch 1\.0"):
        run_stats(pack, model, tmp_path / "v", STATS, progress=False, scale=RAY2)
    assert not (tmp_path / "v").exists()
    monkeypatch.undo()
    # A model changed in memory after loading is not what the workers would load: refused.
    from saeflow.lm.model import load_model

    changed = load_model(model.source, device="cpu")
    with torch.no_grad():
        next(changed.hf.parameters()).add_(1.0)
    with pytest.raises(ScaleError, match="changed in memory after loading"):
        run_stats(pack, changed, tmp_path / "m", STATS, progress=False, scale=RAY2)


def test_ray_is_not_imported_without_workers():
    code = ("import sys, saeflow.cli.main, saeflow.evolution.stats, saeflow.features.index, "
            "saeflow.flow.predecessors, saeflow.pipeline.stages, saeflow.scale.shards; "
            "print(json.dumps('ray' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout) is False


def test_flow_on_two_workers_equals_the_single_process_run(local_ray, pack_and_model, tmp_path,
                                                           monkeypatch):
    from saeflow.flow.compute import run_flow
    from saeflow.flow.config import FlowConfig

    pack, _ = pack_and_model
    cfg = FlowConfig(k=3, null_samples=256)
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "cache1"))
    one = run_flow(pack, tmp_path / "one", cfg, progress=False)
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "cache2"))
    two = run_flow(pack, tmp_path / "two", cfg, progress=False, scale=RAY2)
    _same_tables(one.root, two.root, ["predecessors.parquet", "successors.parquet"])
    assert json.loads((one.root / "thresholds.json").read_text()) == \
        json.loads((two.root / "thresholds.json").read_text())
    caches = [sorted((tmp_path / c / "flow").rglob("*.npz")) for c in ("cache1", "cache2")]
    assert len(caches[0]) == 3 and [p.name for p in caches[0]] == [p.name for p in caches[1]]
    for a, b in zip(*caches):
        za, zb = np.load(a), np.load(b)
        assert sorted(za.files) == sorted(zb.files)
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{a.name}:{k}")


def test_index_on_two_workers_equals_the_single_process_run(local_ray, pack_and_model,
                                                            tmp_path):
    from saeflow.features.index import IndexConfig, build_index

    pack, model = pack_and_model
    cfg = IndexConfig(tokens=1500, batch_size=4, ctx_len=48, n_top=5, n_samples=4,
                      encoder_dtype="float32")
    one = build_index(pack, model, tmp_path / "one", cfg, progress=False, scale=LOCAL)
    two = build_index(pack, model, tmp_path / "two", cfg, progress=False, scale=RAY2)
    _same_tables(one.root, two.root, ["features.parquet", "examples.parquet"])


def test_train_on_two_workers_equals_the_single_process_pack(local_ray, fresh_model, tmp_path):
    import torch

    from saeflow.saes.train import TrainConfig, train_family
    from saeflow.scale.train import layer_groups, train_family_on_ray

    assert layer_groups([0, 1, 2], 2) == [[0, 1], [2]]
    model = fresh_model
    cfg = TrainConfig(positions=["resid_post", "mlp_out"], layers=[0, 1, 2], width=32, k=4,
                      tokens=2048, batch_size=128, lr=3e-3, ctx_len=32, model_batch=8,
                      chunk_tokens=1024, corpus="wiki", model_dtype="float32",
                      encoder_dtype="float32", checkpoint_every_s=1e9, engine="sparse")
    one = train_family(model, cfg, tmp_path / "one", progress=False).pack
    two = train_family_on_ray(model, cfg, tmp_path / "two", RAY2, progress=False).pack
    assert sorted(one.entries) == sorted(two.entries)
    assert two.provenance["train_config"] == one.provenance["train_config"]
    assert two.provenance["scale"]["groups"] == [[0, 1], [2]]
    assert not (tmp_path / "two.groups").exists()
    for slot in one.entries:
        a, b = one.sae(*slot), two.sae(*slot)
        for name, t in a.tensors().items():
            torch.testing.assert_close(b.tensors()[name], t, rtol=1e-6, atol=1e-6)  # bit-equal here


def test_cli_bad_address_is_one_line_and_writes_nothing(pack_and_model, tmp_path, capsys):
    from saeflow.cli.main import main

    pack, model = pack_and_model
    for argv in (["stats", str(pack.root), "--model", model.source, "--tokens", "1500"],
                 ["flow", str(pack.root)], ["run", "--pack", str(pack.root)]):
        out = tmp_path / argv[0]
        rc = main([*argv, "--out", str(out), "--workers", "2", "--ray-address", "127.0.0.1:1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in \
            err[0], err
        assert not out.exists()
    rc = main(["stats", str(pack.root), "--model", model.source, "--out", str(tmp_path / "x"),
               "--ray-address", "127.0.0.1:1"])
    assert rc == 2 and "--ray-address needs --workers" in capsys.readouterr().err


def test_one_pass_on_two_workers_equals_the_single_process_run(local_ray, pack_and_model,
                                                               tmp_path):
    """Eval, index and statistics fed by one pass (`saeflow run`'s eval stage) on Ray."""
    from saeflow.features.index import IndexConfig, index_job
    from saeflow.saes.evaluate import eval_job
    from saeflow.scale.shards import run_jobs

    pack, model = pack_and_model
    icfg = IndexConfig(tokens=1200, batch_size=4, ctx_len=48, n_top=5, n_samples=4,
                       encoder_dtype="float32", split="heldout", corpus="wiki")
    scfg = replace(STATS, tokens=1000, split="heldout", corpus="wiki")

    def jobs(run):
        from saeflow.evolution.stats import stats_job

        return [eval_job(pack, model, 300, 1500, "wiki", batch=4, ctx_len=48,
                         encoder_dtype="float32", state_file=run / "eval.pt"),
                index_job(pack, model, run, icfg, progress=False),
                stats_job(pack, model, run, scfg, progress=False)]

    one = run_jobs(model, pack, jobs(tmp_path / "one"), scale=LOCAL, progress=False,
                   state_file=tmp_path / "one" / "pass.pt")
    two = run_jobs(model, pack, jobs(tmp_path / "two"), scale=RAY2, progress=False,
                   state_file=tmp_path / "two" / "pass.pt")
    assert one["eval"] == two["eval"]
    _same_tables(tmp_path / "one" / "index", tmp_path / "two" / "index",
                 ["features.parquet", "examples.parquet"])
    _same_tables(tmp_path / "one" / "stats", tmp_path / "two" / "stats", STATS_TABLES)

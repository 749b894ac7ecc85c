"""One corpus pass feeding eval, the index and the statistics (saeflow.scale.shards.run_jobs):
the same tables and measures as the three passes run one by one, after a kill and resume too,
and from `evaluate_pack`'s own in-process pass."""
import pandas as pd
import pyarrow.parquet as pq
import pytest

from saeflow.evolution.stats import StatsConfig, run_stats, stats_job
from saeflow.features.index import IndexConfig, build_index, index_job
from saeflow.saes.evaluate import eval_job, evaluate_pack
from saeflow.saes.packs import save_pack
from saeflow.saes.sae import random_sae
from saeflow.scale import ScaleConfig
from saeflow.scale.shards import run_jobs

PASS = dict(corpus="wiki", split="heldout", batch_size=4, ctx_len=32)
INDEX = IndexConfig(tokens=500, n_top=4, n_samples=3, **PASS)
STATS = StatsConfig(tokens=400, pairs="both", **PASS)
SHARDS = ScaleConfig(shard_tokens=256)  # several shards: the merge order is exercised
TABLES = {"index": ["features.parquet", "examples.parquet", "tokens.parquet"],
          "stats": ["edges.parquet", "features.parquet", "cofire.parquet"]}


@pytest.fixture(scope="module")
def pack_and_model(tiny_models, tmp_path_factory):
    model = tiny_models["gemma3"]
    d = model.d_model
    saes = [(p, L, random_sae(d, 32, "relu", seed=300 + 3 * L + i))
            for L in range(model.n_layers)
            for i, p in enumerate(("resid_post", "mlp_out", "attn_out"))]
    pack = save_pack(saes, tmp_path_factory.mktemp("one") / "pack", model_name="tiny",
                     d_model=d, n_layers=model.n_layers)
    return pack, model


def _jobs(pack, model, run):
    return [eval_job(pack, model, 200, 600, "wiki", batch=4, ctx_len=32,
                     state_file=run / "eval.pt"),
            index_job(pack, model, run, INDEX, progress=False),
            stats_job(pack, model, run, STATS, progress=False)]


def _same(a, b):
    for stage, names in TABLES.items():
        for n in names:
            pa_, pb = a / stage / n, b / stage / n
            if not pa_.exists():
                assert not pb.exists(), pb
                continue
            pd.testing.assert_frame_equal(pq.read_table(pa_).to_pandas(),
                                          pq.read_table(pb).to_pandas(), check_exact=True,
                                          obj=f"{stage}/{n}")


def test_one_pass_equals_the_passes_one_by_one(pack_and_model, tmp_path):
    pack, model = pack_and_model
    sep = tmp_path / "sep"
    ev_sep = run_jobs(model, pack, _jobs(pack, model, sep)[:1], scale=SHARDS,
                      progress=False)["eval"]
    build_index(pack, model, sep, INDEX, progress=False, scale=SHARDS)
    run_stats(pack, model, sep, STATS, progress=False, scale=SHARDS)

    fused = tmp_path / "fused"
    out = run_jobs(model, pack, _jobs(pack, model, fused), scale=SHARDS, progress=False,
                   state_file=fused / "pass.pt")
    assert out["eval"] == ev_sep  # every float of every row, exactly
    assert out["index"].manifest["tokens"] < out["eval"]["dead_tokens"]  # its own budget
    _same(sep, fused)

    # `saeflow eval` alone (one in-process shard) gives the same measures to float64 rounding
    alone = evaluate_pack(pack, model, tokens=200, ce_tokens=32, dead_tokens=600,
                          corpus="wiki", batch=4, ctx_len=32, progress=False)
    for r, s in zip(alone["saes"], ev_sep["rows"]):
        for k in ("l0", "dead_fraction", "dense_fraction", "tokens", "dead_tokens"):
            assert r[k] == s[k], k
        assert r["fvu"] == pytest.approx(s["fvu"], rel=1e-12)
        assert r["fvu_rest"] == pytest.approx(s["fvu_rest"], rel=1e-12)


def test_a_killed_one_pass_resumes_to_the_same_tables(pack_and_model, tmp_path):
    pack, model = pack_and_model
    whole = tmp_path / "whole"
    ref = run_jobs(model, pack, _jobs(pack, model, whole), scale=SHARDS, progress=False,
                   state_file=whole / "pass.pt")
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_jobs(model, pack, _jobs(pack, model, killed), scale=SHARDS, progress=False,
                 state_file=killed / "pass.pt", stop_after_batches=3)
    assert not (killed / "index" / "index.json").exists()  # nothing published part-way
    again = run_jobs(model, pack, _jobs(pack, model, killed), scale=SHARDS, progress=False,
                     state_file=killed / "pass.pt")
    assert again["eval"] == ref["eval"]
    _same(whole, killed)

"""Co-activation statistics: sparse accumulation equals the dense method; analyses find planted
gates and pass-through; the corpus pass resumes and refuses a changed pack."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from fixtures import count_syncs

from saeflow.cli.main import main
from saeflow.errors import MissingResultError, StatsError
from saeflow.evolution.analyses import communities, gates, pass_through
from saeflow.evolution.stats import PairAccumulator, StatsConfig, dense_reference, run_stats
from saeflow.evolution.tables import MEASURES, open_stats, write_stats
from saeflow.saes.packs import save_pack
from saeflow.saes.sae import random_sae


def _sparse_acts(T, d, p, seed):
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(T, d, generator=g) < p
    return on * torch.rand(T, d, generator=g) * 3


@pytest.mark.parametrize("dense_limit,flush", [(10**9, 50), (0, 50), (10**9, 10**6), (0, 7)])
def test_sparse_accumulation_equals_dense_reference(dense_limit, flush):
    zu, zd = _sparse_acts(600, 37, 0.1, 0), _sparse_acts(600, 29, 0.15, 1)
    zd[:, :5] += zu[:, :5]  # some real correlation
    acc = PairAccumulator(37, 29, flush_tokens=flush, dense_limit=dense_limit)
    for i in range(0, 600, 64):
        acc.update(zu[i:i + 64], zd[i:i + 64])
    p, ref = acc.pairs(), dense_reference(zu, zd)
    assert set(zip(p["up"], p["down"])) == set(zip(*np.nonzero(ref["count"])))
    for m in (*MEASURES, "count"):
        np.testing.assert_allclose(p[m], ref[m][p["up"], p["down"]], atol=1e-5, err_msg=m)
    # "active" as a fraction of each feature's maximum
    au, ad = zu > 0.5 * zu.max(0).values, zd > 0.5 * zd.max(0).values
    acc = PairAccumulator(37, 29, flush_tokens=flush, dense_limit=dense_limit)
    acc.update(zu, zd, au, ad)
    p, ref = acc.pairs(), dense_reference(zu, zd, au, ad)
    for m in (*MEASURES, "count"):
        np.testing.assert_allclose(p[m], ref[m][p["up"], p["down"]], atol=1e-5, err_msg=m)


def test_sparse_runs_without_packed_sort_equal_dense_reference(monkeypatch):
    # Keys beyond 2**32 (widths above 65,536) take the argsort path; force it on small sizes.
    import saeflow.evolution.sums as sums

    monkeypatch.setattr(sums, "PACKED_SORT_MAX_KEYS", 0)
    zu, zd = _sparse_acts(300, 37, 0.1, 2), _sparse_acts(300, 29, 0.15, 3)
    au, ad = zu > 0.4 * zu.max(0).values, zd > 0.4 * zd.max(0).values
    acc = PairAccumulator(37, 29, flush_tokens=40, dense_limit=0)
    for i in range(0, 300, 32):
        acc.update(zu[i:i + 32], zd[i:i + 32], au[i:i + 32], ad[i:i + 32])
    p, ref = acc.pairs(), dense_reference(zu, zd, au, ad)
    for m in (*MEASURES, "count"):
        np.testing.assert_allclose(p[m], ref[m][p["up"], p["down"]], atol=1e-5, err_msg=m)


def _planted_stats(tmp_path):
    """Upstream features 0..5 random; downstream 0 = AND(0, 1), 1 = OR(2, 3), 2 = copy of 4."""
    T, d = 4000, 12
    g = torch.Generator().manual_seed(3)
    zu = _sparse_acts(T, d, 0.3, 4)
    zd = _sparse_acts(T, d, 0.05, 5)
    zd[:, 0] = ((zu[:, 0] > 0) & (zu[:, 1] > 0)).float() * 2
    zd[:, 1] = ((zu[:, 2] > 0) | (zu[:, 3] > 0)).float() * (1 + torch.rand(T, generator=g))
    zd[:, 2] = zu[:, 4] * 1.5
    acc = PairAccumulator(d, d)
    acc.update(zu, zd)
    cfg = StatsConfig(top_k=3, floor=0.1)
    write_stats(tmp_path / "stats", {(("resid_post", 3), ("resid_post", 4)): acc}, cfg,
                {"test": True}, T, 0.0)
    return open_stats(tmp_path)


def test_gates_and_pass_through_find_what_was_planted(tmp_path):
    st = _planted_stats(tmp_path)
    # A downstream feature that always co-fires with an upstream one that fires almost always
    # is not an AND gate: with the density filter off, the planted gates are joined by such
    # trivial ones, with it on they are not.
    assert len(gates(st, threshold=0.999, min_count=5, max_up_density=1.0, min_up_count=0)) >= \
        len(gates(st, threshold=0.999, min_count=5))
    assert gates(st, threshold=0.999, min_count=5, max_up_density=0.01).empty
    assert gates(st, threshold=0.999, min_count=5, min_up_count=10**6).empty
    g = gates(st, threshold=0.999, min_count=5)
    and_ = g[g.gate == "AND"]
    or_ = g[g.gate == "OR"]
    assert list(and_.down) == ["4/resid_post/0"]
    assert {and_.iloc[0].up_a, and_.iloc[0].up_b} == {"3/resid_post/0", "3/resid_post/1"}
    assert "4/resid_post/1" in set(or_.down)
    row = or_[or_.down == "4/resid_post/1"].iloc[0]
    assert {row.up_a, row.up_b} == {"3/resid_post/2", "3/resid_post/3"}
    pt = pass_through(st, threshold=0.99)
    assert pt.iloc[0].pass_through == 1  # only the copy passes at Pearson >= 0.99
    assert pt.iloc[0].appearing == pt.iloc[0].alive_next - 1
    members, summary = communities(st, floor=0.5)
    same = members.set_index("id").community
    assert same["3/resid_post/4"] == same["4/resid_post/2"]
    _, summary = communities(st, floor=0.5, method="louvain")
    assert summary["size"].sum() == len(members)


@pytest.fixture(scope="module")
def pack_and_model(tiny_models, tmp_path_factory):
    model = tiny_models["gemma3"]
    d = model.d_model
    saes = [(p, L, random_sae(d, 48, "relu", seed=10 * L + i))
            for L in range(3) for i, p in enumerate(("resid_post", "mlp_out", "attn_out"))]
    pack = save_pack(saes, tmp_path_factory.mktemp("st") / "pack", model_name="tiny",
                     d_model=d, n_layers=3)
    return pack, model


CFG = StatsConfig(tokens=1500, batch_size=4, ctx_len=48, pairs="both", encoder_dtype="float32")


def test_corpus_pass_equals_dense_and_resumes(pack_and_model, tmp_path):
    from saeflow.lm.corpora import Corpus
    from saeflow.lm.hooks import HookPoint, capture

    pack, model = pack_and_model
    with pytest.raises(KeyboardInterrupt):
        run_stats(pack, model, tmp_path / "a", CFG, progress=False, stop_after_batches=2)
    resumed = run_stats(pack, model, tmp_path / "a", CFG, progress=False)
    whole = run_stats(pack, model, tmp_path / "b", CFG, progress=False)
    ea, eb = resumed.edges(), whole.edges()
    assert len(ea) == len(eb) and np.allclose(ea.pearson, eb.pearson, atol=1e-6)
    # Against a dense computation on the same tokens.
    zs = {s: [] for s in pack.entries}
    corpus = Corpus.from_spec(CFG.corpus, seed=CFG.seed)
    for b in corpus.token_batches(model.tokenizer, CFG.batch_size, CFG.ctx_len,
                                  max_tokens=CFG.tokens):
        acts = capture(model, b.input_ids, [HookPoint(*s) for s in pack.entries],
                       attention_mask=b.attention_mask)
        for s in pack.entries:
            zs[s].append(pack.sae(*s).encode(acts[HookPoint(*s)].cpu())[b.content_mask()])
    for up, down in [(("resid_post", 0), ("resid_post", 1)), (("mlp_out", 2), ("resid_post", 2))]:
        ref = dense_reference(torch.cat(zs[up]), torch.cat(zs[down]))
        e = whole.edges(up, down)
        for m in MEASURES:
            np.testing.assert_allclose(e[m], ref[m][e.up, e.down], atol=1e-5, err_msg=m)
        # Each row's best partner by Pearson is kept.
        best = np.where(ref["count"] > 0, ref["pearson"], -np.inf).argmax(1)
        kept = set(zip(e.up, e.down))
        assert all((i, j) in kept for i, j in enumerate(best) if ref["count"][i].any())


def test_stats_bad_input_and_cli(pack_and_model, tmp_path, capsys):
    pack, model = pack_and_model
    with pytest.raises(KeyboardInterrupt):
        run_stats(pack, model, tmp_path / "r", CFG, progress=False, stop_after_batches=1)
    other = save_pack([(p, L, random_sae(model.d_model, 16, "relu", seed=L))
                       for L in range(2) for p in ("resid_post",)],
                      tmp_path / "other", model_name="tiny", d_model=model.d_model, n_layers=3)
    with pytest.raises(StatsError, match="partial pass over a different pack"):
        run_stats(other, model, tmp_path / "r", CFG, progress=False)
    with pytest.raises(StatsError, match="no SAEs at attn_z"):
        run_stats(pack, model, tmp_path / "x", StatsConfig(positions="resid_post,attn_z"),
                  progress=False)
    # The same pack over another corpus (or seed) does not resume the partial pass either.
    with pytest.raises(StatsError, match="partial pass over a different config"):
        run_stats(pack, model, tmp_path / "r", replace(CFG, seed=1), progress=False)
    # A corpus shorter than asked, and a model the pack was not made for.
    text = tmp_path / "tiny.txt"
    text.write_text("A short text about weddings and rings.\n")
    with pytest.raises(StatsError, match="gives only"):
        run_stats(pack, model, tmp_path / "s", replace(CFG, tokens=10**6, corpus=str(text)),
                  progress=False)
    wide = save_pack([("resid_post", L, random_sae(48, 16, "relu", seed=L)) for L in range(2)],
                     tmp_path / "wide", model_name="other", d_model=48, n_layers=3)
    with pytest.raises(ValueError, match="d_in 48 does not match model d_model 32"):
        run_stats(wide, model, tmp_path / "t", CFG, progress=False)
    assert not (tmp_path / "t" / "stats" / "stats.json").exists()
    run = tmp_path / "cli"
    assert main(["flow", str(pack.root), "--out", str(run), "--no-plots"]) == 0
    capsys.readouterr()
    assert main(["stats", str(pack.root), "--model", str(model.source), "--out", str(run),
                 "--tokens", "1500", "--batch-size", "4", "--ctx-len", "48", "--pairs", "both",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pass_through"] and "agreement" in summary and "groups" in summary
    groups = json.loads((run / "stats" / "groups.json").read_text())["layers"]
    assert set(groups) == {"0", "1", "2"} and all(sum(v.values()) > 0 for v in groups.values())
    assert groups["0"]["From RES"] == 0  # layer 0 has no residual predecessor
    # Co-firing of each feature with its top-1 predecessors: the same (token, feature) events
    # as the groups, split by feature.
    import pandas as pd

    co = pd.read_parquet(run / "stats" / "cofire.parquet")
    for L, g in groups.items():
        c = co[co.layer == int(L)]
        assert len(c) == pack.sae("resid_post", int(L)).d_sae
        assert int(c.n_on.sum()) == sum(g.values())
        for kind, word in (("res", "RES"), ("mlp", "MLP"), ("attn", "ATT")):
            assert int(c[f"both_{kind}"].sum()) == sum(v for k, v in g.items() if word in k)
            assert (c[f"both_{kind}"] <= c.n_on).all()
    assert co[co.layer == 0].both_res.sum() == 0
    by_sim = pd.DataFrame(summary["cofire"]["by_similarity"])
    assert set(by_sim.kind) == {"res", "mlp", "attn"}
    live_pairs = co.merge(pd.read_parquet(run / "predecessors.parquet"), on=["layer", "feature"])
    assert by_sim[by_sim.kind == "mlp"].pairs.sum() == int(
        (live_pairs.live & live_pairs.s_mlp.notna()).sum())
    by_t = pd.DataFrame(summary["cofire"]["by_threshold"])
    assert set(by_t.kind) <= {"res", "mlp", "attn"} and (by_t.high_share <= 1).all()
    for f in ("pass_through.csv", "gates.json", "communities.parquet", "agreement.csv",
              "plots/groups.png", "plots/pass_through_resid_post.html"):
        assert (run / "stats" / f).is_file(), f


def test_open_stats_tells_absent_from_corrupt(tmp_path):
    """No statistics yet: MissingResultError; a manifest that is there but unreadable or of
    another format: StatsError (never taken for absent)."""
    with pytest.raises(MissingResultError, match="run `saeflow stats"):
        open_stats(tmp_path)
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "stats.json").write_bytes(b"\xff\xfe")
    with pytest.raises(StatsError, match="unreadable") as e:
        open_stats(tmp_path)
    assert not isinstance(e.value, MissingResultError)
    (tmp_path / "stats" / "stats.json").write_text('{"format": "saeflow-index"}')
    with pytest.raises(StatsError, match="not a saeflow stats"):
        open_stats(tmp_path)


# --- the sums on the device (issue 29) ------------------------------------------------------


def _topk_acts(T, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    top = torch.rand(T, d, generator=g).topk(k, dim=1).indices
    return torch.zeros(T, d).scatter_(1, top, torch.rand(T, k, generator=g) * 3 + 0.1)


def _exact_sums(zu, zd, au, ad):
    """An independent host reference: per token, in token order, every co-nonzero pair's
    product and (both active) count added into dense d_up x d_down sums."""
    U, D, au, ad = zu.double().numpy(), zd.double().numpy(), au.numpy(), ad.numpy()
    nu, nd = (U != 0) | au, (D != 0) | ad
    C, P = np.zeros((U.shape[1], D.shape[1]), np.int64), np.zeros((U.shape[1], D.shape[1]))
    for t in range(len(U)):
        i, j = np.flatnonzero(nu[t]), np.flatnonzero(nd[t])
        P[np.ix_(i, j)] += np.outer(U[t, i], D[t, j])
        C[np.ix_(i, j)] += np.outer(au[t, i], ad[t, j])
    side = {f"n_{s}": a.sum(0) for s, a in (("up", au), ("down", ad))}
    for s, Z, nz in (("up", U, nu), ("down", D, nd)):
        side.update({f"s_{s}": (Z * nz).sum(0), f"q_{s}": (Z * Z * nz).sum(0),
                     f"max_{s}": np.maximum(Z * nz, 0).max(0)})
    return C, P, side


@pytest.mark.parametrize("codes", ["topk", "relu"])
@pytest.mark.parametrize("active", [None, "frac"])
@pytest.mark.parametrize("dense_limit,block", [(10**9, 4 * 2**20), (10**9, 300), (0, 300)])
def test_device_sums_equal_an_exact_reference_and_keep_their_format(
        test_device, codes, active, dense_limit, block):
    """On the test device: counts exact, float64 sums to 1e-12 relative (a GPU may add in
    another order); state() is CPU tensors in the format of every saeflow version, and a
    state saved, loaded and merged on the device gives the same sums."""
    dev = torch.device(test_device)
    if codes == "topk":
        zu, zd = _topk_acts(400, 37, 5, 0), _topk_acts(400, 29, 4, 1)
    else:
        zu, zd = _sparse_acts(400, 37, 0.1, 0), _sparse_acts(400, 29, 0.15, 1)
    zd[:, :5] = torch.maximum(zd[:, :5], zu[:, :5])  # some real correlation
    au, ad = ((zu > 0, zd > 0) if active is None else
              (zu > 0.5 * zu.max(0).values, zd > 0.5 * zd.max(0).values))
    kw = dict(dense_limit=dense_limit, max_block_pairs=block, flush_tokens=90, device=dev)
    first, second = PairAccumulator(37, 29, **kw), PairAccumulator(37, 29, **kw)
    for acc, rows in ((first, range(0, 200, 64)), (second, range(200, 400, 64))):
        for i in rows:
            end = min(i + 64, 200 if acc is first else 400)
            acc.update(zu[i:end].to(dev), zd[i:end].to(dev),
                       *((None, None) if active is None else (au[i:end].to(dev),
                                                              ad[i:end].to(dev))))
    st = first.state()
    assert list(st)[:6] == ["d_up", "d_down", "flush_tokens", "dense_limit", "n_tokens",
                            "max_block_pairs"]
    assert all(v.device.type == "cpu" for v in st.values() if isinstance(v, torch.Tensor))
    assert st["n_up"].dtype == torch.int64 and st["s_up"].dtype == torch.float64
    if first.dense:
        assert st["C"].dtype == torch.int32 and st["P"].dtype == torch.float64
    total = PairAccumulator(37, 29, **kw)
    total.load(torch.load(_roundtrip(st), weights_only=False))
    total.merge(second)
    C, P, side = _exact_sums(zu, zd, au, ad)
    p = total.pairs()
    assert set(zip(p["up"], p["down"])) == set(zip(*np.nonzero(P)))
    np.testing.assert_array_equal(p["count"], C[p["up"], p["down"]])
    if total.dense:  # (the sparse runs round each product to float32: checked above to 1e-5)
        np.testing.assert_allclose(total.P.cpu().numpy().reshape(37, 29), P, rtol=1e-12, atol=0)
    for k, v in side.items():
        tol = dict(rtol=0, atol=0) if k[0] in "nm" else dict(rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(getattr(total, k), v, err_msg=k, **tol)
    assert total.n_tokens == 400


def _roundtrip(st):
    import io

    buf = io.BytesIO()
    torch.save(st, buf)
    buf.seek(0)
    return buf


def test_dense_update_of_topk_codes_makes_no_host_sync(test_device):
    """Building an SAE's codes syncs twice (their count and the lists' width); the pair update
    of TopK codes (no padding) none; padded lists one per block (the real pairs' count)."""
    from saeflow.evolution.sums import codes_of

    dev = torch.device(test_device)
    zu, zd = _topk_acts(256, 64, 8, 0).to(dev), _topk_acts(256, 48, 6, 1).to(dev)
    acc = PairAccumulator(64, 48, device=dev)
    acc.update(zu, zd)  # warm-up
    cu, cd = codes_of(zu), codes_of(zd)
    assert count_syncs(dev, lambda: codes_of(zu)) == 2
    assert count_syncs(dev, lambda: acc.update_codes(cu, cd)) == 0
    zr = _sparse_acts(256, 48, 0.1, 2).to(dev)
    cr = codes_of(zr)
    # blocks of 64 tokens: m_up x m_down pairs a token
    blocks = PairAccumulator(64, 48, device=dev, max_block_pairs=64 * 8 * cr.idx.shape[1])
    assert count_syncs(dev, lambda: blocks.update_codes(cu, cr)) == 256 // 64

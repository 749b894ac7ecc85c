"""Feature flow on random packs built here: planted chains, classes, thresholds, tracing, errors."""
import json

import numpy as np
import pytest
import torch

from saeflow.cli.main import main
from saeflow.errors import FlowError
from saeflow.flow.compute import run_flow
from saeflow.flow.config import FlowConfig
from saeflow.flow.graphs import FlowIndex, load_graph, node_link, persistence, trace, write_graph
from saeflow.flow.inputs import layer_slots
from saeflow.flow.run import open_flow
from saeflow.flow.tables import classify
from saeflow.ids import Slot
from saeflow.saes.packs import save_pack
from saeflow.saes.sae import SAE, random_sae

D, N, LAYERS = 96, 384, 4


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _sae_from_dirs(W_dec: torch.Tensor, seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    n = W_dec.shape[0]
    return SAE(W_enc=W_dec.T.clone(), W_dec=W_dec.clone(), b_enc=torch.zeros(n),
               b_dec=torch.zeros(W_dec.shape[1]), architecture="jumprelu",
               threshold=0.05 + 0.2 * torch.rand(n, generator=g))


def _noisy(v, g, eps=0.15):
    """v tilted by a small random rotation (cosine with v about 0.99)."""
    return _unit(v + eps * _unit(torch.randn(v.shape, generator=g)))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A pack whose residual features are planted copies: for each layer L >= 1,
    features 0-29 translated from R_{L-1} (permuted index), 30-59 processed (R_{L-1} + M_L),
    60-89 newborn from M_L, 90-119 newborn from A_L; the rest random."""
    g = torch.Generator().manual_seed(0)
    root = tmp_path_factory.mktemp("planted")
    saes, plants = [], {}
    R_prev = _unit(torch.randn(N, D, generator=g))
    for L in range(LAYERS):
        M = _unit(torch.randn(N, D, generator=g))
        A = _unit(torch.randn(N, D, generator=g))
        R = _unit(torch.randn(N, D, generator=g))
        if L >= 1:
            src = torch.randperm(N, generator=g)
            for f in range(30):
                R[f] = _noisy(R_prev[src[f]], g)
                plants[(L, f)] = ("translated", {"res": int(src[f])})
            for f in range(30, 60):
                m = int(src[f])
                R[f] = _unit(R_prev[src[f]] + M[m] + 0.1 * _unit(torch.randn(D, generator=g)))
                plants[(L, f)] = ("processed", {"res": int(src[f]), "mlp": m})
        for f in range(60, 90):
            R[f] = _noisy(M[f * 2], g)
            plants[(L, f)] = ("newborn", {"mlp": f * 2})
        for f in range(90, 120):
            R[f] = _noisy(A[f + 7], g)
            plants[(L, f)] = ("newborn", {"attn": f + 7})
        saes += [("resid_post", L, _sae_from_dirs(R, L)), ("mlp_out", L, _sae_from_dirs(M, 10 + L)),
                 ("attn_out", L, _sae_from_dirs(A, 20 + L))]
        R_prev = R
    pack = save_pack(saes, root / "pack", model_name="planted", d_model=D, n_layers=LAYERS)
    return pack, plants


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    pack, _ = planted
    return run_flow(pack, tmp_path_factory.mktemp("run") / "run", FlowConfig(k=5),
                    progress=False)


def _brute(A, B, k):
    S = _unit(A) @ _unit(B).T
    return S.topk(k, dim=1), S.T.topk(k, dim=1)


def test_tables_equal_brute_force(planted, planted_run):
    pack, _ = planted
    pred, succ = planted_run.predecessors(), planted_run.successors()
    for L in range(1, LAYERS):
        R = pack.sae("resid_post", L).W_dec
        for kind, pos, Lp in (("res", "resid_post", L - 1), ("mlp", "mlp_out", L),
                              ("attn", "attn_out", L)):
            (rv, ri), (cv, ci) = _brute(R, pack.sae(pos, Lp).W_dec, 5)
            rows = pred[pred.layer == L]
            assert np.array_equal(rows[f"pred_{kind}"].to_numpy(), ri[:, 0].numpy())
            np.testing.assert_allclose(rows[f"s_{kind}"].to_numpy(), rv[:, 0].numpy(), atol=1e-5)
            top = np.array([[t["feature"] for t in x] for x in rows[f"top_{kind}"]])
            assert np.array_equal(top, ri.numpy())
            srows = succ[(succ.layer == Lp) & (succ.position == pos)]
            assert (srows.next_layer == L).all()
            assert np.array_equal(srows["next"].to_numpy(), ci[:, 0].numpy())
    # Layer 0 has no residual predecessor: nulls, not a magic value.
    first = pred[pred.layer == 0]
    assert first.s_res.isna().all() and first.pred_res.isna().all() and first.top_res.isna().all()
    last = succ[(succ.layer == LAYERS - 1) & (succ.position == "resid_post")]
    assert len(last) == N and last["next"].isna().all()


def test_planted_predecessors_are_found_and_classified(planted, planted_run, tmp_path):
    pack, plants = planted
    pred = planted_run.predecessors().set_index(["layer", "feature"])
    agree = []
    for (L, f), (cls, srcs) in plants.items():
        row = pred.loc[(L, f)]
        for kind, idx in srcs.items():
            assert row[f"pred_{kind}"] == idx, (L, f, kind)
        agree.append(row["class"] == cls)
    # Null thresholds (q=0.99) let about 1% of chance similarities count as high.
    assert np.mean(agree) >= 0.97, np.mean(agree)
    rand = pred[pred.index.get_level_values("feature") >= 120]
    assert (rand["class"] == "unexplained").mean() > 0.9
    # Thresholds far above chance at this width: every planted feature gets its class.
    run = run_flow(pack, tmp_path / "hi", thresholds={"res": 0.6, "mlp": 0.6, "attn": 0.6},
                   progress=False)
    hi = run.predecessors().set_index(["layer", "feature"])
    for (L, f), (cls, _) in plants.items():
        assert hi.loc[(L, f)]["class"] == cls, (L, f)


def test_classes_follow_thresholds(planted, tmp_path):
    pack, _ = planted
    user = {"res": 0.3, "layers": {"2": {"mlp": 0.9}}}
    run = run_flow(pack, tmp_path / "r", FlowConfig(k=3), thresholds=user, progress=False)
    thr = run.thresholds["layers"]
    assert thr["2"]["mlp"] == {"value": 0.9, "source": "user"}
    assert thr["1"]["res"]["source"] == "user" and thr["1"]["mlp"]["source"].startswith("null")
    pred = run.predecessors()
    for L in range(LAYERS):
        rows = pred[pred.layer == L]
        t = thr[str(L)]
        want = classify(rows.s_res.to_numpy(float), rows.s_mlp.to_numpy(float),
                        rows.s_attn.to_numpy(float), t.get("res", {"value": np.inf})["value"],
                        t["mlp"]["value"], t["attn"]["value"])
        assert (rows["class"].to_numpy() == want).all()
    c = classify(np.array([0.6, 0.6, 0.1, 0.1, np.nan]), np.array([0.1, 0.5, 0.5, 0.1, 0.5]),
                 np.array([0.1, 0.1, 0.1, 0.1, 0.1]), 0.5, 0.5, 0.5)
    assert list(c) == ["translated", "processed", "newborn", "unexplained", "newborn"]
    with pytest.raises(FlowError, match="layers"):
        run_flow(pack, tmp_path / "r2", thresholds={"layers": {"99": {"res": 0.1}}},
                 progress=False)


def test_the_reader_speaks_slots_and_named_matches(planted_run):
    run = planted_run
    assert all(isinstance(slot, Slot) for slot in run.slots())
    assert run.slots()[Slot("resid_post", 1)] == N == run.n_features("resid_post", 1)
    assert run.n_features("resid_mid", 1) is None and run.n_features("resid_post", 99) is None
    assert run.predecessor_slots(1) == {"res": Slot("resid_post", 0), "mlp": Slot("mlp_out", 1),
                                        "attn": Slot("attn_out", 1)}
    assert run.predecessor_slots(0)["res"] is None
    idx = FlowIndex(run)
    p = idx.predecessor(2, 5, "res")
    assert (p.position, p.layer) == ("resid_post", 1)
    assert p == (p.position, p.layer, p.feature, p.similarity)  # still a tuple for old callers
    assert idx.predecessor(0, 5, "res") is None
    s = idx.successor("resid_post", 1, p.feature)
    assert s is not None and s.layer == 2 and s == (s.layer, s.feature, s.similarity)
    assert idx.successor("resid_post", LAYERS - 1, 0) is None  # the last layer has none


def test_trace_is_cut_exactly_at_the_thresholds(planted_run):
    idx = FlowIndex(planted_run)
    G = trace(idx, "2/resid_post/5", t_res=0.5, t_mod=0.15)
    assert G.has_node("1/resid_post/%d" % idx.predecessor(2, 5, "res")[2])
    for u, v, d in G.edges(data=True):
        t = 0.5 if d["kind"] == "res" else 0.15
        assert d["similarity"] >= t
    # Setting t_res to an edge's exact similarity keeps it; a hair above cuts it.
    res_edges = [d["similarity"] for _, _, d in G.edges(data=True) if d["kind"] == "res"]
    s = min(res_edges)
    assert any(d["similarity"] == s for *_, d in trace(idx, "2/resid_post/5", t_res=s).edges(data=True))
    cut = trace(idx, "2/resid_post/5", t_res=float(np.nextafter(np.float32(s), np.float32(2))))
    assert all(d["similarity"] > s for *_, d in cut.edges(data=True) if d["kind"] == "res")
    # The chain ends where the next step falls below t_res.
    first = min(G.nodes[n]["layer"] for n in G if G.nodes[n]["position"] == "resid_post")
    f0 = next(G.nodes[n]["feature"] for n in G if G.nodes[n]["position"] == "resid_post"
              and G.nodes[n]["layer"] == first)
    if first > 0:
        assert idx.predecessor(first, f0, "res")[3] < 0.5
    data = node_link(G)
    assert {"id", "layer", "position", "feature", "score"} <= set(data["nodes"][0])
    assert {"source", "target", "similarity"} <= set(data["links"][0])


def test_trace_exports_and_persistence(planted_run, tmp_path):
    G = trace(planted_run, "3/resid_post/10", t_res=0.4, t_mod=0.2, mod_k=2)
    written = write_graph(G, tmp_path / "g")
    assert set(written) == {"json", "graphml", "svg", "png"}
    assert written["png"].read_bytes()[:4] == b"\x89PNG" and b"<svg" in written["svg"].read_bytes()
    back = load_graph(written["json"])
    assert set(back.nodes) == set(G.nodes) and set(back.edges) == set(G.edges)
    import networkx as nx

    assert set(nx.read_graphml(written["graphml"]).nodes) == set(G.nodes)
    p = persistence(planted_run, t_res=0.5)
    assert set(p) == set(range(LAYERS)) and (p[LAYERS - 1] == 0).all()
    # Planted translated features of layer 1 are copied into layer 2's 0..59 often enough.
    assert p[0].max() >= 1


def test_rerun_is_cached_and_resumes(planted, tmp_path, monkeypatch):
    import saeflow.flow.compute as flow

    pack, _ = planted
    run = run_flow(pack, tmp_path / "a", progress=False)
    calls = []
    real = flow.compute_layer
    monkeypatch.setattr(flow, "compute_layer", lambda *a, **k: calls.append(a[1].layer) or real(*a, **k))
    run2 = run_flow(pack, tmp_path / "b", progress=False)  # another RUN: cache
    assert calls == [] and run2.manifest["reused_cache"]
    cache = flow.cache_dir("flow", run.manifest["cache_key"])
    (cache / "layer_2.npz").unlink()  # as if killed before layer 2 was written
    run_flow(pack, tmp_path / "c", progress=False)
    assert calls == [2]
    a, c = run.predecessors(), open_flow(tmp_path / "c").predecessors()
    assert a.drop(columns=["top_res", "top_mlp", "top_attn"]).equals(
        c.drop(columns=["top_res", "top_mlp", "top_attn"]))


def test_methods_permutation_folded_encoder(planted, tmp_path):
    from scipy.optimize import linear_sum_assignment

    pack, _ = planted
    run = run_flow(pack, tmp_path / "p", FlowConfig(method="permutation"), layers=[1, 2],
                   progress=False)
    pred = run.predecessors()
    R, Rp = pack.sae("resid_post", 1).W_dec, pack.sae("resid_post", 0).W_dec
    S = (_unit(R) @ _unit(Rp).T).double().numpy()
    rows, cols = linear_sum_assignment(S, maximize=True)
    assert np.array_equal(pred[pred.layer == 1].pred_res.to_numpy()[rows], cols)
    assert pred.top_res.map(len).max() == 1
    for method in ("folded", "encoder"):
        r = run_flow(pack, tmp_path / method, FlowConfig(method=method), layers=[1],
                     progress=False).predecessors()
        assert (r.pred_res.to_numpy()[:30] >= 0).all()
        assert r["class"].notna().all()


def test_bad_input(planted, planted_run, tmp_path):
    pack, _ = planted
    with pytest.raises(FlowError, match=r"no resid_post SAE at layers \[7, 9\]"):
        layer_slots(pack, [1, 7, 9])
    odd = save_pack([("resid_post", 0, random_sae(D, 64)), ("resid_post", 1, random_sae(D + 1, 64))],
                    tmp_path / "odd", model_name="x", d_model=D, n_layers=2)
    with pytest.raises(FlowError, match="disagree on d_model"):
        layer_slots(odd)
    gap = save_pack([("resid_post", L, random_sae(D, 64, seed=L)) for L in range(3)] +
                    [("mlp_out", 0, random_sae(D, 64)), ("mlp_out", 2, random_sae(D, 64))],
                    tmp_path / "gap", model_name="x", d_model=D, n_layers=3)
    with pytest.raises(FlowError, match="mlp_out 1"):
        layer_slots(gap)
    with pytest.raises(FlowError, match="out of range"):
        trace(planted_run, f"1/resid_post/{N}")
    with pytest.raises(FlowError, match="unknown position|position"):
        trace(planted_run, "1/resid_mid/3")
    with pytest.raises(FlowError, match="LAYER/POSITION/INDEX"):
        trace(planted_run, "1-resid_post-3")
    other = save_pack([("resid_post", L, random_sae(D, 64, seed=L)) for L in range(2)],
                      tmp_path / "other", model_name="x", d_model=D, n_layers=2)
    with pytest.raises(FlowError, match="different pack"):
        run_flow(other, planted_run.root, progress=False)
    assert main(["trace", str(planted_run.root), "1/resid_post/1", "--pack",
                 str(tmp_path / "other")]) == 2


def test_cli_flow_trace_match(planted, tmp_path, capsys):
    pack, _ = planted
    run = tmp_path / "run"
    assert main(["flow", str(pack.root), "--out", str(run), "--k", "3", "--high-res", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "translated" in out and "predecessors.parquet" in out
    for f in ("class_proportions.png", "class_proportions.html", "similarity_histograms.png",
              "persistence.html", "plotly.min.js"):
        assert (run / "plots" / f).is_file(), f
    assert main(["trace", str(run), "2/resid_post/3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["seed"] == "2/resid_post/3" and data["nodes"]
    assert (run / "traces" / "2_resid_post_3" / "graph.graphml").is_file()
    out_parquet = tmp_path / "m.parquet"
    assert main(["match", f"{pack.root}@1/resid_post", f"{pack.root}@0/resid_post", "--json",
                 "--out", str(out_parquet)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n_a"] == N and 0 < s["share_above_null"] < 1 and out_parquet.is_file()
    assert main(["match", f"{pack.root}@1/resid_post", f"{pack.root}@0/resid_post",
                 "--method", "permutation", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["share_mutual_top1"] == 1.0
    assert main(["match", str(pack.root), f"{pack.root}@0/resid_post"]) == 2
    assert "name one as" in capsys.readouterr().err


def test_attn_z_mapping_equals_the_real_output_path(tiny_models, tmp_path):
    """Directions mapped through W_O (and Gemma's post-attention norm gain) point where the
    model's own o_proj + norm send them."""
    from saeflow.flow.inputs import slot_directions
    from saeflow.lm.model import attn_z_mapping

    for family in ("gemma3", "gemma2", "llama", "gpt2"):
        model = tiny_models[family]
        L = 1
        n_z = model.width("attn_z")
        M = attn_z_mapping(model, L)  # [n_z, d_model]
        V = torch.randn(7, n_z)
        layer = model.layer_module(L)
        o_proj = layer.get_submodule(model.arch.o_proj)
        with torch.no_grad():
            dev = model.device
            real = o_proj(V.to(dev)) - o_proj(torch.zeros(1, n_z, device=dev))  # bias removed
            if model.arch.post_attn_norm:
                real = layer.get_submodule(model.arch.post_attn_norm)(real)
        cos = torch.nn.functional.cosine_similarity(V @ M.cpu(), real.float().cpu(), dim=-1)
        torch.testing.assert_close(cos, torch.ones(7), atol=1e-5, rtol=0)
    # A pack with attn_z SAEs: flow maps them, and says so.
    model = tiny_models["gemma3"]
    d, z = model.d_model, model.width("attn_z")
    pack = save_pack([("resid_post", 0, random_sae(d, 48, seed=1)),
                      ("resid_post", 1, random_sae(d, 48, seed=2)),
                      ("attn_z", 1, random_sae(z, 40, seed=3))],
                     tmp_path / "az", model_name="tiny", d_model=d, n_layers=3)
    with pytest.raises(FlowError, match="--model"):
        run_flow(pack, tmp_path / "r0", layers=[1], progress=False)
    run = run_flow(pack, tmp_path / "r", model=model, layers=[1], progress=False)
    assert "W_O" in run.manifest["attention_mapping"]["1"]
    dirs = slot_directions(pack, ("attn_z", 1), model=model)
    W = pack.sae("attn_z", 1).W_dec @ attn_z_mapping(model, 1)
    got = run.predecessors().pred_attn.to_numpy()
    want = (_unit(pack.sae("resid_post", 1).W_dec) @ _unit(W).T).argmax(1).numpy()
    assert np.array_equal(got, want) and dirs.d == d


def test_trace_from_module_seed_and_edge_slots(planted, tmp_path):
    pack, _ = planted
    run = run_flow(pack, tmp_path / "sub", layers=[2, 3], progress=False)
    # 2/mlp_out/120 was planted as the source of newborn 2/resid_post/60.
    G = trace(run, "2/mlp_out/120", t_res=0.5, t_mod=0.5)
    assert G.has_edge("2/mlp_out/120", "2/resid_post/60")
    assert G.edges["2/mlp_out/120", "2/resid_post/60"]["similarity"] > 0.9
    # 1/resid_post is only a predecessor slot of this run: it can seed a forward trace.
    G = trace(run, "1/resid_post/0", t_res=0.0)
    assert any(G.nodes[n]["layer"] == 3 for n in G)
    with pytest.raises(FlowError, match="no SAE at resid_post layer 0"):
        trace(run, "0/resid_post/0")


def test_t_res_reaches_the_classification(planted, tmp_path):
    """The residual threshold is t_res (not a null quantile): planted 'processed' features sit
    at s_res ~0.7, so t_res=0.8 turns them into 'newborn', t_res=0.5 keeps them."""
    pack, plants = planted
    lo = run_flow(pack, tmp_path / "lo", t_res=0.5, progress=False)
    hi = run_flow(pack, tmp_path / "hi", t_res=0.8, progress=False)
    for run, t in ((lo, 0.5), (hi, 0.8)):
        thr = run.thresholds["layers"]
        assert thr["2"]["res"]["value"] == t and thr["2"]["res"]["source"].startswith("t_res")
        assert thr["2"]["mlp"]["source"].startswith("null columns")
        pred = run.predecessors()
        rows = pred[pred.layer == 2]
        want = classify(rows.s_res.to_numpy(float), rows.s_mlp.to_numpy(float),
                        rows.s_attn.to_numpy(float), t, thr["2"]["mlp"]["value"],
                        thr["2"]["attn"]["value"])
        assert list(rows["class"]) == list(want)
    p_lo = lo.predecessors().set_index(["layer", "feature"])["class"]
    p_hi = hi.predecessors().set_index(["layer", "feature"])["class"]
    processed = [k for k, (c, _) in plants.items() if c == "processed"]
    assert np.mean([p_lo[k] == "processed" for k in processed]) > 0.95
    assert np.mean([p_hi[k] == "newborn" for k in processed]) > 0.95


def test_massive_dimensions_are_left_out_of_the_matching(tmp_path):
    """Residual dictionaries of two layers, unrelated but for one planted chain, whose rows all
    carry a massive coordinate: raw geometry calls every feature 'translated'; with the firing
    pass's variances naming the massive dimension, only the planted chain is, and the s_res
    share is reported both ways and under the null."""
    from saeflow.features.liveness import Liveness

    g = torch.Generator().manual_seed(5)
    d, n = 64, 256
    R0, R1 = _unit(torch.randn(n, d, generator=g)), _unit(torch.randn(n, d, generator=g))
    R1[:20] = _noisy(R0[:20], g, eps=0.1)
    R0[:, 3] += 3.0
    R1[:, 3] += 3.0
    saes = [("resid_post", 0, _sae_from_dirs(R0, 0)), ("resid_post", 1, _sae_from_dirs(R1, 1))]
    pack = save_pack(saes, tmp_path / "pack", model_name="massive", d_model=d, n_layers=2)
    var = np.ones(d)
    var[3] = 5000.0
    live = Liveness({s: np.full(n, 100) for s in pack.entries}, 10_000, "firing pass",
                    dim_var={s: var for s in pack.entries})
    raw = run_flow(pack, tmp_path / "raw", FlowConfig(geometry="raw"), liveness=live,
                   progress=False)
    auto = run_flow(pack, tmp_path / "auto", liveness=live, progress=False)
    assert raw.manifest["geometry"] == "raw" and auto.manifest["geometry"] == "no_massive"
    assert auto.manifest["massive_dims"] == {"0": [3], "1": [3]}
    share = auto.thresholds["s_res_share"]["1"]
    assert share["raw"] > 0.9 and abs(share["no_massive"] - 20 / n) < 0.02
    assert share["null"] < 0.05
    assert raw.thresholds["s_res_share"]["1"]["no_massive"] == share["no_massive"]
    pred = auto.predecessors()
    rows = pred[pred.layer == 1].set_index("feature")
    assert (rows.loc[:19, "pred_res"].to_numpy() == np.arange(20)).all()
    with pytest.raises(FlowError, match="variance"):
        run_flow(pack, tmp_path / "none", FlowConfig(geometry="no_massive"), progress=False)

"""The causal experiments measure what the papers measured: random targets, a true exhaustive
search, a matched control, dead latents left out of the flow statistics (tiny planted packs)."""
import numpy as np
import pandas as pd
import pytest
import torch

from saeflow.saes.packs import save_pack
from saeflow.saes.sae import SAE, random_sae
from saeflow.steering.validate import ValidateConfig, choose_targets, pick_control, run_validation


def _sae(W_enc, W_dec, b_enc):
    return SAE(W_enc=W_enc.clone(), W_dec=W_dec.clone(), b_enc=b_enc.clone(),
               b_dec=torch.zeros(W_dec.shape[1]), architecture="relu")


def _random(d, n, seed):
    s = random_sae(d, n, "relu", seed=seed)
    return _sae(s.W_enc, s.W_dec, s.b_enc)


def test_target_sampling_is_seeded_and_uniform():
    active = list(range(100, 110))  # ten active features, most active first
    acts = [10.0 - i for i in range(10)]
    a = choose_targets(active, acts, 3, "random", np.random.default_rng(7))
    b = choose_targets(active, acts, 3, "random", np.random.default_rng(7))
    assert a == b and len(set(a)) == 3 and set(a) <= set(active)
    rng = np.random.default_rng(0)
    counts = np.zeros(10)
    for _ in range(3000):
        for f in choose_targets(active, acts, 3, "random", rng):
            counts[f - 100] += 1
    # Each feature is picked 3/10 of the time: 900 +- 25 (sd); 5 sd of slack.
    assert np.all(np.abs(counts - 900) < 125), counts
    assert choose_targets(active, acts, 3, "most_active", rng) == [100, 101, 102]
    assert choose_targets(active, acts, 3, "all", rng) == active
    assert choose_targets(active, acts, None, "random", rng) == active


def test_control_never_removes_a_candidate_and_matches_the_norm():
    slot_m, slot_r = ("mlp_out", 1), ("resid_post", 0)
    top1 = (slot_m, 0, 2.0, 4.0)
    upstream = [top1, (slot_m, 1, 2.0, 4.1), (slot_m, 2, 1.0, 3.9), (slot_m, 3, 9.0, 40.0),
                (slot_r, 4, 2.0, 4.0), (slot_r, 5, 0.1, 0.2)]
    candidates = {(slot_m, 0), (slot_m, 1)}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        (slot, p, _, _), ratio = pick_control(top1, upstream, candidates, 1.25, rng)
        assert (slot, p) not in candidates
        assert 1 / 1.25 <= ratio <= 1.25
        seen.add((slot, p))
    assert seen == {(slot_m, 2)}  # the same slot first, within the norm tolerance
    # Without a match in range it takes the nearest norm; with only candidates, nothing.
    (slot, p, _, _), ratio = pick_control(top1, upstream[:1] + upstream[3:4], {(slot_m, 0)}, 1.25,
                                         rng)
    assert (slot, p) == (slot_m, 3) and ratio == pytest.approx(10.0)
    assert pick_control(top1, upstream[:2], candidates, 1.25, rng) is None


@pytest.fixture(scope="module")
def planted(tiny_models, tmp_path_factory):
    """R_1 feature 3 reads direction u (encoder) but writes w (decoder), w orthogonal to u.
    M_1 feature 7 writes u with a large activation on every token: removing it switches the
    target off, but its decoder is orthogonal to the target's, so no cosine list names it.
    R_0 feature 0 writes w (the target's top-1 residual predecessor, always active)."""
    model = tiny_models["gemma3"]
    d = model.d_model
    g = torch.Generator().manual_seed(3)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    w = torch.randn(d, generator=g)
    w -= (w @ u) * u
    w /= w.norm()
    r0 = _random(d, 24, 1)
    r0.W_dec[0], r0.W_enc[:, 0], r0.b_enc[0] = w, 0.0, 1.0
    m1 = _random(d, 24, 2)
    m1.W_dec[7], m1.W_enc[:, 7], m1.b_enc[7] = u, u, 100.0
    r1 = _random(d, 24, 4)
    r1.W_dec[3], r1.W_enc[:, 3], r1.b_enc[3] = w, u, 50.0
    saes = [("resid_post", 0, r0), ("mlp_out", 1, m1), ("attn_out", 1, _random(d, 24, 5)),
            ("resid_post", 1, r1), ("mlp_out", 0, _random(d, 24, 6)),
            ("attn_out", 0, _random(d, 24, 7))]
    root = tmp_path_factory.mktemp("planted")
    pack = save_pack(saes, root / "pack", model_name="tiny", d_model=d, n_layers=model.n_layers)
    run = root / "run"
    cfg = ValidateConfig(layers=[1], texts=2, tokens_per_text=3, max_features=None,
                         target_choice="all", ctx_len=24, batch_rows=40)
    summary = run_validation(pack, model, run, cfg, progress=False)
    return model, pack, run, summary, pd.read_parquet(run / "validate" / "cases.parquet")


def _candidates(pack, run, L, f):
    from saeflow.flow.graphs import FlowIndex
    from saeflow.steering.plans import flow_for_pack

    index = FlowIndex(flow_for_pack(pack, run))
    out = set()
    for kind in ("res", "mlp", "attn"):
        for rank in range(5):
            p = index.predecessor(L, f, kind, rank)
            if p is not None:
                out.add(f"{p[1]}/{p[0]}/{p[2]}")
    return out


def test_true_exhaustive_finds_the_planted_predecessor_the_cosine_lists_miss(planted):
    _, pack, run, summary, cases = planted
    assert "1/mlp_out/7" not in _candidates(pack, run, 1, 3)  # the premise: no list names it
    target = cases[cases.feature == 3]
    ex = target[target.method == "exhaustive"]
    assert len(ex) == 6  # 2 texts x 3 tokens, all active (bias 50)
    assert (ex.removed == "1/mlp_out/7").all() and ex.deactivated.all()
    assert (ex.removed_similarity.abs() < 1e-5).all()  # orthogonal to the target's decoder
    for m in ("top1_cosine", "top5_cosine", "exhaustive_top5"):
        sel = target[target.method == m]
        assert len(sel) and not sel.removed.str.contains("1/mlp_out/7").any()
    # Exhaustive is the best single removal over everything active: never worse than any
    # single-removal method on the same target.
    piv = cases.pivot_table(index=["text", "token", "layer", "feature"], columns="method",
                            values="z_new")
    for m in ("top1_cosine", "exhaustive_top5", "control_matched", "random_top5"):
        both = piv.dropna(subset=[m, "exhaustive"])
        assert bool((both.exhaustive <= both[m] + 1e-5).all())
    assert summary["methods"]["exhaustive"]["success_rate"] >= \
        summary["methods"]["top1_cosine"]["success_rate"]
    lo, hi = summary["methods"]["exhaustive"]["success_ci95"]
    assert 0 <= lo <= summary["methods"]["exhaustive"]["success_rate"] <= hi <= 1
    assert summary["targets"] >= 6 and "paired_top1" in summary


def test_control_rows_never_remove_a_candidate(planted):
    _, pack, run, summary, cases = planted
    ctl = cases[cases.method == "control_matched"]
    assert len(ctl) > 0
    for r in ctl.itertuples():
        assert r.removed not in _candidates(pack, run, int(r.layer), int(r.feature))
        assert np.isfinite(r.control_norm_ratio) and r.control_norm_ratio > 0
    assert "minus_control" in summary["paired_top1"]


def test_random_targets_reach_weak_features(tiny_models, tmp_path):
    from saeflow.steering.validate import summarize

    model = tiny_models["gemma3"]
    d = model.d_model
    saes = [(p, L, random_sae(d, 32, "relu", seed=10 * L + i))
            for L in (0, 1) for i, p in enumerate(("resid_post", "mlp_out", "attn_out"))]
    pack = save_pack(saes, tmp_path / "pack", model_name="tiny", d_model=d,
                     n_layers=model.n_layers)
    cfg = ValidateConfig(layers=[1], texts=2, tokens_per_text=2, max_features=3, ctx_len=24)
    run_validation(pack, model, tmp_path / "run", cfg, progress=False)
    cases = pd.read_parquet(tmp_path / "run" / "validate" / "cases.parquet")
    assert (cases.target_choice == "random").all()
    # Random ReLU SAEs have ~16 active latents: random targets are not only the top three.
    assert cases.target_rank.max() >= 3
    s = summarize(cases)
    assert set(s["by_target_rank"]["exhaustive"]) <= {"0-7", "8-15", "16-23", "24-31", "32-inf"}


def test_ci_target_adds_texts_until_precise(tiny_models, tmp_path):
    model = tiny_models["gemma3"]
    d = model.d_model
    saes = [(p, L, random_sae(d, 32, "relu", seed=10 * L + i))
            for L in (0, 1) for i, p in enumerate(("resid_post", "mlp_out", "attn_out"))]
    pack = save_pack(saes, tmp_path / "pack", model_name="tiny", d_model=d,
                     n_layers=model.n_layers)
    cfg = ValidateConfig(layers=[1], texts=1, tokens_per_text=2, max_features=4, ctx_len=24,
                         ci_halfwidth=0.2, max_texts=6)
    s = run_validation(pack, model, tmp_path / "run", cfg, progress=False)
    assert 1 <= s["texts"] <= 6
    st = s["ci_target"]
    assert st["halfwidth_asked"] == 0.2
    assert st["met"] or s["texts"] == 6  # stopped because precise enough, or at the cap
    with pytest.raises(ValueError, match="target_choice"):
        ValidateConfig(target_choice="best").check()


def test_dead_latents_are_left_out_of_class_shares_and_lists(tiny_models, tmp_path):
    from saeflow.features.liveness import firing_pass
    from saeflow.flow.compute import run_flow

    model = tiny_models["gemma3"]
    d = model.d_model
    dead = {0: [1, 2, 3], 1: [4, 5], 2: [0, 9]}  # resid_post layer -> never-firing latents
    saes = []
    for L in range(3):
        r = _random(d, 24, 30 + L)
        r.b_enc[dead[L]] = -1e4
        saes.append(("resid_post", L, r))
        m = _random(d, 24, 40 + L)
        m.b_enc[[0, 1]] = -1e4
        saes += [("mlp_out", L, m), ("attn_out", L, _random(d, 24, 50 + L))]
    pack = save_pack(saes, tmp_path / "pack", model_name="tiny", d_model=d,
                     n_layers=model.n_layers)
    live = firing_pass(pack, model, tokens=600, min_density=1e-9)
    for L, feats in dead.items():
        assert (live.counts[("resid_post", L)][feats] == 0).all()
    assert live.summary()["slots"]["1/mlp_out"]["dead"] >= 2
    again = firing_pass(pack, model, tokens=600, min_density=1e-9)  # cached
    assert all(np.array_equal(again.counts[s], live.counts[s]) for s in live.counts)

    run = run_flow(pack, tmp_path / "run", progress=False, liveness=live)
    counts, everything = run.class_counts(), run.class_counts(include_dead=True)
    for L in range(3):
        n_live = int(live.live(("resid_post", L)).sum())
        assert sum(counts[L].values()) == n_live < 24 == sum(everything[L].values())
    pred = run.predecessors()
    for L in range(3):
        rows = pred[pred.layer == L]
        assert not rows[rows.feature.isin(dead[L])].live.any()
    # No list names a dead latent: neither predecessors (MLP 0 and 1 are dead at every layer,
    # residual ones at L-1) nor successors.
    for r in pred.itertuples():
        for p in (r.top_mlp if r.top_mlp is not None else []):
            assert p["feature"] not in (0, 1)
        if r.layer > 0 and r.top_res is not None:
            assert not {p["feature"] for p in r.top_res} & set(dead[r.layer - 1])
    succ = run.successors()
    for r in succ[succ.next_layer.notna()].itertuples():
        if r.top_next is not None:
            assert not {p["feature"] for p in r.top_next} & set(dead[int(r.next_layer)])
    assert run.manifest["dead_latents"]["slots"]["0/resid_post"]["excluded"] >= 3
    # --keep-dead (no liveness): every latent counts again.
    kept = run_flow(pack, tmp_path / "run2", progress=False)
    assert sum(kept.class_counts()[0].values()) == 24


def test_cli_steer_sweep_paper_profile_maps_to_the_papers_settings(monkeypatch, capsys,
                                                                   tmp_path):
    import saeflow.cli.main as cli
    import saeflow.cli.steering as cli_steering
    import saeflow.steering.sweep as sweep

    seen = {}

    def fake_run(model, pack, run, cfg, judge_cfg=None):
        seen["cfg"] = cfg
        return {"profile": cfg.name, "seconds": 1.0, "score": cfg.score, "best": [],
                "classifier": {"held_out_accuracy": 0.9}, "seeds": {}}

    monkeypatch.setattr(cli_steering, "load_model_and_pack", lambda args, stage: (None, None))
    monkeypatch.setattr(sweep, "run_sweep", fake_run)
    assert cli.main(["steer-sweep", str(tmp_path), "--paper", "--n", "40"]) == 0
    cfg = seen["cfg"]
    assert cfg.kind == "rescale" and cfg.seeds_per_theme == 10 and cfg.n == 40
    assert cfg.strengths == [0.0, -1.0, -2.0, -4.0, -8.0, -16.0, -32.0, -64.0]
    assert cfg.max_new_tokens == 96 and cfg.out_dir == "sweep-paper"
    assert "sweep-paper" in capsys.readouterr().out
    assert cli.main(["steer-sweep", str(tmp_path), "--strengths", "0.25,1"]) == 0
    assert seen["cfg"].strengths == [0.25, 1.0] and seen["cfg"].kind == "add"
    assert cli.main(["steer-sweep", str(tmp_path), "--paper", "--modes",
                     "single,cumulative_norm"]) == 2
    assert "cumulative_norm" in capsys.readouterr().err


def test_one_layer_sweeps_use_the_middle_of_the_graph():
    from saeflow.steering.sweep import _spread

    assert _spread([1, 4, 5, 9, 15], 1) == [5]  # not 1, where cumulative == single
    assert _spread([1, 4, 5, 9, 15], 3) == [1, 5, 15] and _spread([2, 3], 3) == [2, 3]

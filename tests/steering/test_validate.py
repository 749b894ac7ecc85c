"""Deactivation experiments and the r sweep on a tiny random model with a planted pack."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from saeflow.cli.main import main
from saeflow.errors import MissingResultError
from saeflow.lm.corpora import SOURCE_BITS, Corpus
from saeflow.lm.hooks import HookPoint, Hooks
from saeflow.saes.packs import save_pack
from saeflow.saes.sae import SAE, random_sae
from saeflow.steering.validate import (
    HEADLINE_METHODS,
    METHODS,
    PAIRS,
    ValidateConfig,
    breakdown_markdown,
    ci95,
    clustered_ci,
    draw_inactive_matches,
    load_summary,
    paired_markdown,
    paper_layers,
    pick_seeds,
    r_sweep,
    rank_bin,
    rank_bin_width,
    rank_rule_markdown,
    run_validation,
    table_markdown,
)

KEY = ["text", "token", "layer", "feature"]


def _tied(W_dec, seed):
    n = W_dec.shape[0]
    return SAE(W_enc=W_dec.T.clone(), W_dec=W_dec.clone(), b_enc=torch.zeros(n),
               b_dec=torch.zeros(W_dec.shape[1]), architecture="relu")


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """Residual SAEs at layers 0-2 that share most directions (so residual chains exist),
    plus MLP and attention SAEs."""
    model = tiny_models["gemma3"]
    d = model.d_model
    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, d, generator=g)
    base = base / base.norm(dim=-1, keepdim=True)
    saes = []
    for L in range(3):
        W = base.clone()
        W[L * 8:(L + 1) * 8] = torch.randn(8, d, generator=g)  # a few new directions per layer
        W = W / W.norm(dim=-1, keepdim=True)
        saes.append(("resid_post", L, _tied(W[torch.randperm(48, generator=g)], L)))
    for L in (0, 1, 2):
        saes.append(("mlp_out", L, random_sae(d, 24, "relu", seed=40 + L)))
        saes.append(("attn_out", L, random_sae(d, 24, "relu", seed=50 + L)))
    root = tmp_path_factory.mktemp("validate")
    pack = save_pack(saes, root / "pack", model_name="tiny", d_model=d, n_layers=model.n_layers)
    return model, pack, root / "run"


CFG = ValidateConfig(layers=[1, 2], texts=3, tokens_per_text=3, max_features=6, ctx_len=24,
                     batch_rows=16)


@pytest.fixture(scope="module")
def result(setup):
    model, pack, run = setup
    summary = run_validation(pack, model, run, CFG, progress=False)
    return summary, pd.read_parquet(run / "validate" / "cases.parquet")


def _texts(model, cfg):
    """The texts run_validation uses: held-out rows with enough content tokens."""
    out = []
    for b in Corpus.from_spec(cfg.corpus, seed=cfg.seed).token_batches(
            model.tokenizer, 1, cfg.ctx_len, max_tokens=cfg.texts * cfg.ctx_len * 2,
            split="heldout"):
        if int(b.content_mask()[0].sum()) >= cfg.tokens_per_text:
            out.append(b)
        if len(out) == cfg.texts:
            break
    return out


def _clean(model, pack, input_ids, slots):
    """{slot: [seq, d_sae]} activations of a clean forward."""
    pts = {s: HookPoint(*s) for s in slots}
    with torch.inference_mode(), Hooks(model, capture=list(pts.values())) as h:
        model.hf(input_ids=input_ids)
    return {s: pack.sae(*s).encode(h.activations[pt][0]) for s, pt in pts.items()}


def _parse(fid):
    lay, pos, p = fid.split("/")
    return (pos, int(lay)), int(p)


def _edited(model, pack, input_ids, t, L, removals):
    """R_L's activations [d_sae] at token t after removing [(slot, feature, amount)] there."""
    pts = {}
    for slot, p, amount in removals:
        sae = pack.sae(*slot)
        d = pts.setdefault(HookPoint(*slot), torch.zeros(1, input_ids.shape[1], sae.d_in))
        d[0, t] -= amount * sae.W_dec[p] / sae.input_scale
    edits = {pt: (lambda d: (lambda act: act + d))(d) for pt, d in pts.items()}
    out = HookPoint("resid_post", L)
    with torch.inference_mode(), Hooks(model, capture=[out], edits=edits) as h:
        model.hf(input_ids=input_ids)
    sae = pack.sae("resid_post", L)
    x = h.activations[out][0, t]
    return sae.encode(x), sae.pre_acts(x)


def test_validation_trials_are_real_interventions(setup, result):
    model, pack, run = setup
    summary, cases = result
    assert set(summary["methods"]) >= {"top1_cosine", "predecessor_group", "top5_cosine",
                                       "random_top5", "permutation", "exhaustive",
                                       "exhaustive_control", "control_matched", "control_group"}
    assert set(summary["methods"]) <= set(METHODS)
    assert "top1_pearson" not in summary["methods"]  # no statistics in this RUN
    # Exhaustive is the best single active removal, so never worse than top-1 cosine.
    ran = cases[~cases.removed_nothing]
    piv = ran.pivot_table(index=KEY, columns="method", values="z_new")
    both = piv.dropna(subset=["top1_cosine", "exhaustive"])
    assert len(both) > 0 and bool((both.exhaustive <= both.top1_cosine + 1e-6).all())
    # Re-run one trial by hand: remove the named predecessor at the token, re-encode the target.
    row = ran[ran.method == "top1_cosine"].iloc[0]
    L, t, f = int(row.layer), int(row.token), int(row.feature)
    b = _texts(model, CFG)[int(row.text)]
    slot, p = _parse(row.removed)
    z = _clean(model, pack, b.input_ids, [slot, ("resid_post", L)])
    assert float(z[("resid_post", L)][t, f]) == pytest.approx(row.z_old, rel=1e-4)
    z_new, pre_new = _edited(model, pack, b.input_ids, t, L, [(slot, p, float(z[slot][t, p]))])
    assert float(z_new[f]) == pytest.approx(row.z_new, rel=1e-4, abs=1e-5)
    assert float(pre_new[f]) == pytest.approx(row.pre_new, rel=1e-4, abs=1e-5)
    assert row.change == pytest.approx(1 - row.z_new / row.z_old)
    assert load_summary(run)["layers"] == [1, 2]
    with pytest.raises(MissingResultError):
        load_summary(run / "nothing")
    assert "top1_cosine" in table_markdown(summary)
    # The trials skipped the layers below the first block they change, and matched the clean
    # forward on their unedited rows.
    assert summary["trial_path"]["skip_layers"] and summary["trial_path"]["max_error"] < 1e-3
    assert summary["trial_rows"] > 0


def test_every_method_has_the_same_denominator(result):
    summary, cases = result
    n = summary["cases"]
    assert n == summary["targets"] == cases.drop_duplicates(KEY).shape[0] > 0
    keys = None
    for m in summary["methods"]:
        sel = cases[cases.method == m]
        assert len(sel) == n and summary["methods"][m]["cases"] == n
        k = set(map(tuple, sel[KEY].to_numpy().tolist()))
        assert keys is None or k == keys
        keys = k
        assert sum(r["cases"] for r in summary["by_target_rank"][m].values()) == n
        assert sum(r["cases"] for r in summary["by_layer"][m].values()) == n
        assert summary["methods"][m]["removed_nothing"] == int(sel.removed_nothing.sum())
    # A method with nothing to remove scores its case as not deactivated, under both rules.
    none = cases[cases.removed_nothing]
    assert len(none) > 0  # e.g. random_top5 or permutation naming an inactive feature
    assert (none.change == 0).all() and not none.deactivated.any()
    assert not none.deactivated_threshold.any() and (none.removed == "").all()
    # Every case has an active top-1 predecessor: the methods that rest on one always run.
    for m in ("top1_cosine", "predecessor_group", "exhaustive"):
        assert not cases[cases.method == m].removed_nothing.any()
    assert "From nowhere" not in set(cases.group)
    # The headline on ranks 0-15 and the rank bins (8 wide for a ReLU SAE).
    top1 = cases[cases.method == "top1_cosine"]
    assert summary["top1_ranks_0_15"]["cases"] == int((top1.target_rank < 16).sum())
    assert set(summary["by_target_rank"]["top1_cosine"]) <= {"0-7", "8-15", "16-23", "24-31",
                                                             "32-inf"}
    assert summary["rank_bin_width"] == {"1": 8, "2": 8}
    # Paired differences are the mean per-case differences.
    for a, b in PAIRS:
        e = summary["paired"][f"{a} - {b}"]
        A = cases[cases.method == a].set_index(KEY).sort_index()
        B = cases[cases.method == b].set_index(KEY).sort_index()
        assert e["cases"] == n
        d = A.deactivated.astype(float) - B.deactivated.astype(float)
        assert e["rank"]["difference"] == pytest.approx(d.mean(), abs=1e-4)
        lo, hi = e["rank"]["ci95"]
        assert lo <= e["rank"]["difference"] <= hi
        assert "threshold" in e and "change" in e


def test_predecessor_group_removes_the_top1_of_each_kind_together(setup, result):
    from saeflow.flow.graphs import FlowIndex
    from saeflow.steering.plans import flow_for_pack

    model, pack, run = setup
    summary, cases = result
    index = FlowIndex(flow_for_pack(pack, run))
    texts = _texts(model, CFG)
    grp = cases[cases.method == "predecessor_group"]
    sizes = []
    for r in grp.itertuples():
        L, t, f = int(r.layer), int(r.token), int(r.feature)
        tops = [index.predecessor(L, f, k) for k in ("res", "mlp", "attn")]
        slots = [(p[0], p[1]) for p in tops if p is not None]
        z = _clean(model, pack, texts[int(r.text)].input_ids, slots)
        want = {f"{p[1]}/{p[0]}/{p[2]}" for p in tops
                if p is not None and float(z[(p[0], p[1])][t, p[2]]) > 0}
        assert set(r.removed.split(",")) == want
        sizes.append(len(want))
        # top1_cosine is the most similar of them.
        top1 = cases[(cases.method == "top1_cosine") & (cases.text == r.text) &
                     (cases.token == t) & (cases.layer == L) & (cases.feature == f)].iloc[0]
        best = max((p for p in tops if p is not None and f"{p[1]}/{p[0]}/{p[2]}" in want),
                   key=lambda p: p[3])
        assert top1.removed == f"{best[1]}/{best[0]}/{best[2]}"
    assert max(sizes) >= 2  # some groups remove several predecessors at once
    # One group trial by hand: all members removed in one forward.
    r = grp[grp.removed.str.contains(",")].iloc[0]
    L, t, f = int(r.layer), int(r.token), int(r.feature)
    b = texts[int(r.text)]
    members = [_parse(x) for x in r.removed.split(",")]
    z = _clean(model, pack, b.input_ids, [s for s, _ in members])
    z_new, _ = _edited(model, pack, b.input_ids, t, L,
                       [(s, p, float(z[s][t, p])) for s, p in members])
    assert float(z_new[f]) == pytest.approx(r.z_new, rel=1e-4, abs=1e-5)
    # Its control removes as many unrelated active features.
    ctl = cases[(cases.method == "control_group") & ~cases.removed_nothing]
    assert len(ctl) > 0


def test_exhaustive_control_draws_inactive_features_at_matched_norms():
    slot_m, slot_a = ("mlp_out", 1), ("attn_out", 1)
    active = {slot_m: np.array([0, 2.0, 0, 1.5, 0, 0, 0, 0]),
              slot_a: np.array([3.0, 0, 0, 0, 0, 0])}
    norms = {slot_m: np.array([1.0, 2.0, 0.5, 1.0, 4.0, 0.0, 1.0, 2.0]),
             slot_a: np.array([1.0, 1.0, 2.0, 3.0, 0.5, 1.0])}
    upstream = [(slot_m, 1, 2.0, 4.0), (slot_m, 3, 1.5, 1.5), (slot_a, 0, 3.0, 3.0)]
    exclude = {(slot_m, 6), (slot_a, 2)}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(100):
        draws = draw_inactive_matches(upstream, active, norms, exclude, rng)
        assert len(draws) == len(upstream)  # the same number of tries
        assert [d[3] for d in draws] == upstream  # one per upstream feature, in order
        qs = [(s, q) for s, q, _, _ in draws]
        assert len(set(qs)) == len(qs)  # without replacement within a slot
        for s, q, amount, u in draws:
            assert s == u[0]  # the same slot
            assert active[s][q] == 0 and (s, q) not in exclude and norms[s][q] > 0
            assert amount * norms[s][q] == pytest.approx(u[3])  # the same removal norm
            seen.add((s, q))
    assert {q for s, q in seen if s == slot_m} == {0, 2, 4, 7}


def test_exhaustive_control_rows_remove_inactive_features(setup, result):
    model, pack, _ = setup
    summary, cases = result
    texts = _texts(model, CFG)
    ex = cases[cases.method == "exhaustive"].set_index(KEY)
    ctl = cases[cases.method == "exhaustive_control"].set_index(KEY)
    assert (ctl.loc[ex.index].tried.to_numpy() == ex.tried.to_numpy()).all()
    for key, r in list(ctl.iterrows())[:12]:
        text, t, L, f = key
        slot, q = _parse(r.removed)
        mslot, mp = _parse(r.matched)
        assert mslot == slot
        z = _clean(model, pack, texts[text].input_ids, [slot])
        assert float(z[slot][t, q]) == 0  # not active on the token
        sae = pack.sae(*slot)
        norm = float(z[slot][t, mp]) * float(sae.W_dec[mp].norm()) / sae.input_scale
        assert r.removed_norm == pytest.approx(norm, rel=1e-4)  # the matched feature's norm
        amount = r.removed_norm / (float(sae.W_dec[q].norm()) / sae.input_scale)
        z_new, _ = _edited(model, pack, texts[text].input_ids, t, L, [(slot, q, amount)])
        assert float(z_new[f]) == pytest.approx(r.z_new, rel=1e-4, abs=1e-5)


def test_t_interval_is_wider_than_normal_and_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(1)
    m, per = 6, 20
    clusters = np.repeat(np.arange(m), per)
    values = (rng.random(m * per) < 0.35).astype(float)
    lo, hi = clustered_ci(values, clusters)
    # Equal cluster sizes: the clustered SE is the SE of the cluster means.
    means = values.reshape(m, per).mean(1)
    want = stats.t.interval(0.95, m - 1, loc=means.mean(), scale=stats.sem(means))
    assert (lo, hi) == pytest.approx(want, rel=1e-9)
    nlo, nhi = clustered_ci(values, clusters, z=1.96)
    assert hi - lo > nhi - nlo
    assert (hi - lo) / (nhi - nlo) == pytest.approx(stats.t.ppf(0.975, 5) / 1.96)
    # The audit's example: 6 texts, 35.7% with a normal CI of [28.8, 42.6] -> t [26.7, 44.7].
    half = (42.6 - 28.8) / 2 * stats.t.ppf(0.975, 5) / 1.96
    assert (35.7 - half, 35.7 + half) == pytest.approx((26.7, 44.7), abs=0.1)
    blo, bhi = ci95(values, clusters, "bootstrap")
    assert blo <= values.mean() <= bhi
    assert all(math.isnan(x) for x in clustered_ci(values, np.zeros(len(values))))


def test_threshold_rule_uses_the_sae_threshold(tiny_models, tmp_path):
    """R_1 is a JumpReLU SAE (θ per feature); R_2 a TopK SAE (θ = the mean k-th largest
    pre-activation over the clean content tokens)."""
    model = tiny_models["gemma3"]
    d = model.d_model
    r1 = random_sae(d, 48, "jumprelu", seed=3)
    r1.threshold = torch.rand(48, generator=torch.Generator().manual_seed(5)) * 0.3
    r2 = random_sae(d, 48, "topk", k=8, seed=4)
    saes = [("resid_post", 0, random_sae(d, 48, "relu", seed=2)), ("resid_post", 1, r1),
            ("resid_post", 2, r2)]
    saes += [(p, L, random_sae(d, 24, "relu", seed=60 + 2 * L + i))
             for L in (0, 1, 2) for i, p in enumerate(("mlp_out", "attn_out"))]
    pack = save_pack(saes, tmp_path / "pack", model_name="tiny", d_model=d,
                     n_layers=model.n_layers)
    cfg = ValidateConfig(layers=[1, 2], texts=2, tokens_per_text=2, max_features=4, ctx_len=24,
                         r_graphs=0)
    s = run_validation(pack, model, tmp_path / "run", cfg, progress=False)
    cases = pd.read_parquet(tmp_path / "run" / "validate" / "cases.parquet")
    th = s["threshold"]["layers"]
    assert th["1"]["source"] == "sae_threshold" and th["1"]["per_feature"]
    c1 = cases[cases.layer == 1]
    assert len(c1) and np.allclose(c1.theta, r1.threshold.numpy()[c1.feature.to_numpy()])
    assert th["2"]["source"] == "mean_kth_preactivation"
    # θ of R_2 by hand: the mean over both texts' content tokens of the 8th largest pre-act.
    kth = []
    for b in _texts(model, cfg):
        pt = HookPoint("resid_post", 2)
        with torch.inference_mode(), Hooks(model, capture=[pt]) as h:
            model.hf(input_ids=b.input_ids)
        pre = pack.sae("resid_post", 2).pre_acts(h.activations[pt][0])
        kth += pre[b.content_mask()[0]].topk(8, dim=-1).values[:, -1].tolist()
    assert th["2"]["value"] == pytest.approx(np.mean(kth), abs=1e-4)
    c2 = cases[cases.layer == 2]
    assert len(c2) and np.allclose(c2.theta, np.mean(kth), atol=1e-4)
    # The rule itself, and both rules side by side for every method.
    want = ~cases.removed_nothing & (cases.pre_new < cases.theta)
    assert (cases.deactivated_threshold == want).all()
    for m, r in s["methods"].items():
        assert {"success_rate", "threshold_success_rate", "threshold_ci95"} <= set(r)
    # A TopK SAE's rank bins are k/4 wide.
    assert rank_bin_width(r2) == 2 and s["rank_bin_width"]["2"] == 2
    assert set(c2.rank_bin) <= {"0-1", "2-3", "4-5", "6-7"}
    assert "threshold" in rank_rule_markdown(s)


def test_layers_scale_from_the_paper():
    assert paper_layers(26) == [6, 12, 18]
    assert paper_layers(18) == [4, 8, 12]
    assert paper_layers(3) == [1, 2]
    cfg = ValidateConfig()
    assert cfg.layers is None and cfg.texts >= 30 and cfg.tokens_per_text == 5
    assert cfg.max_features == 10 and cfg.split == "heldout" and cfg.interval == "t"
    assert [rank_bin(r) for r in (0, 7, 8, 31, 32, 200)] == ["0-7", "0-7", "8-15", "24-31",
                                                            "32-inf", "32-inf"]
    assert rank_bin(9, 8) == "8-15" and rank_bin(9, 2) == "8-inf"


def test_texts_come_from_the_heldout_split(setup, result):
    model, _, _ = setup
    summary, cases = result
    assert summary["split"] == "heldout" and summary["n_texts"] == CFG.texts
    corpus = Corpus.from_spec(CFG.corpus, seed=CFG.seed)
    docs = [d for text in summary["documents"] for d in text]
    assert len(summary["documents"]) == CFG.texts and docs
    for doc_id in docs:
        doc = corpus.document(doc_id)
        assert corpus.is_heldout(corpus.sources[doc_id >> SOURCE_BITS][0], doc.key)
    # And they are the held-out rows (the hand re-runs above read the same ones).
    for b, text in zip(_texts(model, CFG), summary["documents"]):
        assert sorted({int(x) for x in b.doc_ids[0].tolist() if x >= 0}) == text


def test_markdown_tables(result):
    summary, _ = result
    md = table_markdown(summary)
    assert f"{summary['cases']} cases" in md and "threshold rule" in md
    assert "predecessor_group" in md and "exhaustive_control" in md
    rr = rank_rule_markdown(summary)
    assert "| 0-7 | rank |" in rr and "| 0-7 | threshold |" in rr and "ranks 0-15" in rr
    for m in HEADLINE_METHODS:
        assert m in rr
    assert "0-7" in breakdown_markdown(summary, "by_target_rank", title="rank")
    assert "%" in breakdown_markdown(summary, "by_layer", rule="threshold")
    pm = paired_markdown(summary)
    assert all(f"{a} - {b}" in pm for a, b in PAIRS)
    # Bins past RANK_BINS x width sort last.
    fake = {"by_target_rank": {"top1_cosine": {
        b: {"cases": 1, "success_rate": 0.5, "success_ci95": [0.1, 0.9]}
        for b in ("32-inf", "8-15", "0-7")}}}
    rows = breakdown_markdown(fake, "by_target_rank").splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["0-7", "8-15", "32-inf"]


def test_r_sweep_is_zero_at_r_one(setup):
    from saeflow.steering.plans import flow_for_pack

    model, pack, run = setup
    seeds = pick_seeds(flow_for_pack(pack, run), 2, min_span=2)
    assert len(seeds) == 2
    df = r_sweep(pack, model, run, seeds, [0.0, 1.0, 3.0], texts=2, ctx_len=16)
    assert len(df) == 6
    assert np.allclose(df[df.r == 1.0].relative_change, 0.0, atol=1e-6)
    assert (df[df.r != 1.0].relative_change.abs() > 0).any()


def test_cli_validate(setup, tiny_model_dirs, tmp_path, capsys):
    model, pack, _ = setup
    run = tmp_path / "run"
    assert main(["validate", str(run), "--pack", str(pack.root), "--model",
                 str(tiny_model_dirs["gemma3"]), "--layers", "1,2", "--texts", "2",
                 "--tokens-per-text", "2", "--max-features", "4", "--ctx-len", "24",
                 "--r-graphs", "1", "--r-values", "0,1", "--r-texts", "2",
                 "--interval", "bootstrap"]) == 0
    out = capsys.readouterr().out
    assert "top1_cosine" in out and "success" in out
    assert "threshold rule" in out and "predecessor_group - control_group" in out
    s = json.loads((run / "validate" / "summary.json").read_text())
    assert s["texts"] == 2 and (run / "validate" / "r_sweep.csv").is_file()
    assert s["intervals"]["how"] == "bootstrap" and s["split"] == "heldout"
    assert main(["validate", str(run), "--pack", str(pack.root), "--model",
                 str(tiny_model_dirs["gemma3"]), "--layers", "7"]) == 2
    assert "layer" in capsys.readouterr().err

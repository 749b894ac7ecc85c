"""Steering plans and their edits, sampling, concurrency and bad input, on a tiny random model."""
import json
import threading

import networkx as nx
import pytest
import torch

from saeflow.cli.main import main
from saeflow.errors import GenerationError, PlanError
from saeflow.lm.hooks import HookPoint, Hooks
from saeflow.saes.packs import save_pack
from saeflow.saes.sae import random_sae
from saeflow.steering.generate import MAX_NEW_TOKENS, SamplingConfig, generate, sample, steer
from saeflow.steering.plans import (
    CallScope,
    Intervention,
    SteeringPlan,
    plan_edits,
    plan_for_feature,
    plan_from_graph,
    schedule_strength,
    typical_activations,
)


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    model = tiny_models["gemma3"]
    d = model.d_model
    saes = [("resid_post", L, random_sae(d, 32, "relu", seed=20 + L)) for L in range(3)]
    saes.append(("mlp_out", 1, random_sae(d, 24, "topk", k=4, seed=30)))
    pack = save_pack(saes, tmp_path_factory.mktemp("steer") / "pack", model_name="tiny",
                     d_model=d, n_layers=model.n_layers)
    typical = {(p, L): torch.full((s.d_sae,), 2.0) for p, L, s in saes}
    return model, pack, typical


def _ids(model, text="hello world"):
    return model.tokenizer(text, return_tensors="pt").input_ids.to(model.device)


def test_plan_json_round_trip_and_bad_files(tmp_path):
    plan = SteeringPlan("rescale", [Intervention(2, "resid_post", 5, 0.0),
                                    Intervention(1, "mlp_out", 3, -2.0)], tokens=[3, 1],
                        description="two features")
    path = plan.save(tmp_path / "plan.json")
    back = SteeringPlan.load(path)
    assert back.to_dict() == plan.to_dict() and back.tokens == [1, 3]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        SteeringPlan.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"interventions": []}))
    with pytest.raises(PlanError, match="not a saeflow steering plan"):
        SteeringPlan.load(tmp_path / "other.json")
    with pytest.raises(PlanError, match="mode"):
        SteeringPlan("multiply", [])
    with pytest.raises(PlanError, match="finite"):
        SteeringPlan("add", [Intervention(1, "resid_post", 0, float("nan"))])


def test_one_plan_schema_for_files_requests_and_python(tmp_path):
    """PlanSchema's rules hold for plan files, API requests and SteeringPlan (issue 30)."""
    from saeflow.steering.plans import PLAN_FORMAT, STRENGTH_LIMIT, PlanSchema

    iv = {"layer": 1, "position": "resid_post", "feature": 3, "strength": 2.0}
    good = {"format": PLAN_FORMAT, "version": 1, "mode": "add", "tokens": None,
            "description": "", "meta": {}, "interventions": [iv]}
    # what older saeflow wrote (and hand-edited extras) loads as before
    legacy = {**good, "interventions": [{**iv, "id": "1/resid_post/3"}], "note": "mine"}
    assert SteeringPlan.from_dict(legacy).to_dict() == good
    assert SteeringPlan.from_dict({**good, "tokens": "all"}).tokens is None
    assert SteeringPlan.from_dict({**good, "tokens": [5, 2, 5]}).tokens == [2, 5]
    bad_texts = {  # plan file text -> a word of the one-line error
        json.dumps({**good, "tokens": 5}): "tokens", json.dumps({**good, "tokens": [None]}): "tokens",
        json.dumps({**good, "tokens": ["a"]}): "tokens", json.dumps({**good, "tokens": [-2]}): "tokens",
        json.dumps(good).replace('"layer": 1', '"layer": 1e400'): "finite",
        json.dumps(good).replace('"strength": 2.0', '"strength": NaN'): "finite",
        json.dumps({**good, "interventions": [{**iv, "strength": 2 * STRENGTH_LIMIT}]}): "strength",
        json.dumps({**good, "interventions": [{**iv, "position": "x"}]}): "unknown position",
        json.dumps({**good, "interventions": [{**iv, "layer": 2.5}]}): "layer",
        json.dumps({**good, "interventions": [{"layer": 1}]}): "position",
        json.dumps({**good, "meta": "x"}): "meta", json.dumps({**good, "mode": "mul"}): "mode",
        json.dumps([good]): "not a saeflow steering plan",
    }
    for i, (text, word) in enumerate(bad_texts.items()):
        path = tmp_path / f"bad{i}.json"
        path.write_text(text)
        with pytest.raises(PlanError, match=word) as e:
            SteeringPlan.load(path)
        assert "\n" not in str(e.value) and len(str(e.value)) < 400
    # the same rules in Python and in the schema the API documents
    with pytest.raises(PlanError, match="tokens"):
        SteeringPlan("add", [Intervention(1, "resid_post", 3, 1.0)], tokens=[-1])
    with pytest.raises(PlanError, match="layer"):
        SteeringPlan("add", [Intervention(-1, "resid_post", 3, 1.0)])
    props = PlanSchema.model_json_schema()["properties"]
    assert {"format", "mode", "tokens", "interventions", "meta"} <= set(props)


def test_plan_check_names_what_is_wrong(setup):
    _, pack, _ = setup
    with pytest.raises(PlanError, match="unknown feature 7/resid_post/1"):
        plan_for_feature("7/resid_post/1", 2).check(pack)
    with pytest.raises(PlanError, match="features 0..31"):
        plan_for_feature("1/resid_post/32", 2).check(pack)
    with pytest.raises(PlanError, match="sane bound"):
        plan_for_feature("1/resid_post/3", 500).check(pack)
    plan_for_feature("1/resid_post/3", 500).check(pack, force=True)
    big = SteeringPlan("add", [Intervention(1, "resid_post", i % 32, 1.0) for i in range(300)])
    with pytest.raises(PlanError, match="limit is 256"):
        big.check(pack)


def test_additive_edit_adds_strength_times_typical_times_direction(setup):
    model, pack, typical = setup
    plan = SteeringPlan("add", [Intervention(1, "resid_post", 4, 3.0),
                                Intervention(1, "resid_post", 9, -1.5)])
    pt = HookPoint("resid_post", 1)
    ids = _ids(model)
    with torch.inference_mode(), Hooks(model, capture=[pt]) as h:
        model.hf(input_ids=ids)
    clean = h.activations[pt]
    scope = CallScope()
    with torch.inference_mode(), scope, Hooks(model, capture=[pt],
                                              edits=plan_edits(plan, pack, scope, typical)) as h:
        model.hf(input_ids=ids)
    W = pack.sae("resid_post", 1, device=model.device).W_dec
    expect = clean + 2.0 * (3.0 * W[4] - 1.5 * W[9])
    torch.testing.assert_close(h.activations[pt], expect, atol=1e-5, rtol=1e-5)


def test_rescale_edit_and_token_positions(setup):
    model, pack, _ = setup
    pt = HookPoint("resid_post", 2)
    sae = pack.sae("resid_post", 2, device=model.device)
    ids = _ids(model, "a b c d e f")
    with torch.inference_mode(), Hooks(model, capture=[pt]) as h:
        model.hf(input_ids=ids)
    clean = h.activations[pt]  # [1, seq, d]
    z = sae.encode(clean)
    f = int(z[0].sum(0).argmax())  # a feature active somewhere
    plan = SteeringPlan("rescale", [Intervention(2, "resid_post", f, -1.0)], tokens=[1, 3])
    scope = CallScope()
    with torch.inference_mode(), scope, Hooks(model, capture=[pt],
                                              edits=plan_edits(plan, pack, scope)) as h:
        model.hf(input_ids=ids)
    change = h.activations[pt] - clean
    expect = (-2.0 * z[0, :, f])[:, None] * sae.W_dec[f]  # (r - 1) z_f W_dec[f]
    mask = torch.zeros(ids.shape[1], 1, device=model.device)
    mask[[1, 3]] = 1
    torch.testing.assert_close(change[0], expect * mask, atol=1e-5, rtol=1e-5)


def test_edits_outside_their_call_do_nothing(setup):
    model, pack, typical = setup
    plan = plan_for_feature("1/resid_post/2", 5.0)
    scope = CallScope()  # never entered
    pt = HookPoint("resid_post", 1)
    ids = _ids(model)
    with torch.inference_mode(), Hooks(model, capture=[pt]) as h:
        model.hf(input_ids=ids)
    clean = h.activations[pt]
    with torch.inference_mode(), Hooks(model, capture=[pt],
                                       edits=plan_edits(plan, pack, scope, typical)) as h:
        model.hf(input_ids=ids)
    torch.testing.assert_close(h.activations[pt], clean)


def test_hooks_fire_only_in_the_call_that_entered_them(setup):
    """A capture (with its early stop) and an edit installed by one thread stay silent in a
    forward another thread runs on the same model (issue 30: HookNotFiredError, _StopForward)."""
    model, _, _ = setup
    pt, early = HookPoint("resid_post", 1), HookPoint("resid_post", 0)  # stops after layer 1
    ids = _ids(model)
    with torch.inference_mode():
        clean = model.hf(input_ids=ids).logits
    entered, ran = threading.Event(), threading.Event()
    out: dict = {}

    def other_thread():
        entered.wait()
        with torch.inference_mode():
            out["logits"] = model.hf(input_ids=ids).logits  # runs past every foreign hook
        ran.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with Hooks(model, capture=[pt], edits={early: lambda a: a + 100.0},
               stop_early=True) as h:
        assert h.stop_early
        entered.set()
        ran.wait(60)
    t.join()
    assert h.activations == {}  # nothing captured from the other thread's forward
    torch.testing.assert_close(out["logits"], clean)  # and nothing edited there


def test_sampling_is_seeded_batched_and_steerable(setup):
    model, pack, typical = setup
    cfg = SamplingConfig(max_new_tokens=6, n=3, temperature=1.0, top_p=0.9, seed=5)
    ids = _ids(model)
    a, b = sample(model, ids, cfg), sample(model, ids, cfg)
    assert a.shape == (3, 6) and torch.equal(a, b)
    assert not torch.equal(a, sample(model, ids, SamplingConfig(6, 3, 1.0, 0.9, seed=6)))
    greedy = SamplingConfig(max_new_tokens=6, n=2, temperature=0)
    g = sample(model, ids, greedy)
    assert torch.equal(g[0], g[1])
    # The KV-cache loop equals full re-computation under greedy decoding.
    seq = ids
    with torch.inference_mode():
        for _ in range(6):
            nxt = model.hf(input_ids=seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(g[0], seq[0, ids.shape[1]:].cpu())  # samples come back on the CPU
    plan = plan_for_feature("2/resid_post/1", 40.0)
    steered = generate(model, "hello world", greedy, plan, pack, typical)
    assert steered != generate(model, "hello world", greedy)


def test_streaming_callback_sees_every_token(setup):
    model, _, _ = setup
    seen = []
    out = sample(model, _ids(model), SamplingConfig(5, 2, 1.0, 1.0, 0),
                 on_token=lambda step, tok: seen.append((step, tok.clone())))
    assert [s for s, _ in seen] == list(range(out.shape[1]))
    assert torch.equal(torch.stack([t for _, t in seen], 1), out)


def test_concurrent_plans_equal_their_sequential_runs(setup):
    model, pack, typical = setup
    cfg = SamplingConfig(max_new_tokens=8, n=2, temperature=0.8, top_p=0.95, seed=1)
    plans = [plan_for_feature("1/resid_post/3", 30.0),
             SteeringPlan("add", [Intervention(2, "resid_post", 7, -30.0),
                                  Intervention(1, "mlp_out", 2, 20.0)]),
             None, plan_for_feature("0/resid_post/5", 25.0)]
    alone = [generate(model, "hello", cfg, p, pack, typical) for p in plans]
    assert len({json.dumps(a) for a in alone}) > 1  # the plans do change the output
    results = [None] * len(plans) * 2
    barrier = threading.Barrier(len(results))

    def work(i):
        barrier.wait()
        results[i] = generate(model, "hello", cfg, plans[i % len(plans)], pack, typical)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone + alone


def test_bad_requests_fail_before_generation(setup, monkeypatch):
    model, pack, typical = setup
    import saeflow.steering.generate as gen_mod

    def boom(*a, **k):
        raise AssertionError("generation started")

    monkeypatch.setattr(gen_mod, "sample", boom)
    plan = plan_for_feature("1/resid_post/3", 2.0)
    with pytest.raises(GenerationError, match="limit of 64 samples"):
        steer(model, pack, plan, "hi", SamplingConfig(n=65))
    with pytest.raises(GenerationError, match=f"limit of {MAX_NEW_TOKENS}"):
        steer(model, pack, plan, "hi", SamplingConfig(max_new_tokens=MAX_NEW_TOKENS + 1))
    ctx = model.config.max_position_embeddings
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        steer(model, pack, plan, "hello " * ctx, SamplingConfig(max_new_tokens=4))
    with pytest.raises(PlanError, match="unknown feature"):
        steer(model, pack, plan_for_feature("1/resid_post/99", 2.0), "hi", SamplingConfig())
    with pytest.raises(PlanError, match="sane bound"):
        steer(model, pack, plan_for_feature("1/resid_post/3", 1e4), "hi", SamplingConfig())


def _graph():
    G = nx.DiGraph(seed="2/resid_post/7")
    for L, f in ((0, 1), (1, 4), (2, 7), (3, 9)):
        G.add_node(f"{L}/resid_post/{f}", layer=L, position="resid_post", feature=f,
                   role="seed" if L == 2 else "res")
    G.add_node("2/mlp_out/3", layer=2, position="mlp_out", feature=3, role="mlp")
    return G


def test_plans_from_flow_graphs_and_schedules():
    G = _graph()
    ids = lambda p: [i.id for i in p.interventions]  # noqa: E731
    assert ids(plan_from_graph(G, 2.0, "seed")) == ["2/resid_post/7"]
    assert ids(plan_from_graph(G, 2.0, "single", layer=1)) == ["1/resid_post/4"]
    assert ids(plan_from_graph(G, 2.0, "cumulative", layer=2)) == [
        "0/resid_post/1", "1/resid_post/4", "2/resid_post/7"]
    assert len(plan_from_graph(G, 2.0, "span").interventions) == 4
    both = plan_from_graph(G, 2.0, "span", positions=("resid_post", "mlp_out"))
    assert "2/mlp_out/3" in ids(both)
    with pytest.raises(PlanError, match="no resid_post feature"):
        plan_from_graph(G, 2.0, "single", layer=7)
    with pytest.raises(PlanError, match="needs the layer"):
        plan_from_graph(G, 2.0, "single")
    exp = plan_from_graph(G, 4.0, "span", schedule="exponential", alpha=-0.5)
    assert [round(i.strength, 4) for i in exp.interventions] == [
        round(4.0 * torch.exp(torch.tensor(-0.5 * L)).item(), 4) for L in range(4)]
    lin = plan_from_graph(G, 4.0, "span", schedule="linear")
    assert [i.strength for i in lin.interventions] == [4.0, 3.0, 2.0, 1.0]
    assert schedule_strength(3.0, 5) == 3.0
    with pytest.raises(PlanError, match="schedule"):
        schedule_strength(3.0, 5, "cosine")


def test_typical_activations_measured_once_and_cached(setup):
    model, pack, _ = setup
    t = typical_activations(pack, [("resid_post", 1)], model=model, tokens=512)
    v = t[("resid_post", 1)]
    assert v.shape == (32,) and bool((v > 0).all())
    again = typical_activations(pack, [("resid_post", 1)], model=None, tokens=512)  # cached
    torch.testing.assert_close(again[("resid_post", 1)], v)
    with pytest.raises(PlanError, match="typical activation"):
        typical_activations(pack, [("resid_post", 2)], model=None, tokens=512)


def test_cli_steer_writes_json_and_refuses_bad_input(setup, tiny_model_dirs, tmp_path, capsys):
    model, pack, _ = setup
    out = tmp_path / "steer.json"
    plan_file = tmp_path / "plan.json"
    base = ["steer", "--pack", str(pack.root), "--model", str(tiny_model_dirs["gemma3"]),
            "--prompt", "hello", "--n", "2", "--max-new-tokens", "5", "--device", "cpu"]
    assert main([*base, "--feature", "1/resid_post/3", "--strength", "8", "--json", str(out),
                 "--save-plan", str(plan_file)]) == 0
    res = json.loads(out.read_text())
    assert len(res["default"]) == 2 and len(res["steered"]) == 2
    assert res["plan"]["interventions"][0]["feature"] == 3
    assert "steered:" in capsys.readouterr().out
    assert main([*base, "--plan", str(plan_file)]) == 0
    assert main([*base, "--feature", "1/resid_post/3", "--strength", "1000"]) == 2
    assert "sane bound" in capsys.readouterr().err
    assert main([*base, "--feature", "1/resid_post/3", "--strength", "1000", "--force"]) == 0
    assert main([*base, "--feature", "9/resid_post/3"]) == 2
    assert "unknown feature" in capsys.readouterr().err
    assert main([*base, "--feature", "1/resid_post/3", "--n", "100"]) == 2


def test_typical_activations_come_from_the_runs_index(tiny_run, tmp_path):
    import numpy as np

    from saeflow.features.tables import open_index

    run, pack, _ = tiny_run
    slots = [("resid_post", 1), ("mlp_out", 0)]
    t = typical_activations(pack, slots, run=run)  # no model: the index must answer
    for slot in slots:
        mean = np.array([v or 0 for v in open_index(run).slot_column(slot, "mean_act")])
        seen = mean > 0
        want = np.where(seen, mean, np.median(mean[seen]) if seen.any() else 1.0)
        np.testing.assert_array_equal(t[slot].numpy(), want.astype(np.float32))
    with pytest.raises(PlanError, match="typical activation"):  # a RUN without an index
        typical_activations(pack, slots, run=tmp_path)

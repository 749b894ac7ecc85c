"""The feature index on a tiny model and random SAEs: exact against a brute-force pass."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import count_syncs

from saeflow.cli.main import main
from saeflow.errors import FeatureIndexError, MissingResultError
from saeflow.features.index import IndexConfig, build_index
from saeflow.features.labels import logit_lens
from saeflow.features.tables import open_index
from saeflow.lm.corpora import Corpus
from saeflow.lm.hooks import HookPoint, capture
from saeflow.saes.packs import save_pack
from saeflow.saes.sae import random_sae

CFG = IndexConfig(tokens=1500, batch_size=4, ctx_len=48, n_top=5, n_samples=4,
                  encoder_dtype="float32", corpus="wiki=0.8,python=0.2")


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    model = tiny_models["gemma3"]
    d = model.d_model
    saes = [("resid_post", 1, random_sae(d, 40, "relu", seed=1)),
            ("mlp_out", 1, random_sae(d, 30, "topk", k=4, seed=2)),
            ("attn_z", 2, random_sae(model.width("attn_z"), 24, "relu", seed=3))]
    root = tmp_path_factory.mktemp("index")
    pack = save_pack(saes, root / "pack", model_name="tiny", d_model=d, n_layers=3,
                     neuronpedia_ids={("resid_post", 1): "tiny-model/1-res"})
    return model, pack, root


def _reference(model, pack, cfg):
    """All activations of the same batches, computed directly."""
    corpus = Corpus.from_spec(cfg.corpus, seed=cfg.seed)
    out = {s: [] for s in pack.entries}
    meta = []
    for b in corpus.token_batches(model.tokenizer, cfg.batch_size, cfg.ctx_len,
                                  max_tokens=cfg.tokens):
        acts = capture(model, b.input_ids, [HookPoint(p, L) for p, L in pack.entries],
                       attention_mask=b.attention_mask)
        content = b.content_mask()
        for (p, L) in pack.entries:
            z = pack.sae(p, L).encode(acts[HookPoint(p, L)].float().cpu()) * content[..., None]
            out[(p, L)].append(z.reshape(-1, z.shape[-1]))
        meta.append((b.doc_ids.reshape(-1), b.token_index.reshape(-1)))
    doc = torch.cat([m[0] for m in meta])
    tok = torch.cat([m[1] for m in meta])
    return {s: torch.cat(v) for s, v in out.items()}, doc, tok


def test_index_equals_brute_force(setup):
    model, pack, root = setup
    idx = build_index(pack, model, root / "run", CFG, progress=False)
    Z, doc, tok = _reference(model, pack, CFG)
    feats = pq.read_table(idx.root / "features.parquet").to_pandas()
    ex = pq.read_table(idx.root / "examples.parquet").to_pandas()
    n_tokens = idx.manifest["tokens"]
    assert n_tokens >= CFG.tokens * 0.98
    for (p, L), z in Z.items():
        fr = feats[(feats.layer == L) & (feats.position == p)].sort_values("feature")
        count = (z > 0).sum(0).numpy()
        assert np.array_equal(fr["count"].to_numpy(), count)
        np.testing.assert_allclose(fr["max_act"].to_numpy(), z.max(0).values.numpy(), rtol=1e-5)
        assert np.array_equal(np.stack(fr["hist"].to_numpy()).sum(1), count)
        np.testing.assert_allclose(fr["density"].to_numpy(), count / n_tokens)
        top = ex[(ex.layer == L) & (ex.position == p) & (ex.kind == "top")]
        for f in range(z.shape[1]):
            want = z[:, f].topk(min(CFG.n_top, int(count[f]))).values.numpy()
            got = top[top.feature == f].sort_values("rank")
            np.testing.assert_allclose(got.activation.to_numpy(), want, rtol=1e-5, atol=1e-6)
            for _, e in got.iterrows():  # each example points at a token with that activation
                hit = ((doc == e.doc_id) & (tok == e.token_index)).nonzero()[:, 0]
                assert len(hit) >= 1
                np.testing.assert_allclose(z[hit[0], f].item(), e.activation, rtol=1e-5,
                                           atol=1e-6)
                np.testing.assert_allclose(e.acts[e.center], e.activation, rtol=2e-3)
        samples = ex[(ex.layer == L) & (ex.position == p) & (ex.kind == "sample")]
        for _, e in samples.iterrows():  # samples are real activations of that feature
            hit = ((doc == e.doc_id) & (tok == e.token_index)).nonzero()[:, 0]
            np.testing.assert_allclose(z[hit[0], e.feature].item(), e.activation, rtol=1e-5,
                                       atol=1e-6)
        assert (samples.groupby("feature").size() <= CFG.n_samples).all()
    row = idx.feature(1, "resid_post", 0)
    assert row["neuronpedia"] == "https://www.neuronpedia.org/tiny-model/1-res/0"
    assert row["examples"] and row["examples"][0]["tokens"][row["examples"][0]["center"]]
    assert row["label"]


def test_logit_lens_matches_the_real_unembedding(tiny_models):
    for family in ("gemma3", "llama", "gpt2"):
        model = tiny_models[family]
        dirs = torch.randn(6, model.d_model)
        top_i, top_v, bot_i, _ = logit_lens(model, dirs, n=5)
        tiled = logit_lens(model, dirs, n=5, block=4, vocab_block=7)  # running top-n merges
        assert torch.equal(tiled[0], top_i) and torch.equal(tiled[2], bot_i), family
        norm = model.module(model.arch.final_norm)
        with torch.no_grad():
            head = model.hf.get_output_embeddings()
            ref = head(norm(dirs[:, None, :].to(model.device) * 3.0))[:, 0]
            if getattr(norm, "bias", None) is not None:  # a constant offset, not the direction's
                ref = ref - head(norm.bias[None])
        ref = ref.float().cpu()
        for r in range(6):
            assert set(top_i[r].tolist()) == set(ref[r].topk(5).indices.tolist()), family
            assert set(bot_i[r].tolist()) == set((-ref[r]).topk(5).indices.tolist()), family


def test_resume_gives_the_same_index(setup, tmp_path):
    model, pack, _ = setup
    with pytest.raises(KeyboardInterrupt):
        build_index(pack, model, tmp_path / "a", CFG, progress=False, stop_after_batches=3)
    state = tmp_path / "a" / "index" / ".state" / "state.pt"
    assert state.is_file()
    before = torch.load(state, weights_only=False)["seconds"]
    assert before > 0
    resumed = build_index(pack, model, tmp_path / "a", CFG, progress=False)
    assert resumed.manifest["seconds"] >= before  # the reported time includes the first part
    whole = build_index(pack, model, tmp_path / "b", CFG, progress=False)
    for name in ("features", "examples"):
        a = pq.read_table(resumed.root / f"{name}.parquet").to_pandas()
        b = pq.read_table(whole.root / f"{name}.parquet").to_pandas()
        assert a.drop(columns=[c for c in a if a[c].dtype == object]).equals(
            b.drop(columns=[c for c in b if b[c].dtype == object]))
        assert a.label.equals(b.label) if name == "features" else True


def test_index_bad_input(setup, tmp_path, tiny_models):
    model, pack, root = setup
    with pytest.raises(KeyboardInterrupt):
        build_index(pack, model, tmp_path / "r", CFG, progress=False, stop_after_batches=1)
    other = save_pack([("resid_post", 1, random_sae(model.d_model, 16, "relu", seed=9))],
                      tmp_path / "other", model_name="tiny", d_model=model.d_model, n_layers=3)
    with pytest.raises(FeatureIndexError, match="partial pass over a different pack"):
        build_index(other, model, tmp_path / "r", CFG, progress=False)
    short = IndexConfig(tokens=10**9, corpus=str(_tiny_text(tmp_path)), batch_size=2, ctx_len=32)
    with pytest.raises(FeatureIndexError, match="gives only"):
        build_index(pack, model, tmp_path / "s", short, progress=False)
    with pytest.raises(ValueError, match="d_in|d_model"):
        build_index(pack, tiny_models["llama"], tmp_path / "t", CFG, progress=False)
    idx = open_index(root / "run") if (root / "run" / "index").exists() else None
    if idx is not None:
        with pytest.raises(FeatureIndexError, match="out of range"):
            idx.feature(1, "resid_post", 999)


def _tiny_text(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("A short text about weddings and rings.\n")
    return p


def test_search_and_cli(setup, capsys):
    model, pack, root = setup
    idx = build_index(pack, model, root / "run", CFG, progress=False)  # reused
    feats = pq.read_table(idx.root / "features.parquet").to_pandas()
    word = feats.top_tokens.explode().dropna().value_counts().index[0]
    hits = idx.search(word)
    assert hits and all(word.lower() in (h["label"].lower()) or h["score"] > 0 for h in hits)
    assert hits == sorted(hits, key=lambda h: -h["score"])
    assert main(["search", str(root / "run"), word, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["id"] == hits[0]["id"]
    assert main(["feature", str(root / "run"), hits[0]["id"]]) == 0
    assert "logit lens" in capsys.readouterr().out


def test_trace_nodes_carry_index_labels(setup, tmp_path, capsys):
    from saeflow.features.tables import add_labels
    from saeflow.flow.compute import run_flow
    from saeflow.flow.graphs import trace

    model, _, _ = setup
    d = model.d_model
    pack = save_pack([(p, L, random_sae(d, 24, "relu", seed=10 + L + 2 * i))
                      for i, p in enumerate(("resid_post", "mlp_out")) for L in (0, 1)],
                     tmp_path / "pack", model_name="tiny", d_model=d, n_layers=3)
    root = tmp_path
    idx = build_index(pack, model, root / "run", CFG, progress=False)
    flow = run_flow(pack, root / "run")
    G = trace(flow, "1/resid_post/0", t_res=0.0, t_mod=0.0)
    assert add_labels(G, root / "run") == G.number_of_nodes() >= 3  # seed, R_0 and M_1 matches
    for n, d in G.nodes(data=True):
        L, p, f = n.split("/")
        assert d["label"] == idx.feature(int(L), p, int(f))["label"]
    # An index of another pack is not used: its feature numbers mean other features.
    other_pack = save_pack([("resid_post", 1, random_sae(model.d_model, 40, "relu", seed=7))],
                           tmp_path / "other", model_name="tiny", d_model=model.d_model,
                           n_layers=3)
    other = run_flow(other_pack, tmp_path / "r2")
    (tmp_path / "r2" / "index").symlink_to(root / "run" / "index")
    assert add_labels(trace(other, "1/resid_post/0"), tmp_path / "r2") == 0
    assert main(["trace", str(root / "run"), "1/resid_post/0", "--t-res", "0", "--t-mod", "0",
                 "--picture", "", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert all(n["label"] for n in data["nodes"])


def test_label_shows_whitespace_tokens():
    from saeflow.features.labels import auto_label

    strings = {5: " ", 6: "\n", 7: "river"}
    freq = np.ones(10)
    label, words = auto_label([5, 5, 6], [3.0, 2.0, 1.0], [7], strings, freq, 100)
    assert words == ["␣", "\\n"] and label.startswith("␣") and "river" in label
    assert auto_label([], [], [7], strings, freq, 100)[0].startswith("(never active)")


def test_quantiles_from_hist_match_each_features_cdf():
    """The vectorised quantiles equal, activation by activation, its own feature's CDF bin."""
    import numpy as np

    from saeflow.features.writer import HIST_EDGES, _quantiles_from_hist

    rng = np.random.default_rng(0)
    nb = len(HIST_EDGES) - 1
    hist = rng.integers(0, 50, size=(7, nb))
    hist[3] = 0  # a feature that never fired
    feats = rng.integers(0, 7, size=40)
    vals = rng.uniform(0, float(HIST_EDGES[-1]) * 1.5, size=40).astype(np.float32)
    got = _quantiles_from_hist(hist, feats, vals)
    edges = HIST_EDGES.numpy()
    for f, v, q in zip(feats, vals, got):
        cdf = np.cumsum(hist[f]) / max(hist[f].sum(), 1)
        b = min(max(int(np.searchsorted(edges, v)) - 1, 0), nb - 1)
        assert q == cdf[b]


def test_a_truncated_table_is_one_clear_error(setup, tmp_path, capsys):
    import shutil

    from saeflow.errors import UnreadableTableError

    model, pack, root = setup
    idx = build_index(pack, model, root / "run", CFG, progress=False)  # reused
    run = tmp_path / "copy"
    shutil.copytree(idx.root.parent, run)
    t = run / "index" / "features.parquet"
    t.write_bytes(t.read_bytes()[:100])
    broken = open_index(run)
    with pytest.raises(UnreadableTableError, match="rerun `saeflow index"):
        broken.feature(1, "resid_post", 0)
    with pytest.raises(UnreadableTableError):
        broken.search("the")
    assert main(["search", str(run), "the"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be read" in err[0]


def test_a_kill_while_publishing_leaves_no_index(setup, tmp_path, monkeypatch):
    """Old or new, never a mix: the manifest goes before the tables are replaced."""
    import os

    model, pack, _ = setup
    cfg = IndexConfig(**{**CFG.__dict__, "tokens": 600})
    build_index(pack, model, tmp_path, cfg, progress=False)
    real = os.replace
    calls = []

    def dying(a, b):
        calls.append(b)
        if str(b).endswith("examples.parquet"):
            raise KeyboardInterrupt("killed between two renames")
        return real(a, b)
    monkeypatch.setattr(os, "replace", dying)
    with pytest.raises(KeyboardInterrupt):
        build_index(pack, model, tmp_path, cfg, progress=False, force=True)
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(MissingResultError, match="run `saeflow index"):
        open_index(tmp_path)
    again = build_index(pack, model, tmp_path, cfg, progress=False)  # a rerun finishes it
    assert again.manifest["tokens"] > 0


def test_a_batch_too_big_for_memory_is_refused_up_front(setup, tmp_path):
    model, pack, _ = setup
    huge = IndexConfig(**{**CFG.__dict__, "ctx_len": 100_000, "batch_size": 1})
    with pytest.raises(FeatureIndexError, match="lower --batch-size or --ctx-len"):
        build_index(pack, model, tmp_path, huge, progress=False)
    assert not (tmp_path / "index").exists()


def test_new_settings_after_a_finished_index_rerun_without_force(setup, tmp_path):
    model, pack, _ = setup
    first = build_index(pack, model, tmp_path, IndexConfig(**{**CFG.__dict__, "tokens": 600}),
                        progress=False)
    assert not (tmp_path / "index" / ".state" / "state.pt").exists()  # spent once published
    more = build_index(pack, model, tmp_path, IndexConfig(**{**CFG.__dict__, "tokens": 900}),
                       progress=False)
    assert more.manifest["tokens"] > first.manifest["tokens"]


def test_open_index_tells_absent_from_corrupt(tmp_path):
    """No index yet: MissingResultError; a manifest that is there but unreadable or of another
    format: FeatureIndexError (never taken for absent)."""
    with pytest.raises(MissingResultError, match="run `saeflow index"):
        open_index(tmp_path)
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index.json").write_text('{"format": "saeflow-ind')
    with pytest.raises(FeatureIndexError, match="unreadable") as e:
        open_index(tmp_path)
    assert not isinstance(e.value, MissingResultError)
    (tmp_path / "index" / "index.json").write_text('{"format": "saeflow-stats"}')
    with pytest.raises(FeatureIndexError, match="not a saeflow index"):
        open_index(tmp_path)


def test_bulk_accessors_read_the_features_table(setup):
    """slot_column, firing_counts, active_ids and label_map give what the features table holds
    (the stages that read the index in bulk use them instead of SQL)."""
    from saeflow.ids import Slot

    model, pack, root = setup
    idx = build_index(pack, model, root / "run", CFG, progress=False)  # reused
    feats = pq.read_table(idx.root / "features.parquet").to_pandas()
    for (pos, L) in pack.entries:
        one = feats[(feats.position == pos) & (feats.layer == L)].sort_values("feature")
        assert idx.slot_column((pos, L), "max_act") == one.max_act.tolist()
        assert idx.slot_column(Slot(pos, L), "count") == one["count"].tolist()
    assert idx.slot_column(("resid_post", 0), "mean_act") == []
    with pytest.raises(FeatureIndexError, match="no column"):
        idx.slot_column(("resid_post", 1), "max_act FROM features; --")
    counts = idx.firing_counts()
    assert list(counts) == sorted(pack.entries) and all(isinstance(s, Slot) for s in counts)
    for slot, arr in counts.items():
        one = feats[(feats.position == slot.position) & (feats.layer == slot.layer)]
        assert arr.dtype == np.int64 and arr.tolist() == one.sort_values("feature")["count"].tolist()
    live = feats[feats["count"] > 0].sort_values(["density", "id"], ascending=[False, True])
    assert idx.active_ids() == live.id.tolist()
    assert idx.active_ids(limit=3) == live.id.tolist()[:3]
    sel = live[(live.layer == 1) & (live.position == "mlp_out")]
    assert idx.active_ids(layers=[1], positions=["mlp_out"]) == sel.id.tolist()
    assert idx.label_map() == dict(zip(feats.id, feats.label))




def test_slot_statistics_on_the_device_keep_each_features_best_with_its_window(test_device):
    """_SlotStats over batches with tied activations, on the test device: per feature the n
    largest activations (and n largest sample keys, the same draws as the CPU generator
    gives), each entry pointing at a token with that activation and its window; counts and
    histograms exact. One host sync for the nonzero codes and one per reservoir a batch."""
    from saeflow.features.index import _SlotStats
    from saeflow.lm.corpora import TokenBatch

    dev = torch.device(test_device)
    cfg = IndexConfig(n_top=4, n_samples=3, window_left=2, window_right=1)
    d, B, T, seed = 23, 3, 17, 5
    st, gen = _SlotStats(d, cfg, seed=seed, device=dev), torch.Generator().manual_seed(seed)
    g = torch.Generator().manual_seed(0)
    zs, keys, syncs = [], [], []
    for i in range(5):
        z = ((torch.rand(B, T, d, generator=g) < 0.2) * torch.rand(B, T, d, generator=g) * 4)
        z = z.ceil() / 2  # activations tie often
        ids = torch.randint(0, 50, (B, T), generator=g)
        tok = torch.arange(T).repeat(B, 1) - 1  # token 0 of each row is a BOS (not content)
        b = TokenBatch(ids, torch.ones_like(ids), torch.arange(B)[:, None] + B * i + 0 * ids, tok)
        content = tok >= 0
        zc = z * content[..., None]
        zs.append((zc.reshape(-1, d), b))
        keys.append(torch.rand(int((zc > 0).sum()), generator=gen))  # the sample keys drawn
        on_dev = TokenBatch(*(t.to(dev) for t in b.__dict__.values()))
        syncs.append(count_syncs(dev, lambda: st.update(z.to(dev), on_dev, content.to(dev), cfg)))
    assert all(n <= 3 for n in syncs), syncs
    Z = torch.cat([z for z, _ in zs])  # [N, d]
    ids = torch.cat([b.input_ids.reshape(-1) for _, b in zs])
    U = torch.zeros_like(Z)
    U[Z > 0] = torch.cat(keys)  # row-major, as the pass draws them
    s = st.state()
    assert torch.equal(s["count"], (Z > 0).sum(0)) and torch.equal(s["max"], Z.max(0).values)
    assert torch.equal(s["hist"].sum(1), s["count"])
    for res, source, n in ((s["top"], Z, 4), (s["sample"], U, 3)):
        for f in range(d):
            want = source[:, f][Z[:, f] > 0].sort(descending=True).values[:n]
            got = res["key"][f][res["key"][f] > float("-inf")]
            assert torch.equal(got, want), f
            for j in range(len(got)):  # the entry's token holds that activation, its window too
                row = int(res["doc"][f, j]) * T + int(res["tok"][f, j]) + 1
                assert res["value"][f, j] == Z[row, f]
                assert res["win_ids"][f, j, 2] == ids[row]
                assert res["win_act"][f, j, 2] == Z[row, f].half()
                first = int(res["tok"][f, j]) + 1 - 2  # the row position of window slot 0
                assert (res["win_ids"][f, j, 0] == -1) == (first < 0)




def _bits(state: dict) -> list:
    """Every tensor of a state, in order, floats as their bits (-0.0 is not 0.0 here)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return [t for v in state.values() for t in (_bits(v) if isinstance(v, dict) else [
        v.view(ints[v.element_size()]) if v.is_floating_point() else v])]


def test_grouped_statistics_equal_slot_by_slot(test_device):
    """The SAEs of one width as one group of S*d features give, SAE by SAE, the state of each
    SAE's own statistics (bit for bit on the CPU) over batches with tied and negative codes,
    rare features (reservoirs with empty entries), an SAE silent in a batch, a shard merge
    and a reload from per-SAE states. A group's batch: at most 4 host syncs on a GPU."""
    from saeflow.features.index import _GroupStats, _SlotStats
    from saeflow.lm.corpora import TokenBatch

    dev = torch.device(test_device)
    cfg = IndexConfig(n_top=4, n_samples=3, window_left=2, window_right=1)
    S, d, B, T, seeds = 4, 23, 3, 17, [7, 3, 11, 5]
    g, rare = torch.Generator().manual_seed(1), torch.arange(d) % 3 == 0

    def shard(batches):
        group = _GroupStats(d, cfg, seeds, device=dev)
        own = [_SlotStats(d, cfg, seed=s, device=dev) for s in seeds]
        for i in range(batches):
            z = (torch.rand(S, B, T, d, generator=g) < torch.where(rare, 0.01, 0.3)) * torch.rand(
                S, B, T, d, generator=g)
            z = (z * 4).ceil() / 2 * torch.where(torch.rand(S, 1, 1, d, generator=g) < 0.1, -1, 1)
            z[i % S] *= i % 3 != 1  # now and then an SAE without a single active feature
            ids = torch.randint(0, 50, (B, T), generator=g)
            tok = torch.arange(T).repeat(B, 1) - 1 - (torch.arange(B) == 2)[:, None] * 3
            b = TokenBatch(*(t.to(dev) for t in (ids, torch.ones_like(ids),
                                                 torch.arange(B)[:, None] + B * i + 0 * ids, tok)))
            content, zs = (tok >= 0).to(dev), list(z.to(dev).unbind(0))
            n = count_syncs(dev, lambda: group.update_group(zs, b, content, cfg))
            assert n <= (4 if dev.type == "cuda" else 3), n
            for st, zj in zip(own, zs):
                st.update(zj, b, content, cfg)
        return group, own

    (group, own), (later, later_own) = shard(5), shard(3)
    group.merge(later)
    for st, other in zip(own, later_own):
        st.merge(other)
    reloaded = _GroupStats(d, cfg, [0] * S, device=dev)
    reloaded.load_slots([group.slot(j).state() for j in range(S)])
    for j, st in enumerate(own):
        want = st.state()
        for got in (group.slot(j).state(), reloaded.slot(j).state()):
            assert list(got) == list(want) and list(got["top"]) == list(want["top"])
            assert torch.equal(got["gen"], want["gen"]) and want["count"].sum() > 0
            if dev.type == "cpu":
                assert all(torch.equal(x, y) for x, y in zip(_bits(got), _bits(want))), j
            else:  # a GPU's ties may pick other entries; its float sums round otherwise
                assert all(torch.equal(got[k], want[k]) for k in ("count", "hist", "max"))
                assert torch.equal(got["top"]["key"], want["top"]["key"])


def test_grouped_pass_writes_the_same_tables(setup, tmp_path, monkeypatch):
    """Grouped by width (as on a GPU; here forced on the CPU), the pass writes byte for byte
    the tables of the pass SAE by SAE, resumes a checkpoint of the other layout to the same
    tables, and merges shards of both layouts."""
    import saeflow.features.index as index
    from saeflow.features.index import IndexTargets, _IndexShard, _slot_groups

    model, d = setup[0], setup[0].d_model
    pack = save_pack([(p, L, random_sae(d, w, "topk" if L else "relu", k=3, seed=20 + L + 3 * i))
                      for i, (p, w) in enumerate((("resid_post", 40), ("mlp_out", 30)))
                      for L in (0, 1, 2)], tmp_path / "pack", model_name="tiny", d_model=d,
                     n_layers=3)
    cfg = IndexConfig(**{**CFG.__dict__, "tokens": 700})

    def tables(name, **kw):
        run = build_index(pack, model, tmp_path / name, cfg, progress=False, **kw).root
        return [(run / f"{n}.parquet").read_bytes() for n in ("features", "examples", "tokens")]

    alone = tables("alone")
    with pytest.raises(KeyboardInterrupt):  # a checkpoint SAE by SAE
        tables("both", stop_after_batches=2)
    monkeypatch.setattr(index, "_STACK_BYTES_CPU", 1 << 30)
    assert tables("grouped") == alone and tables("both") == alone  # "both": resumed grouped
    slots = sorted(pack.entries)
    targets = IndexTargets(slots, {s: pack.entries[s].d_sae for s in slots}, cfg, 10)
    assert sorted(map(len, _slot_groups(targets, "cpu"))) == [3, 3]
    monkeypatch.setattr(index, "_STACK_BYTES_CPU", 2 * 40 * cfg.batch_size * cfg.ctx_len * 4)
    assert sorted(map(len, _slot_groups(targets, "cpu"))) == [1, 1, 2, 2]  # 2 at most
    a, b = _IndexShard(targets, 0, "cpu"), _IndexShard(targets, 1, "cpu")
    monkeypatch.setattr(index, "_STACK_BYTES_CPU", 0)
    for shard in (b, c := _IndexShard(targets, 1, "cpu")):
        for slot, st in shard.stats.items():
            st.count += 1 + slots.index(slot)
    a.merge(b)
    a.merge(c)  # another layout: merged SAE by SAE all the same
    assert [int(v["count"][0]) for v in a.state()["stats"].values()] == [
        2 * (1 + i) for i in range(len(slots))]

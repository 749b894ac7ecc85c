"""ΔCE / KL intervals by document (a cluster bootstrap over the held-out documents), and the
trainer's per-dimension standardisation scale recorded in each saved SAE's cfg.json."""
import json
import math

import numpy as np
import pytest
import torch
from fixtures import TEXTS, random_weights, reference_splice_logprobs, write_saelens

from saeflow import HookPoint, convert_pack, load_pack
from saeflow.errors import ConfigError
from saeflow.lm.corpora import Corpus
from saeflow.saes.evaluate import (
    BOOTSTRAP_SAMPLES,
    bootstrap_ratio_ci,
    cluster_ratio_ci,
    cluster_sums,
    evaluate_pack,
)
from saeflow.saes.train import TrainConfig, train_family


# --- (a) the interval resamples documents ------------------------------------------------------
def test_document_bootstrap_is_wider_than_the_row_one_and_covers_each_document():
    """Two documents with very different per-token losses (~0.1 and ~0.9 nats), packed into
    rows of 50 tokens as Corpus.token_batches packs them: document 7 spans rows 0-50, row 50
    also holds the start of document 42. Resampling rows treats the 100 rows as independent and
    gives a narrow interval around the pooled mean that covers neither document; resampling
    documents covers both documents' means."""
    g = np.random.default_rng(0)
    doc = np.repeat([7, 42], [2525, 2475])  # [5000] the document of each scored token
    row = np.arange(5000) // 50  # [5000] its row
    loss = np.where(doc == 7, g.normal(0.1, 0.05, 5000), g.normal(0.9, 0.05, 5000))
    ones = np.ones(5000)
    keys, n, s = cluster_sums(doc, ones, loss)
    assert keys.tolist() == [7, 42] and n.tolist() == [2525, 2475]
    means = s / n  # per-document mean loss
    lo_r, hi_r = cluster_ratio_ci(row, loss, ones)
    lo_d, hi_d = cluster_ratio_ci(doc, loss, ones)
    pooled = loss.mean()
    assert lo_r < pooled < hi_r and lo_d < pooled < hi_d
    assert hi_d - lo_d > 5 * (hi_r - lo_r)
    eps = 1e-9  # an all-one-document resample is that document's mean, up to rounding
    assert lo_d <= means.min() + eps and hi_d >= means.max() - eps
    assert means.min() < lo_r and hi_r < means.max()  # the row interval covers neither
    # the same numbers summed per piece (document x row) first: the same clusters
    pieces = doc * 1000 + row
    _, pn, ps = cluster_sums(pieces, ones, loss)
    pdoc = cluster_sums(pieces, doc)[1] / pn  # each piece's document
    assert cluster_ratio_ci(pdoc, ps, pn) == pytest.approx((lo_d, hi_d), rel=1e-12)
    assert bootstrap_ratio_ci(s, n) == pytest.approx((lo_d, hi_d), rel=1e-12)


def _short_docs(path, n=600):
    """A .jsonl corpus of short documents (a few tens of tokens each): rows of 32 tokens hold
    several of them, and some span two rows."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{TEXTS[i % 5]} Item {i}, part {i % 7}."}) + "\n")
    return str(path)


def test_eval_intervals_bootstrap_held_out_documents(tiny_models, tmp_path):
    """evaluate_pack's ΔCE / KL intervals equal a cluster bootstrap over the documents of the
    scored tokens, recomputed here by hand (float64); eval fields say how many documents and
    tokens, and how; the point estimates do not depend on what the interval resamples."""
    m = tiny_models["qwen2"]
    write_saelens(tmp_path / "s" / "a", random_weights(d_in=32, d_sae=48, seed=1), "relu",
                  hook="blocks.1.hook_resid_post")
    pack = load_pack(tmp_path / "s")
    corpus_spec = _short_docs(tmp_path / "docs.jsonl")
    kw = dict(tokens=200, ce_tokens=300, corpus=corpus_spec, batch=4, ctx_len=32,
              progress=False, dead_tokens=0)
    ev = evaluate_pack(pack, m, **kw)
    row = ev["saes"][0]
    assert ev["ce_ci_method"] == f"bootstrap by document, {BOOTSTRAP_SAMPLES} resamples"

    corpus = Corpus.from_spec(corpus_spec, seed=0)
    p = HookPoint("resid_post", 1)
    sae = pack.sae("resid_post", 1, device=m.device)
    docs, rows, d_ce, d_kl = [], [], [], []
    n_rows = 0
    for b in corpus.token_batches(m.tokenizer, 4, 32, split="heldout"):
        lc, ls, tgt = reference_splice_logprobs(m, b, p, sae)
        d_ce.append((lc - ls).gather(1, tgt[:, None])[:, 0].cpu().numpy())
        d_kl.append((lc.exp() * (lc - ls)).sum(1).cpu().numpy())
        docs.append(b.doc_ids[:, 1:][b.content_mask()[:, 1:]].numpy())
        rows.append(n_rows + torch.nonzero(b.content_mask()[:, 1:])[:, 0].numpy())
        n_rows += len(b.input_ids)
        if sum(map(len, d_ce)) >= kw["ce_tokens"]:
            break
    doc, rw = np.concatenate(docs), np.concatenate(rows)
    dce, dkl, ones = np.concatenate(d_ce), np.concatenate(d_kl), np.ones(len(doc))
    assert (doc >= 0).all()
    # the packing this is about: documents span rows, and rows hold several documents
    pairs = set(zip(doc.tolist(), rw.tolist()))
    assert len(pairs) > len(set(doc.tolist())) and len(pairs) > len(set(rw.tolist()))
    assert ev["ce_tokens"] == len(doc) and ev["ce_documents"] == len(set(doc.tolist())) >= 5
    assert ev["ce_rows"] == len(set(rw.tolist()))
    assert row["delta_ce"] == pytest.approx(dce.mean(), rel=1e-3, abs=1e-5)
    want_ce = cluster_ratio_ci(doc, dce, ones)
    want_kl = cluster_ratio_ci(doc, dkl, ones)
    assert row["delta_ce_ci"] == pytest.approx(want_ce, rel=1e-3, abs=1e-5)
    assert row["kl_ci"] == pytest.approx(want_kl, rel=1e-3, abs=1e-6)
    lo, hi = row["delta_ce_ci"]
    assert lo <= row["delta_ce"] <= hi and row["kl_ci"][0] <= row["kl"] <= row["kl_ci"][1]
    # by row: same tokens and point estimates, another interval
    ev_r = evaluate_pack(pack, m, **kw, ci_by="row")
    row_r = ev_r["saes"][0]
    assert ev_r["ce_ci_method"] == f"bootstrap by row, {BOOTSTRAP_SAMPLES} resamples"
    for key in ("delta_ce", "kl", "fvu", "l0"):
        assert row_r[key] == row[key]
    assert ev_r["clean_ce"] == ev["clean_ce"] and ev_r["ce_tokens"] == ev["ce_tokens"]
    assert row_r["delta_ce_ci"] == pytest.approx(cluster_ratio_ci(rw, dce, ones), rel=1e-3,
                                                 abs=1e-5)
    assert row_r["delta_ce_ci"] != row["delta_ce_ci"]
    with pytest.raises(ConfigError, match="ci_by"):
        evaluate_pack(pack, m, **kw, ci_by="token")


# --- (b) the standardisation scale in cfg.json ------------------------------------------------------
@pytest.mark.parametrize("engine", ["sparse", "stacked"])
def test_trained_sae_cfg_records_the_dim_scale_the_trainer_used(tiny_models, tmp_path,
                                                                monkeypatch, engine):
    """Each saved cfg.json carries, under metadata.saeflow, the per-dimension scale the trainer
    multiplied its inputs by (bit for bit as float32), the cap, and a note that it is folded
    already; loading ignores it (the weights are the file's), and it survives a conversion."""
    from safetensors.torch import load_file

    try:  # saes/train/ as a package: the recipe computes the scale
        import saeflow.saes.train.recipe as tr
        name = "dim_scale"
    except ImportError:
        import saeflow.saes.train as tr  # type: ignore[no-redef]
        name = "_dim_scale"

    used: list[torch.Tensor] = []
    real = getattr(tr, name)

    def spy(x, cap=0.0):
        v = real(x, cap)
        used.append(v.detach().float().cpu().clone())
        return v
    monkeypatch.setattr(tr, name, spy)
    m = tiny_models["gemma3"]
    cfg = TrainConfig(positions=["resid_post", "mlp_out"], layers=[0], width=64, k=4,
                      tokens=2048, batch_size=128, ctx_len=32, model_batch=8, chunk_tokens=1024,
                      corpus="wiki", model_dtype="float32", encoder_dtype="float32",
                      checkpoint_every_s=1e9, engine=engine)
    pack = train_family(m, cfg, tmp_path / "p", progress=False).pack
    slots = [("resid_post", 0), ("mlp_out", 0)]  # the order the trainers are made in
    assert len(used) == len(slots)
    for (pos, L), v in zip(slots, used):
        folder = tmp_path / "p" / pos / f"layer_{L}"
        sf = json.loads((folder / "cfg.json").read_text())["metadata"]["saeflow"]
        assert len(sf["dim_scale"]) == m.d_model
        assert torch.equal(torch.tensor(sf["dim_scale"], dtype=torch.float32), v)
        assert sf["input_norm"] == "dim (folded)" and sf["dim_cap"] == 10.0
        assert "folded" in sf["dim_scale_note"] and "do not apply" in sf["dim_scale_note"]
        assert all(math.isfinite(s) and s > 0 for s in sf["dim_scale"])
        # loading ignores it: the SAE is the file's weights, with no input scale
        sae = pack.sae(pos, L)
        assert sae.input_scale == 1.0
        for name, t in load_file(str(folder / "sae_weights.safetensors")).items():
            assert torch.equal(sae.tensors()[name], t), name
        assert sae.metadata["dim_scale"] == sf["dim_scale"]
    # a conversion (and saeflow.scale's merge of group packs) keeps the record
    convert_pack(pack, tmp_path / "c")
    for pos, L in slots:
        a, b = (json.loads((tmp_path / d / pos / f"layer_{L}" / "cfg.json").read_text())
                ["metadata"]["saeflow"] for d in ("p", "c"))
        assert b["dim_scale"] == a["dim_scale"] and b["dim_scale_note"] == a["dim_scale_note"]

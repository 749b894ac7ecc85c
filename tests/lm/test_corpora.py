"""Corpora: determinism, held-out split, provenance of every token, local file formats."""
import json

import pytest
import torch
from fixtures import make_tokenizer

from saeflow.lm.corpora import Corpus, LocalFiles, PythonStdlib, WikiSummaries


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _batches(corpus, tok, **kw):
    return list(corpus.token_batches(tok, batch_size=4, ctx_len=32, max_tokens=2000, **kw))


def test_default_mix_is_deterministic(tok):
    a = _batches(Corpus.from_spec(seed=3), tok)
    b = _batches(Corpus.from_spec(seed=3), tok)
    c = _batches(Corpus.from_spec(seed=4), tok)
    assert len(a) == len(b) > 0
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.doc_ids, y.doc_ids)
               for x, y in zip(a, b))
    assert not all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c))
    assert sum(x.n_tokens for x in a) >= 2000


def test_mix_weights_are_text_shares():
    corpus = Corpus.from_spec("wiki=0.8,python=0.2", seed=0)
    chars = {"wiki": 0, "python": 0}
    for i, d in enumerate(corpus.documents()):
        chars[d.source] += len(d.text)
        if i > 3000:
            break
    share = chars["python"] / sum(chars.values())
    assert 0.15 < share < 0.25


def test_heldout_is_disjoint_and_small():
    corpus = Corpus.from_spec("wiki", seed=0)
    train = {d.key for d in corpus.documents("train")}
    held = {d.key for d in corpus.documents("heldout")}
    assert train.isdisjoint(held)
    assert 0.03 < len(held) / (len(train) + len(held)) < 0.07


def test_every_token_maps_back_to_its_document(tok):
    corpus = Corpus.from_spec(seed=0)
    batch = next(corpus.token_batches(tok, batch_size=4, ctx_len=64))
    assert batch.input_ids.shape == (4, 64)
    assert (batch.input_ids[:, 0] == tok.bos_token_id).all()  # rows start with BOS
    for r in range(4):
        for t in range(64):
            d, i = int(batch.doc_ids[r, t]), int(batch.token_index[r, t])
            if i < 0:
                continue
            doc = corpus.document(d)
            doc_tokens = tok(doc.text, add_special_tokens=False)["input_ids"]
            assert doc_tokens[i] == int(batch.input_ids[r, t])


def test_wiki_topics_kept():
    docs = WikiSummaries()
    key, text, meta = docs.get(0)
    assert len(docs) > 10000 and text and meta["topic"]


def test_python_stdlib_source():
    src = PythonStdlib()
    assert len(src) > 500
    key, text, meta = src.get(0)
    assert key.split("#")[0].endswith(".py") and len(text) <= 4000 + 200


def test_local_files(tmp_path, tok):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"record {i} " * 10, "label": i}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row one", "parquet row two"]}), tmp_path / "c.parquet")
    src = LocalFiles(tmp_path)
    assert len(src) == 1 + 3 + 2
    assert src.get(1)[2] == {"label": 0}
    corpus = Corpus([(src, 1.0)], holdout_fraction=0.0)
    batches = list(corpus.token_batches(tok, batch_size=2, ctx_len=16))
    assert sum(b.n_tokens for b in batches) > 0
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        len(LocalFiles(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        LocalFiles(tmp_path / "missing.txt")


def test_no_bos_tokenizer_separates_with_eos():
    tok = make_tokenizer(add_bos=False)
    corpus = Corpus.from_spec("wiki", seed=0)
    batch = next(corpus.token_batches(tok, batch_size=2, ctx_len=256))
    assert (batch.input_ids[:, 0] != tok.bos_token_id).all()
    seps = (batch.token_index < 0) & (batch.attention_mask > 0)
    assert (batch.input_ids[seps] == tok.eos_token_id).all()


def test_hf_source_without_datasets_is_clear():
    corpus = Corpus.from_spec("hf:someone/some-dataset")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="datasets"):
            next(corpus.documents())

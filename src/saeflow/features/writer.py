"""Writing the feature index tables (RUN/index/, described in features/tables.py) from the
running statistics of the index pass."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from saeflow.features.labels import auto_label, token_strings
from saeflow.features.tables import INDEX_FORMAT, INDEX_MANIFEST
from saeflow.ids import Slot
from saeflow.store import atomic_path, write_json_atomic

# Log-spaced histogram edges for nonzero activations: 1e-3 .. 1e4, 56 bins (ends clamp).
HIST_EDGES = torch.logspace(-3, 4, 57)

NEURONPEDIA = "https://www.neuronpedia.org"
TABLES = ("features", "examples", "tokens")  # published in this order, the manifest after them


def neuronpedia_url(np_id: str | None, feature: int) -> str | None:
    """'gemma-2-2b/12-gemmascope-res-16k' + feature -> the feature's Neuronpedia page."""
    return f"{NEURONPEDIA}/{np_id}/{feature}" if np_id else None


def _quantiles_from_hist(hist: np.ndarray, features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Where each activation values[i] falls in the distribution of its feature features[i]
    (the CDF from that feature's row of hist [d, bins]), for all of them at once."""
    edges = HIST_EDGES.numpy()
    cdf = np.cumsum(hist, axis=1) / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    b = np.clip(np.searchsorted(edges, values) - 1, 0, hist.shape[1] - 1)
    return cdf[features, b]


def write_index(root: Path, pack, model, saes: dict, stats: dict, unigram: torch.Tensor, cfg,
                ident: dict, tokens: int, seconds: float, progress: bool = True) -> None:
    """features/examples/tokens.parquet and index.json in `root` from the pass's statistics
    (`stats` {slot: _SlotStats}) and the corpus unigram counts [vocab]."""
    from tqdm.auto import tqdm

    root.mkdir(parents=True, exist_ok=True)
    freq = unigram.numpy()
    slots = [Slot.of(s) for s in saes]
    strings = token_strings(model.tokenizer, _window_token_ids(stats, slots))
    with contextlib.ExitStack() as publish:
        # Old or new, never a mix: each table is written beside its final name, the manifest
        # is removed, then the tables replace the old ones in TABLES order (the ExitStack
        # leaves in reverse order of entry) and the new manifest comes last; a kill in between
        # leaves no index (a rerun resumes from .state).
        paths = {name: publish.enter_context(atomic_path(root / f"{name}.parquet"))
                 for name in reversed(TABLES)}
        writers: dict[str, pq.ParquetWriter] = {}
        try:
            for slot in tqdm(slots, desc="index: tables", disable=not progress, unit="sae"):
                st = stats[slot]
                np_id = pack.entries[slot].extra.get("neuronpedia_id")
                _append(writers, paths["features"], "features",
                        _features_table(slot, st, np_id, cfg.window_left, strings, freq, tokens))
                for kind, res in (("top", st.top), ("sample", st.sample)):
                    _append(writers, paths["examples"], "examples",
                            _examples_table(slot, kind, res, st.hist.numpy(), cfg.window_left))
            _append(writers, paths["tokens"], "tokens", _tokens_table(strings, freq))
        finally:
            for w in writers.values():
                w.close()
        (root / INDEX_MANIFEST).unlink(missing_ok=True)
    write_json_atomic(root / INDEX_MANIFEST, {
        "format": INDEX_FORMAT, "identity": ident, "tokens": tokens, "seconds": round(seconds, 1),
        "slots": {str(s): saes[s].d_sae for s in slots},
        "hist_edges": HIST_EDGES.tolist(), "window": [cfg.window_left, cfg.window_right],
        "n_logits": cfg.n_logits, "model_source": model.source,
        "pack_root": str(pack.root), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _window_token_ids(stats: dict, slots: list[Slot]) -> set[int]:
    """Every token id in the kept windows (the token strings the tables need)."""
    needed: set[int] = set()
    for slot in slots:
        for res in (stats[slot].top, stats[slot].sample):
            needed.update(np.unique(res.win_ids.numpy()).tolist())
    return needed


def _features_table(slot: Slot, st, np_id: str | None, center: int, strings: dict,
                    freq: np.ndarray, tokens: int) -> pa.Table:
    """One row per feature of the SAE at `slot`: counts, activation summary, histogram and the
    automatic label from its top activating tokens (the logit lens is not computed here)."""
    d = st.count.shape[0]
    count = st.count.numpy()
    tv, tk = st.top.value.numpy(), st.top.key.numpy()  # [d, n_top]
    centers = st.top.win_ids[:, :, center].numpy()  # [d, n_top] the activating tokens
    labels, chars = [], []
    for f in range(d):
        ok = np.isfinite(tk[f])
        label, words = auto_label(centers[f][ok].tolist(), tv[f][ok].tolist(), [], strings, freq,
                                  tokens)
        labels.append(label)
        chars.append(words)
    return pa.table({
        "layer": pa.array(np.full(d, slot.layer, np.int16)),
        "position": pa.array([slot.position] * d),
        "feature": pa.array(np.arange(d, dtype=np.int32)),
        "id": pa.array([slot.feature(f) for f in range(d)]),
        "count": pa.array(count),
        "density": pa.array(count / max(tokens, 1)),
        "mean_act": pa.array((st.total.numpy() / np.maximum(count, 1)).astype(np.float32)),
        "max_act": pa.array(st.max.numpy()),
        "hist": pa.array(list(st.hist.numpy().astype(np.int32)), type=pa.list_(pa.int32())),
        "label": pa.array(labels),
        "top_tokens": pa.array(chars, type=pa.list_(pa.string())),
        "neuronpedia": pa.array([neuronpedia_url(np_id, f) for f in range(d)], type=pa.string()),
    })


def _examples_table(slot: Slot, kind: str, res, hist: np.ndarray, center: int) -> pa.Table:
    """One row per kept example of `kind` ('top' or 'sample', from reservoir `res`) of every
    feature of the SAE at `slot`, with its token window; hist [d, bins] gives the quantiles."""
    key = res.key.numpy()
    f_idx, rank = np.nonzero(np.isfinite(key))
    if kind == "sample":  # report samples in order of activation
        val = res.value.numpy()
        order = np.lexsort((-val[f_idx, rank], f_idx))
        f_idx, rank = f_idx[order], rank[order]
    val = res.value.numpy()[f_idx, rank]
    n = len(f_idx)
    q = _quantiles_from_hist(hist, f_idx, val).astype(np.float32)
    W = res.win_ids.shape[2]
    return pa.table({
        "layer": pa.array(np.full(n, slot.layer, np.int16)),
        "position": pa.array([slot.position] * n),
        "feature": pa.array(f_idx.astype(np.int32)),
        "kind": pa.array([kind] * n),
        "rank": pa.array(_ranks(f_idx).astype(np.int16)),
        "activation": pa.array(val.astype(np.float32)),
        "quantile": pa.array(q),
        "doc_id": pa.array(res.doc.numpy()[f_idx, rank]),
        "token_index": pa.array(res.tok.numpy()[f_idx, rank]),
        "center": pa.array(np.full(n, center, np.int16)),
        "token_ids": pa.FixedSizeListArray.from_arrays(
            pa.array(res.win_ids.numpy()[f_idx, rank].ravel()), W),
        "acts": pa.FixedSizeListArray.from_arrays(
            pa.array(res.win_act.numpy()[f_idx, rank].astype(np.float32).ravel()), W),
    })


def _tokens_table(strings: dict[int, str], freq: np.ndarray) -> pa.Table:
    ids = sorted(strings)
    return pa.table({
        "id": pa.array(ids, pa.int32()), "text": pa.array([strings[i] for i in ids]),
        "corpus_count": pa.array(freq[ids] if ids else np.zeros(0, np.int64))})


def _ranks(f_idx: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal feature ids."""
    if len(f_idx) == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(f_idx)) + 1]
    lengths = np.diff(np.r_[starts, len(f_idx)])
    return np.arange(len(f_idx)) - np.repeat(starts, lengths)


def _append(writers: dict, path: Path, name: str, table: pa.Table) -> None:
    if name not in writers:
        writers[name] = pq.ParquetWriter(path, table.schema, compression="zstd")
    writers[name].write_table(table)

"""Typical activations, the unit of additive strengths: each feature's mean activation where
it is active, read from a RUN's feature index or measured once on corpus tokens and cached by
pack content."""
from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch

from saeflow.errors import MissingResultError, PlanError
from saeflow.features.tables import open_index
from saeflow.ids import Slot
from saeflow.lm.corpora import DEFAULT_SPEC, Corpus
from saeflow.lm.hooks import capture
from saeflow.saes.packs import pack_fingerprint
from saeflow.store import cache_dir, save_npz_atomic


def typical_activations(pack, slots: Iterable[tuple[str, int]],
                        run: str | os.PathLike | None = None, model=None,
                        tokens: int = 4096) -> dict[Slot, torch.Tensor]:
    """{slot: [d_sae]} each feature's mean activation where active.

    From the feature index in `run` when it has these slots; else measured once on `tokens`
    corpus tokens with `model` and cached by pack content. Features never seen active get the
    median of the others (a unit is needed even for them)."""

    wanted = sorted({Slot.of(s) for s in slots})
    out = _typical_from_index(run, wanted) if run is not None else {}
    todo = [s for s in wanted if s not in out]
    if not todo:
        return out
    key = pack_fingerprint(pack)
    cached = cache_dir("typical") / f"{key}-{tokens}.npz"
    have = dict(np.load(cached)) if cached.is_file() else {}  # {"L/position": [d_sae]}
    missing = [s for s in todo if str(s) not in have]
    if missing:
        if model is None:
            raise PlanError("additive steering needs each feature's typical activation: give a "
                            "RUN with a feature index, or a model to measure it")
        have.update(_measure_typical(pack, model, missing, tokens))
        save_npz_atomic(cached, have)
    for s in todo:
        out[s] = torch.from_numpy(np.asarray(have[str(s)], np.float32))
    return out


def _fill_unseen(mean: np.ndarray) -> np.ndarray:
    seen = mean > 0
    return np.where(seen, mean, np.median(mean[seen]) if seen.any() else 1.0).astype(np.float32)


def _typical_from_index(run, slots: list[Slot]) -> dict[Slot, torch.Tensor]:
    try:
        idx = open_index(run)
    except MissingResultError:
        return {}
    out = {}
    for slot in slots:
        mean_act = idx.slot_column(slot, "mean_act")  # [] when the index has no SAE there
        if mean_act:
            out[slot] = torch.from_numpy(_fill_unseen(np.array([v or 0 for v in mean_act])))
    return out


def _measure_typical(pack, model, slots: list[Slot], tokens: int) -> dict[str, np.ndarray]:
    """{"L/position": [d_sae]} measured on `tokens` tokens of the default corpus."""
    saes = {s: pack.sae(*s, device=model.device) for s in slots}
    sums = {s: torch.zeros(saes[s].d_sae, dtype=torch.float64) for s in slots}
    counts = {s: torch.zeros(saes[s].d_sae, dtype=torch.float64) for s in slots}
    corpus = Corpus.from_spec(DEFAULT_SPEC, seed=1)
    for b in corpus.token_batches(model.tokenizer, 16, 128, max_tokens=tokens):
        acts = capture(model, b.input_ids, slots, attention_mask=b.attention_mask)
        content = b.content_mask()
        with torch.inference_mode():
            for s in slots:
                z = saes[s].encode(acts[s]).float().cpu()[content]  # [T, d_sae]
                sums[s] += z.sum(0).double()
                counts[s] += (z > 0).sum(0).double()
    return {str(s): _fill_unseen((sums[s] / counts[s].clamp_min(1)).numpy()) for s in slots}

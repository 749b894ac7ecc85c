"""The logit lens of a feature, computed when it is asked for.

Every feature's lens at index time would cost a pass of every decoder direction through the
whole unembedding, although a feature page reads one row (one direction: a few ms). So a
feature's lens is computed on its first request and kept in a bounded cache; exports ask for a
whole SAE at once (one tiled pass, `labels.logit_lens`).

Search by a logit token still finds features without any precomputed lens: a token's logit in
every feature's direction is one matrix-vector product, and its z-score within the feature's
logit distribution over the whole vocabulary needs only the unembedding's mean and covariance
(computed once). The best-scoring candidates are then checked exactly: a hit is a feature whose
top-n logit tokens hold the token (docs/method.md).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch

from saeflow.features.labels import logit_lens, token_strings, unembed_directions
from saeflow.ids import Slot
from saeflow.lm.model import residual_mapping

CANDIDATES = 64  # features per query token whose lens is checked exactly


class _Candidate(NamedTuple):
    """A feature whose lens may hold the query token, by its approximate z-score."""

    z: float
    slot: Slot
    feature: int
    token_id: int


class LogitLens:
    """Top and bottom logit tokens of any feature of `pack`, on demand, cached per feature (at
    most `max_features`) and per SAE decoder (at most `max_slots` in memory)."""

    def __init__(self, pack, model, n: int = 10, max_features: int = 4096, max_slots: int = 8):
        self.pack, self.model, self.n = pack, model, n
        self.max_features, self.max_slots = max_features, max_slots
        self._rows: OrderedDict = OrderedDict()  # (slot, feature) -> {"logit_top", ...}
        self._dirs: OrderedDict = OrderedDict()  # slot -> residual directions [d_sae, d_model]
        self._moments: tuple[torch.Tensor, torch.Tensor] | None = None

    def directions(self, slot: Slot) -> torch.Tensor:
        """[d_sae, d_model] float32 decoder directions in the residual basis."""
        if slot in self._dirs:
            self._dirs.move_to_end(slot)
            return self._dirs[slot]
        W = self.pack.sae(*slot).W_dec.detach().float().cpu()  # [d_sae, d_in]
        mapping = residual_mapping(self.model, *slot)  # attn_z, or a raw site under a post-norm
        dirs = W if mapping is None else W @ mapping.float().cpu()
        self._dirs[slot] = dirs
        while len(self._dirs) > self.max_slots:
            self._dirs.popitem(last=False)
        return dirs

    def feature(self, slot: Slot, feature: int) -> dict:
        """{"logit_top": [{"token", "id", "logit"}] * n, "logit_bottom": [...]}."""
        key = (slot, int(feature))
        if key not in self._rows:
            d = self.directions(slot)
            if not 0 <= feature < d.shape[0]:
                raise IndexError(f"feature {feature} is out of range for {slot}")
            self._rows[key] = self._rows_of(d[feature:feature + 1])[0]
            while len(self._rows) > self.max_features:
                self._rows.popitem(last=False)
        self._rows.move_to_end(key)
        return self._rows[key]

    def slot(self, slot: Slot) -> list[dict]:
        """feature() for every feature of one SAE (one tiled pass over the vocabulary)."""
        return self._rows_of(self.directions(slot))

    def _rows_of(self, dirs: torch.Tensor) -> list[dict]:
        top_i, top_v, bot_i, bot_v = logit_lens(self.model, dirs, n=self.n)
        strings = token_strings(self.model.tokenizer, torch.cat([top_i, bot_i]).flatten().tolist())

        def entries(ids, vals):
            return [{"token": strings.get(int(i), ""), "id": int(i), "logit": float(v)}
                    for i, v in zip(ids, vals)]
        return [{"logit_top": entries(ti, tv), "logit_bottom": entries(bi, bv)}
                for ti, tv, bi, bv in zip(top_i, top_v, bot_i, bot_v)]

    # --- search by a logit token ------------------------------------------------------------
    def _vocab_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [d_model] and covariance [d_model, d_model] of the unembedding's rows as seen
        by a direction (final-norm gain applied): a direction's logits over the vocabulary
        then have mean dir . mu and variance dir^T C dir."""
        if self._moments is None:
            W_U = self._unembedding()  # [V, d]
            M = self._norm_map()  # [d, d]: direction (row) -> what meets W_U
            mu = W_U.mean(0)  # [d]
            C = torch.cov(W_U.T)  # [d, d]
            self._moments = (M @ mu, M @ C @ M.T)
        return self._moments

    def _unembedding(self) -> torch.Tensor:
        return self.model.hf.get_output_embeddings().weight.detach().float().cpu()

    def _norm_map(self) -> torch.Tensor:
        """[d, d] M with normed(dir) = dir @ M: the final norm's gain (and LayerNorm's
        centring) as `unembed_directions` applies them, read off the basis vectors."""
        d = self.model.d_model
        return unembed_directions(self.model, torch.eye(d), torch.eye(d)).cpu()

    def _vocab_text(self) -> list[str]:
        if not hasattr(self, "_vocab"):
            tok = self.model.tokenizer
            self._vocab = tok.batch_decode([[i] for i in range(len(tok))])
        return self._vocab

    def token_ids(self, query: str) -> list[int]:
        """Vocabulary ids whose text, stripped and lower-cased, is `query`."""
        q = query.strip().lower()
        vocab_size = self.model.hf.get_output_embeddings().weight.shape[0]
        return [i for i, t in enumerate(self._vocab_text()[:vocab_size])
                if t.strip().lower() == q]

    def search(self, query: str, slots: list[Slot], limit: int = CANDIDATES) -> list[dict]:
        """Features whose top-n logit tokens hold a token spelled `query`:
        [{"slot", "feature", "token", "rank", "logit"}], best z-score first."""
        ids = self.token_ids(query)
        if not ids:
            return []
        mu, C = self._vocab_moments()
        target = self._norm_map() @ self._unembedding()[ids].T  # [d, q]
        cand = []
        for slot in slots:
            dirs = self.directions(slot)  # [F, d]
            logits = dirs @ target  # [F, q]
            mean = dirs @ mu  # [F]
            std = ((dirs @ C) * dirs).sum(1).clamp_min(1e-12).sqrt()  # [F]
            z = (logits - mean[:, None]) / std[:, None]  # [F, q]
            best, which = z.max(1)
            k = min(limit, len(best))
            top = best.topk(k).indices
            cand += [_Candidate(float(best[f]), slot, int(f), ids[int(which[f])]) for f in top]
        cand = sorted(cand, key=lambda c: -c.z)[:limit]
        new = [(c.slot, c.feature) for c in cand if (c.slot, c.feature) not in self._rows]
        if new:  # one tiled pass over the vocabulary for every unchecked candidate
            rows = self._rows_of(torch.stack([self.directions(s)[f] for s, f in new]))
            self._rows.update(zip(new, rows))
        hits = []
        for c in cand:
            row = self.feature(c.slot, c.feature)
            for rank, t in enumerate(row["logit_top"]):
                if t["id"] in ids:
                    hits.append({"slot": c.slot, "feature": c.feature, "token": t["token"],
                                 "rank": rank, "logit": t["logit"]})
                    break
        return hits

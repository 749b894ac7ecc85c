"""Which latents fire at all: dead and rare latents, so statistics can leave them out.

A latent that never fires on real text keeps its random starting direction. Counted in the flow
statistics, it adds noise to class shares and similarity medians, and it can take a slot in a
feature's predecessor list although it can never carry anything. Its firing count comes from
the feature index of the same pack when RUN has one (`saeflow index`), else from a cheap firing
pass (the model over `tokens` corpus tokens, every SAE of the pack), cached by pack content.

    live    count >= max(1, ceil(min_density * tokens))
    dead    count == 0
    rare    fired, but fewer times than that

The firing pass also keeps each SAE input's variance per dimension, which names the "massive"
dimensions of the residual stream (saes.evaluate.massive_dims) that the flow can leave out.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from saeflow.errors import MissingResultError
from saeflow.features.tables import open_index
from saeflow.ids import Slot
from saeflow.lm.corpora import DEFAULT_SPEC, Corpus
from saeflow.lm.hooks import HookPoint, capture
from saeflow.saes.packs import pack_fingerprint
from saeflow.store import cache_dir, save_npz_atomic

DEFAULT_MIN_DENSITY = 1e-4
DEFAULT_FIRING_TOKENS = 16_384


@dataclass
class Liveness:
    counts: dict[Slot, np.ndarray]  # slot -> [d_sae] firings over `tokens` tokens
    tokens: int
    source: str  # "index" or "firing pass"
    min_density: float = DEFAULT_MIN_DENSITY
    dim_var: dict[Slot, np.ndarray] | None = None  # slot -> [d_in] input variance (firing pass)

    @property
    def min_count(self) -> int:
        return max(1, math.ceil(self.min_density * self.tokens))

    def live(self, slot: Slot) -> np.ndarray | None:
        """[d_sae] bool, or None when this slot was not counted."""
        c = self.counts.get(Slot(slot[0], slot[1]))  # a list (from JSON) works too
        return None if c is None else c >= self.min_count

    def massive(self, slot: Slot) -> list[int] | None:
        """The massive input dimensions of `slot` (None when no variances were measured)."""
        from saeflow.saes.evaluate import massive_dims

        var = (self.dim_var or {}).get(Slot(slot[0], slot[1]))
        return None if var is None else massive_dims(torch.as_tensor(var, dtype=torch.float64))

    def summary(self) -> dict:
        """Per slot 'LAYER/POSITION': how many latents are dead, rare and left out."""
        out = {}
        for (pos, L), c in sorted(self.counts.items(), key=lambda x: (x[0][1], x[0][0])):
            dead = int((c == 0).sum())
            rare = int(((c > 0) & (c < self.min_count)).sum())
            out[str(Slot(pos, L))] = {"n": int(len(c)), "dead": dead, "rare": rare,
                                 "excluded": dead + rare}
        return {"source": self.source, "tokens": int(self.tokens),
                "min_density": self.min_density, "min_count": self.min_count, "slots": out}

    def digest(self) -> str:
        """Identifies the masks (for cache keys)."""
        import hashlib

        h = hashlib.sha256(f"{self.min_count}".encode())
        for slot in sorted(self.counts):
            # the tuple's repr, as when keys were plain tuples: the digest is part of cache keys
            h.update(repr((slot[0], slot[1])).encode())
            h.update(np.packbits(self.counts[slot] >= self.min_count).tobytes())
        return h.hexdigest()[:16]


def liveness_from_index(run: str | os.PathLike, pack=None,
                        min_density: float = DEFAULT_MIN_DENSITY) -> Liveness | None:
    """Firing counts from RUN's feature index (None when RUN has none, or one of another pack)."""

    try:
        idx = open_index(run)
    except MissingResultError:
        return None
    if pack is not None:

        if idx.manifest.get("identity", {}).get("pack") != pack_fingerprint(pack):
            return None
    counts = idx.firing_counts()
    return Liveness(counts, int(idx.manifest.get("tokens", 0)), "index", min_density)


def firing_pass(pack, model, tokens: int = DEFAULT_FIRING_TOKENS,
                corpus: str = DEFAULT_SPEC, min_density: float = DEFAULT_MIN_DENSITY,
                progress: bool = False) -> Liveness:
    """Count every latent's firings over `tokens` corpus tokens (one forward per batch, every
    SAE of the pack); cached by pack content, tokens and corpus."""
    import hashlib

    slots = sorted(pack.entries)
    key = hashlib.sha256(f"{pack_fingerprint(pack)}|{model.name}|{tokens}|{corpus}|v2".encode()
                         ).hexdigest()[:20]
    cached = cache_dir("firing") / f"{key}.npz"

    if cached.is_file():
        d = dict(np.load(cached))
        seen = int(d.pop("__tokens__"))
        counts = {Slot.parse(k): v for k, v in d.items() if not k.startswith("var:")}
        var = {Slot.parse(k.removeprefix("var:")): v for k, v in d.items() if k.startswith("var:")}
        return Liveness(counts, seen, "firing pass", min_density, var)
    from tqdm.auto import tqdm

    points = [HookPoint(p, L) for p, L in slots]
    saes = {s: pack.sae(*s, device=model.device) for s in slots}
    counts = {s: torch.zeros(saes[s].d_sae, dtype=torch.int64, device=model.device)
              for s in slots}
    # per-dimension sums of the inputs, shifted by the first batch's mean (stable variances)
    shift: dict[Slot, torch.Tensor] = {}
    sums = {s: torch.zeros(2, saes[s].d_in, dtype=torch.float64, device=model.device)
            for s in slots}  # [sum, sum of squares]
    seen = 0
    bar = tqdm(total=tokens, desc="firing pass", unit="tok", disable=not progress)
    for b in Corpus.from_spec(corpus, seed=2).token_batches(model.tokenizer, 8, 128,
                                                            max_tokens=tokens):
        acts = capture(model, b.input_ids, points, attention_mask=b.attention_mask)
        content = b.content_mask().to(model.device)  # [B, T] real document tokens
        with torch.inference_mode():
            for s, pt in zip(slots, points):
                x = acts[pt][content]  # [T_content, d_in]
                z = saes[s].encode(x)  # [T_content, d_sae]
                counts[s] += (z > 0).sum(0)
                if s not in shift:
                    shift[s] = x.double().mean(0)
                dx = x.double() - shift[s]
                sums[s] += torch.stack([dx.sum(0), (dx * dx).sum(0)])
        n = int(content.sum())
        seen += n
        bar.update(n)
    bar.close()
    out = {s: c.cpu().numpy() for s, c in counts.items()}
    n = max(seen, 1)
    var = {s: (v[1] / n - (v[0] / n) ** 2).clamp_min(0).cpu().numpy() for s, v in sums.items()}
    save_npz_atomic(cached, {"__tokens__": np.array(seen),
                             **{str(Slot.of(s)): v for s, v in out.items()},
                             **{f"var:{Slot.of(s)}": v for s, v in var.items()}})
    return Liveness(out, seen, "firing pass", min_density, var)


def liveness_for(pack, run: str | os.PathLike | None = None, model=None,
                 tokens: int = DEFAULT_FIRING_TOKENS, min_density: float = DEFAULT_MIN_DENSITY,
                 progress: bool = False) -> Liveness | None:
    """The index's counts when RUN has an index of this pack, else a firing pass when a model
    is given, else None (liveness unknown: nothing can be left out)."""
    live = liveness_from_index(run, pack, min_density) if run is not None else None
    if live is not None and all(s in live.counts for s in pack.entries):
        return live
    if model is None:
        return live
    return firing_pass(pack, model, tokens, min_density=min_density, progress=progress)

"""The feature index: what each feature of a pack means, from one pass of the model over a corpus.

For every feature of every SAE it records, in memory bounded by n_features x n_top (never by
the number of tokens):
  - activation count (density), mean and max, and a histogram of its nonzero activations;
  - its top-n activating tokens, each with a token window and the feature's activation on
    every token of the window;
  - a uniform sample of its activations (a bottom-k sketch on random keys), reported by
    activation quantile;
plus, from weights only, the logit lens of its decoder direction, and an automatic label.

Written to RUN/index/: features.parquet, examples.parquet, index.json. Queried with DuckDB
(`search`). The pass checkpoints its running state and resumes after a kill.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from saeflow.errors import FeatureIndexError
from saeflow.features.config import IndexConfig
from saeflow.features.tables import INDEX_DIR, INDEX_MANIFEST, FeatureIndex, open_index
from saeflow.features.writer import HIST_EDGES, write_index
from saeflow.ids import Slot
from saeflow.lm.corpora import TokenBatch
from saeflow.saes.packs import pack_fingerprint
from saeflow.saes.scan import PassJob, PassParts, add_at, pass_identity, to_device
from saeflow.scale import ScaleConfig
from saeflow.scale.shards import run_jobs
from saeflow.store import finished_pass

__all__ = ["IndexConfig", "build_index", "index_job"]


class _Reservoir:
    """Per feature, the n entries with the largest key seen so far, with their token windows.

    key [d, n] float32 (-inf = empty), value [d, n] activation, doc/tok [d, n] int64,
    win_ids [d, n, W] int32 (-1 outside the context), win_act [d, n, W] float16.
    """

    def __init__(self, d: int, n: int, W: int, device=None):
        dev = device
        self.key = torch.full((d, n), float("-inf"), device=dev)
        self.value = torch.zeros(d, n, device=dev)
        self.doc = torch.full((d, n), -1, dtype=torch.long, device=dev)
        self.tok = torch.full((d, n), -1, dtype=torch.long, device=dev)
        self.win_ids = torch.full((d, n, W), -1, dtype=torch.int32, device=dev)
        self.win_act = torch.zeros(d, n, W, dtype=torch.float16, device=dev)

    def state(self) -> dict:
        """CPU copies, so a checkpoint resumes on any device."""
        return {k: v.cpu() for k, v in vars(self).items()}

    def load(self, state: dict, device=None) -> None:
        dev = device if device is not None else self.key.device
        for k, v in state.items():
            setattr(self, k, v.to(dev))

    def merge(self, other: "_Reservoir") -> None:
        """Keep, per feature, the n largest keys of both; on equal keys this one's entries
        (the earlier shards') come first (a stable sort)."""
        n = self.key.shape[1]
        key = torch.cat([self.key, other.key], 1)
        order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :n]
        for name in ("value", "doc", "tok", "win_ids", "win_act"):
            both = torch.cat([getattr(self, name), getattr(other, name)], 1)
            idx = order if both.dim() == 2 else order[..., None].expand(-1, -1, both.shape[2])
            setattr(self, name, both.gather(1, idx))
        self.key = key.gather(1, order)

    def offer(self, key, act, feat, flat_tok, z, batch, W_left: int, W_right: int) -> None:
        """Candidates: key/value/feat/flat_tok [M] (flat_tok indexes the batch's B*T tokens).
        One host sync (how many entries are new); the rest is gathers and masked writes."""
        d, n = self.key.shape
        if key.numel() == 0:
            return
        # Group candidates by feature with keys descending; keep each feature's best n.
        o = torch.argsort(key, descending=True, stable=True)
        o = o[torch.argsort(feat[o], stable=True)]
        f_sorted = feat[o]
        dev = key.device
        rank = torch.arange(len(o), device=dev) - torch.searchsorted(f_sorted, f_sorted)
        # [d, n + 1]: column n takes every candidate past a feature's best n, then is dropped
        col = rank.clamp(max=n)
        cand_key = torch.full((d, n + 1), float("-inf"), device=dev)
        cand_key[f_sorted, col] = key[o]
        cand_idx = torch.full((d, n + 1), -1, dtype=torch.long, device=dev)
        cand_idx[f_sorted, col] = o
        cand_key, cand_idx = cand_key[:, :n], cand_idx[:, :n]
        new_key, pos = torch.cat([self.key, cand_key], 1).topk(n, dim=1)  # [d, n]
        from_new = pos >= n
        # Survivors from the old buffers move to their new slots (a gather; the slots of new
        # entries get a placeholder, overwritten below).
        po = pos.clamp(max=n - 1)
        W = self.win_ids.shape[2]
        value, doc, tok = (getattr(self, k).gather(1, po) for k in ("value", "doc", "tok"))
        pw = po[..., None].expand(-1, -1, W)
        win_ids, win_act = self.win_ids.gather(1, pw), self.win_act.gather(1, pw)
        # New entries: read their windows out of this batch.
        fn, jn = from_new.nonzero(as_tuple=True)
        if len(fn):
            c = cand_idx[fn, pos[fn, jn] - n]  # candidate index
            ft = flat_tok[c]
            B, T = batch.input_ids.shape
            b, t = ft // T, ft % T
            offs = torch.arange(-W_left, W_right + 1, device=dev)
            p = t[:, None] + offs[None, :]  # [m, W]
            outside = (p < 0) | (p >= T)
            pc = p.clamp(0, T - 1)
            ids = batch.input_ids[b[:, None], pc].to(torch.int32).masked_fill_(outside, -1)
            acts = z[b[:, None], pc, fn[:, None]].float().masked_fill_(outside, 0)
            value[fn, jn] = act[c]
            doc[fn, jn] = batch.doc_ids[b, t]
            tok[fn, jn] = batch.token_index[b, t]
            win_ids[fn, jn], win_act[fn, jn] = ids, acts.to(torch.float16)
        self.key, self.value, self.doc, self.tok = new_key, value, doc, tok
        self.win_ids, self.win_act = win_ids, win_act


class _SlotStats:
    """Running statistics of one SAE's features."""

    def __init__(self, d: int, cfg: IndexConfig, seed: int, device=None):
        dev = self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = torch.zeros(d, dtype=torch.long, device=dev)
        self.total = torch.zeros(d, dtype=torch.float64, device=dev)
        self.max = torch.zeros(d, device=dev)
        self.hist = torch.zeros(d, len(HIST_EDGES) - 1, dtype=torch.long, device=dev)
        self.edges = HIST_EDGES.to(dev)
        self.top = _Reservoir(d, cfg.n_top, cfg.window, dev)
        self.sample = _Reservoir(d, cfg.n_samples, cfg.window, dev)
        self.gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on any device

    def update(self, z: torch.Tensor, batch, content: torch.Tensor, cfg: IndexConfig) -> None:
        """z [B, T, d] activations; content [B, T] bool (real document tokens); `batch`'s
        input_ids, doc_ids and token_index, z and content all on this statistics' device."""
        B, T, d = z.shape
        z = z * content[..., None].to(z.dtype)
        flat = z.reshape(B * T, d)
        tok, feat = flat.nonzero(as_tuple=True)  # sparse: tens of features per token (a sync)
        val = flat[tok, feat].float()
        self.count.index_add_(0, feat, torch.ones_like(feat))  # bincount would sync on a GPU
        add_at(self.total, feat, val.double())
        self.max = torch.maximum(self.max, torch.zeros_like(self.max).scatter_reduce(
            0, feat, val, "amax"))
        bins = (torch.bucketize(val, self.edges) - 1).clamp(0, self.hist.shape[1] - 1)
        self.hist.view(-1).index_add_(0, feat * self.hist.shape[1] + bins,
                                      torch.ones_like(bins))
        self.top.offer(val, val, feat, tok, z, batch, cfg.window_left, cfg.window_right)
        u = to_device(torch.rand(len(val), generator=self.gen), val.device)
        self.sample.offer(u, val, feat, tok, z, batch, cfg.window_left, cfg.window_right)

    def state(self) -> dict:
        """CPU copies, so a checkpoint resumes on any device."""
        return {"count": self.count.cpu(), "total": self.total.cpu(), "max": self.max.cpu(),
                "hist": self.hist.cpu(), "top": self.top.state(), "sample": self.sample.state(),
                "gen": self.gen.get_state()}

    def merge(self, other: "_SlotStats") -> None:
        """Add another shard's statistics of the same SAE (this one holds the earlier tokens)."""
        self.count += other.count.to(self.device)
        self.total += other.total.to(self.device)
        self.max = torch.maximum(self.max, other.max.to(self.device))
        self.hist += other.hist.to(self.device)
        self.top.merge(other.top)
        self.sample.merge(other.sample)

    def to_cpu(self) -> None:
        self.device = torch.device("cpu")
        self.load(self.state())

    def load(self, s: dict) -> None:
        dev = self.device
        self.count, self.total = s["count"].to(dev), s["total"].to(dev)
        self.max, self.hist = s["max"].to(dev), s["hist"].to(dev)
        self.top.load(s["top"], dev)
        self.sample.load(s["sample"], dev)
        self.gen.set_state(s["gen"])


# --- the pass -------------------------------------------------------------------------------
def _index_identity(pack, model, cfg: IndexConfig) -> dict:
    return pass_identity(pack_fingerprint(pack), model, cfg)


@dataclass
class IndexTargets:
    """What an index pass accumulates, the same for every shard."""
    slots: list[Slot]  # every SAE of the pack, sorted
    widths: dict[Slot, int]  # d_sae of each slot
    cfg: IndexConfig
    vocab_size: int  # length of the unigram counts


class _IndexShard:
    """Every SAE's running statistics (and the token counts) over one shard of tokens. The
    random keys of the sample sketch come from a generator seeded by (seed, SAE, shard), so a
    shard draws the same keys on any worker."""

    def __init__(self, targets: IndexTargets, k: int, device):
        cfg = self.cfg = targets.cfg
        self.dev = torch.device(device)
        self.stats = {slot: _SlotStats(targets.widths[slot], cfg,
                                       seed=cfg.seed * 1000 + i + k * 1_000_003, device=device)
                      for i, slot in enumerate(targets.slots)}
        self.unigram = torch.zeros(targets.vocab_size, dtype=torch.long)

    def on_batch(self, z, b, content, acts=None) -> None:
        dev = self.dev
        on_dev = TokenBatch(*(to_device(t, dev) for t in (b.input_ids, b.attention_mask,
                                                          b.doc_ids, b.token_index)))
        content_dev = to_device(content, dev)
        for slot, zs in z.items():
            self.stats[slot].update(zs, on_dev, content_dev, self.cfg)
        self.unigram += torch.bincount(b.input_ids[content], minlength=len(self.unigram))

    def state(self) -> dict:
        return {"unigram": self.unigram.clone(),
                "stats": {str(Slot.of(slot)): st.state() for slot, st in self.stats.items()}}

    def load(self, st: dict) -> None:
        self.unigram = st["unigram"].clone()
        for slot, s in self.stats.items():
            s.load(st["stats"][str(Slot.of(slot))])

    def merge(self, other: "_IndexShard") -> None:
        self.unigram += other.unigram
        for slot, s in self.stats.items():
            s.merge(other.stats[slot])


def index_job(pack, model, out: str | os.PathLike, cfg: IndexConfig | None = None, *,
              force: bool = False, progress: bool = True) -> PassJob | None:
    """The index's share of a corpus pass, or None when RUN already holds this index."""
    cfg = cfg or IndexConfig()
    pack.check_model(model)
    root = Path(out) / INDEX_DIR
    ident = _index_identity(pack, model, cfg)
    if finished_pass(root / INDEX_MANIFEST, ident, force, FeatureIndexError, "the index"):
        return None
    slots = sorted(pack.entries)
    targets = IndexTargets(slots=slots, widths={s: pack.entries[s].d_sae for s in slots},
                           cfg=cfg, vocab_size=model.vocab_size)

    def finish(total: PassParts, seconds: float, saes: dict) -> FeatureIndex:
        part: _IndexShard = total.parts["index"]
        if model.device.type != "cpu":
            for st in part.stats.values():  # the table writer reads them as numpy arrays
                st.to_cpu()
        write_index(root, pack, model, {s: saes[s] for s in slots}, part.stats, part.unigram,
                    cfg, ident, total.tokens["index"], seconds, progress=progress)
        return open_index(out)

    return PassJob("index", ident, slots, cfg.spec(cfg.checkpoint_every_s),
                   {"index": (partial(_IndexShard, targets), cfg.tokens)}, finish,
                   root / ".state" / "state.pt", FeatureIndexError)


def build_index(pack, model, out: str | os.PathLike, cfg: IndexConfig | None = None, *,
                force: bool = False, progress: bool = True,
                stop_after_batches: int | None = None,
                scale: ScaleConfig | None = None) -> "FeatureIndex":
    """Run the model over `cfg.tokens` tokens once and index every feature of `pack`.

    Resumes from RUN/index/.state when it holds the state of the same pack, model and settings;
    refuses a state from another pack or corpus unless `force`. The tokens are cut into shards
    (`scale.shard_tokens`) merged in shard order, in this process or on `scale.workers` Ray
    workers: the same index either way.
    """
    job = index_job(pack, model, out, cfg, force=force, progress=progress)
    if job is None:
        return open_index(out)
    return run_jobs(model, pack, [job], scale=scale, force=force, progress=progress,
                    stop_after_batches=stop_after_batches)["index"]

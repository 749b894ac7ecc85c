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
from itertools import accumulate
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


def _host(t: torch.Tensor) -> torch.Tensor:
    """`t` on the CPU, with a storage of its own: one SAE's checkpoint must not carry (or,
    pickled for a worker, repeat) the storage of its whole group."""
    if t.device.type != "cpu":
        return t.cpu()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


class _GroupCodes:
    """One batch's codes of S SAEs of width d, as the bookkeeping reads them: every nonzero
    entry (feat [M] = SAE j's feature f as j * d + f, tok [M] into the batch's B*T tokens,
    val [M] float32), SAE by SAE in order, each SAE's in nonzero()'s order (token, then
    feature), and the activations around them (`window`), padding tokens (content False)
    read as zero. The codes are stacked into one [S, B, T, d] tensor (one more copy of them)
    so that the group takes one nonzero() and one read per window: on a GPU a few kernels
    and two host syncs, not that many per SAE."""

    def __init__(self, zs: list, content: torch.Tensor):
        S, (B, T, d) = len(zs), zs[0].shape
        mask = content[..., None].to(zs[0].dtype)  # [B, T, 1]
        Z = torch.stack(zs).mul_(mask) if S > 1 else (zs[0] * mask)[None]  # [S, B, T, d]
        flat = Z.view(S, B * T, d)
        s, tok, f = flat.nonzero(as_tuple=True)  # (a host sync)
        self.Z, self.d, self.tok = Z, d, tok
        self.feat, self.val = (f, flat[0, tok, f].float()) if S == 1 else (
            s * d + f, flat[s, tok, f].float())
        self.counts = [len(tok)] if S == 1 else (  # entries per SAE (a host sync)
            torch.searchsorted(s, torch.arange(S + 1, device=s.device)).diff().tolist())
        # [S] each SAE's last entry (an index into the group's M entries); one SAE's: -1
        self.last = None if S == 1 else to_device(
            torch.tensor(list(accumulate(self.counts))) - 1, tok.device)

    def window(self, feat: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """[m, W] float32: feature feat [m] at batch row b [m], positions p [m, W] (inside
        the context)."""
        d = self.d
        return self.Z[(feat // d)[:, None], b[:, None], p, (feat % d)[:, None]].float()


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
        return {k: _host(v) for k, v in vars(self).items()}

    def load(self, state: dict, device=None) -> None:
        dev = device if device is not None else self.key.device
        for k, v in state.items():
            setattr(self, k, v.to(dev))

    def rows(self, a: int, e: int) -> "_Reservoir":
        """Features a..e-1 as a reservoir of their own: views (no copy), valid until this
        reservoir's next offer, load or merge replaces its tensors."""
        out = object.__new__(_Reservoir)
        for k, v in vars(self).items():
            setattr(out, k, v[a:e])
        return out

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

    def offer(self, key, act, feat, flat_tok, codes: _GroupCodes, batch, W_left: int,
              W_right: int, keep: list[tuple[int, int]] | None = None) -> None:
        """Candidates: key/value/feat/flat_tok [M] (flat_tok indexes the batch's B*T tokens);
        `codes` reads the activations around them. One host sync (how many entries are new);
        the rest is gathers and masked writes. Features never mix: each row's result depends
        only on its own candidates, in their order. keep: row ranges [a, e) left as they
        are (an SAE of a group without candidates: on its own it is offered nothing, and
        topk may reorder its tied keys)."""
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
            c = cand_idx[fn, pos[fn, jn] - n]  # candidate index; -1: an empty entry
            # An empty entry (key -inf) reads its own SAE's last candidate, as when each SAE
            # was offered its candidates alone (the tokens table lists its window's tokens).
            if codes.last is not None:
                c = torch.where(c < 0, codes.last[fn // codes.d], c)
            ft = flat_tok[c]
            B, T = batch.input_ids.shape
            b, t = ft // T, ft % T
            offs = torch.arange(-W_left, W_right + 1, device=dev)
            p = t[:, None] + offs[None, :]  # [m, W]
            outside = (p < 0) | (p >= T)
            pc = p.clamp(0, T - 1)
            ids = batch.input_ids[b[:, None], pc].to(torch.int32).masked_fill_(outside, -1)
            acts = codes.window(fn, b, pc).masked_fill_(outside, 0)
            value[fn, jn] = act[c]
            doc[fn, jn] = batch.doc_ids[b, t]
            tok[fn, jn] = batch.token_index[b, t]
            win_ids[fn, jn], win_act[fn, jn] = ids, acts.to(torch.float16)
        new = {"key": new_key, "value": value, "doc": doc, "tok": tok, "win_ids": win_ids,
               "win_act": win_act}
        for a, e in keep or ():
            for k, t in new.items():
                t[a:e] = getattr(self, k)[a:e]
        for k, t in new.items():
            setattr(self, k, t)


class _GroupStats:
    """Running statistics of S SAEs of one width d, held as S*d features (SAE j's feature f
    is row j * d + f), so a batch's bookkeeping is one set of ~170 ops for the group instead
    of ~140 per SAE (on a GPU, each a kernel launch). Features never mix, and
    each SAE's candidates keep their order, so row j * d + f holds exactly what that SAE's
    own statistics would; each SAE's sample keys come from its own generator, as before."""

    def __init__(self, d: int, cfg: IndexConfig, seeds: list[int], device=None):
        dev = self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.d, n = d, len(seeds) * d
        self.count = torch.zeros(n, dtype=torch.long, device=dev)
        self.total = torch.zeros(n, dtype=torch.float64, device=dev)
        self.max = torch.zeros(n, device=dev)
        self.hist = torch.zeros(n, len(HIST_EDGES) - 1, dtype=torch.long, device=dev)
        self.edges = HIST_EDGES.to(dev)
        self.top = _Reservoir(n, cfg.n_top, cfg.window, dev)
        self.sample = _Reservoir(n, cfg.n_samples, cfg.window, dev)
        # on the CPU: the same draws on any device
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]

    def update_group(self, zs: list, batch, content: torch.Tensor, cfg: IndexConfig) -> None:
        """zs: each SAE's activations [B, T, d], in the group's order; content [B, T] bool
        (real document tokens); `batch`'s input_ids, doc_ids and token_index, zs and content
        all on this statistics' device."""
        codes = _GroupCodes(zs, content)
        feat, tok, val = codes.feat, codes.tok, codes.val
        self.count.index_add_(0, feat, torch.ones_like(feat))  # bincount would sync on a GPU
        add_at(self.total, feat, val.double())
        self.max = torch.maximum(self.max, torch.zeros_like(self.max).scatter_reduce(
            0, feat, val, "amax"))
        bins = (torch.bucketize(val, self.edges) - 1).clamp(0, self.hist.shape[1] - 1)
        self.hist.view(-1).index_add_(0, feat * self.hist.shape[1] + bins,
                                      torch.ones_like(bins))
        d, W = self.d, (cfg.window_left, cfg.window_right)
        keep = [(j * d, j * d + d) for j, m in enumerate(codes.counts) if m == 0]
        self.top.offer(val, val, feat, tok, codes, batch, *W, keep=keep)
        u = torch.cat([torch.rand(m, generator=g) for m, g in zip(codes.counts, self.gens)])
        self.sample.offer(to_device(u, val.device), val, feat, tok, codes, batch, *W, keep=keep)

    def slot(self, j: int) -> "_SlotStats":
        """SAE j's statistics: views of this group's tensors (no copy), valid until the
        group's next update, load or merge."""
        a, e = j * self.d, (j + 1) * self.d
        one = object.__new__(_SlotStats)
        one.device, one.d, one.edges = self.device, self.d, self.edges
        one.count, one.total, one.max, one.hist = (t[a:e] for t in (self.count, self.total,
                                                                    self.max, self.hist))
        one.top, one.sample = self.top.rows(a, e), self.sample.rows(a, e)
        one.gens = [self.gens[j]]
        return one

    def merge(self, other: "_GroupStats") -> None:
        """Add another shard's statistics of the same SAEs (this one holds the earlier
        tokens)."""
        self.count += other.count.to(self.device)
        self.total += other.total.to(self.device)
        self.max = torch.maximum(self.max, other.max.to(self.device))
        self.hist += other.hist.to(self.device)
        self.top.merge(other.top)
        self.sample.merge(other.sample)

    def to_cpu(self) -> None:
        self.device = cpu = torch.device("cpu")
        self.count, self.total, self.max, self.hist, self.edges = (
            t.cpu() for t in (self.count, self.total, self.max, self.hist, self.edges))
        for res in (self.top, self.sample):
            res.load(dict(vars(res)), cpu)

    def load_slots(self, states: list[dict]) -> None:
        """The group from each SAE's state (`_SlotStats.state`), in the group's order."""
        dev = self.device

        def cat(parts: list[dict], k: str) -> torch.Tensor:
            return torch.cat([s[k] for s in parts]).to(dev)

        self.count, self.total = cat(states, "count"), cat(states, "total")
        self.max, self.hist = cat(states, "max"), cat(states, "hist")
        for name in ("top", "sample"):
            parts = [s[name] for s in states]
            getattr(self, name).load({k: cat(parts, k) for k in parts[0]}, dev)
        for g, s in zip(self.gens, states):
            g.set_state(s["gen"])


class _SlotStats(_GroupStats):
    """Running statistics of one SAE: a group of one. Its state() is the checkpoint format
    of one SAE (what the tables writer and a resume read)."""

    def __init__(self, d: int, cfg: IndexConfig, seed: int, device=None):
        super().__init__(d, cfg, [seed], device)

    @property
    def gen(self) -> torch.Generator:
        return self.gens[0]

    def update(self, z: torch.Tensor, batch, content: torch.Tensor, cfg: IndexConfig) -> None:
        """z [B, T, d] activations; the rest as `update_group`."""
        self.update_group([z], batch, content, cfg)

    def state(self) -> dict:
        """CPU copies, so a checkpoint resumes on any device."""
        return {"count": _host(self.count), "total": _host(self.total),
                "max": _host(self.max), "hist": _host(self.hist), "top": self.top.state(),
                "sample": self.sample.state(), "gen": self.gen.get_state()}

    def load(self, s: dict) -> None:
        self.load_slots([s])


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


# Bytes of one batch's stacked codes (`_GroupCodes`) a group of SAEs may take: on a GPU the
# bookkeeping is launch-bound, so the SAEs of one width go together up to this; on the CPU
# each SAE alone (not launch-bound there: one SAE's sorts and gathers stay in cache).
_STACK_BYTES_GPU = 4 << 30
_STACK_BYTES_CPU = 0


def _slot_groups(targets: IndexTargets, device) -> list[list[int]]:
    """Indices into targets.slots of the SAEs kept together, each list of one width."""
    budget = _STACK_BYTES_CPU if torch.device(device).type == "cpu" else _STACK_BYTES_GPU
    per_feature = targets.cfg.batch_size * targets.cfg.ctx_len * 4  # float32 codes
    runs: dict[int, list[list[int]]] = {}
    for i, slot in enumerate(targets.slots):
        d = targets.widths[slot]
        cap = max(1, budget // (per_feature * d))
        groups = runs.setdefault(d, [[]])
        if len(groups[-1]) >= cap:
            groups.append([])
        groups[-1].append(i)
    return [g for groups in runs.values() for g in groups]


class _IndexShard:
    """Every SAE's running statistics (and the token counts) over one shard of tokens, SAEs
    of one width held together on a GPU (`_GroupStats`, `_slot_groups`). The random keys of
    the sample sketch come from a generator seeded by (seed, SAE, shard), so a shard draws
    the same keys on any worker."""

    def __init__(self, targets: IndexTargets, k: int, device,
                 layout: list[list[int]] | None = None):
        cfg = self.cfg = targets.cfg
        self.targets, self.dev = targets, torch.device(device)
        self.layout = layout or _slot_groups(targets, device)
        self.groups = [([targets.slots[i] for i in g], _GroupStats(
            targets.widths[targets.slots[g[0]]], cfg,
            [cfg.seed * 1000 + i + k * 1_000_003 for i in g], device=device))
            for g in self.layout]
        where = {s: (g, j) for slots, g in self.groups for j, s in enumerate(slots)}
        self.where = {s: where[s] for s in targets.slots}  # in the order of targets.slots
        self.unigram = torch.zeros(targets.vocab_size, dtype=torch.long)

    @property
    def stats(self) -> dict:
        """{slot: _SlotStats} views of the groups (what the tables writer reads)."""
        return {slot: g.slot(j) for slot, (g, j) in self.where.items()}

    def on_batch(self, z, b, content, acts=None) -> None:
        dev = self.dev
        on_dev = TokenBatch(*(to_device(t, dev) for t in (b.input_ids, b.attention_mask,
                                                          b.doc_ids, b.token_index)))
        content_dev = to_device(content, dev)
        for slots, g in self.groups:
            g.update_group([z[s] for s in slots], on_dev, content_dev, self.cfg)
        self.unigram += torch.bincount(b.input_ids[content], minlength=len(self.unigram))

    def state(self) -> dict:
        return {"unigram": self.unigram.clone(),
                "stats": {str(Slot.of(slot)): st.state() for slot, st in self.stats.items()}}

    def load(self, st: dict) -> None:
        self.unigram = st["unigram"].clone()
        for slots, g in self.groups:
            g.load_slots([st["stats"][str(Slot.of(s))] for s in slots])

    def merge(self, other: "_IndexShard") -> None:
        self.unigram += other.unigram
        if other.layout != self.layout:  # another device's grouping
            twin = _IndexShard(self.targets, 0, self.dev, self.layout)
            twin.load(other.state())
            other = twin
        for (_, g), (_, h) in zip(self.groups, other.groups):
            g.merge(h)

    def to_cpu(self) -> None:
        for _, g in self.groups:
            g.to_cpu()


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
            part.to_cpu()  # the table writer reads them as numpy arrays
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

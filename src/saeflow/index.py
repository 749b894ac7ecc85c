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

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


INDEX_DIR = "index"
INDEX_MANIFEST = "index.json"
INDEX_FORMAT = "saeflow-index"
# Log-spaced histogram edges for nonzero activations: 1e-3 .. 1e4, 56 bins (ends clamp).
HIST_EDGES = torch.logspace(-3, 4, 57)


class IndexError_(ValueError):
    pass


@dataclass
class IndexConfig:
    tokens: int = 200_000
    corpus: str = "wiki=0.8,python=0.2"
    seed: int = 0
    batch_size: int = 32
    ctx_len: int = 128
    n_top: int = 16
    n_samples: int = 8
    window_left: int = 10
    window_right: int = 3
    n_logits: int = 10
    encoder_dtype: str = "auto"  # auto: bf16 on CPU, model dtype elsewhere
    checkpoint_every_s: float = 120.0

    def identity(self) -> dict:
        d = asdict(self)
        d.pop("checkpoint_every_s")
        return d

    @property
    def window(self) -> int:
        return self.window_left + 1 + self.window_right


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

    def offer(self, key, act, feat, flat_tok, z, batch, W_left: int, W_right: int) -> None:
        """Candidates: key/value/feat/flat_tok [M] (flat_tok indexes the batch's B*T tokens)."""
        d, n = self.key.shape
        if key.numel() == 0:
            return
        # Group candidates by feature with keys descending; keep each feature's best n.
        o = torch.argsort(key, descending=True, stable=True)
        o = o[torch.argsort(feat[o], stable=True)]
        f_sorted = feat[o]
        counts = torch.bincount(f_sorted, minlength=d)
        starts = torch.cumsum(counts, 0) - counts
        dev = key.device
        rank = torch.arange(len(o), device=dev) - starts[f_sorted]
        keep = rank < n
        sel, f, r = o[keep], f_sorted[keep], rank[keep]
        cand_key = torch.full((d, n), float("-inf"), device=dev)
        cand_key[f, r] = key[sel]
        cand_idx = torch.full((d, n), -1, dtype=torch.long, device=dev)
        cand_idx[f, r] = sel
        new_key, pos = torch.cat([self.key, cand_key], 1).topk(n, dim=1)  # [d, n]
        from_new = pos >= n
        # Survivors from the old buffers move to their new slots.
        fo, jo = (~from_new).nonzero(as_tuple=True)
        po = pos[fo, jo]
        value, doc, tok = self.value.clone(), self.doc.clone(), self.tok.clone()
        win_ids, win_act = self.win_ids.clone(), self.win_act.clone()
        value[fo, jo], doc[fo, jo], tok[fo, jo] = self.value[fo, po], self.doc[fo, po], self.tok[fo, po]
        win_ids[fo, jo], win_act[fo, jo] = self.win_ids[fo, po], self.win_act[fo, po]
        # New entries: read their windows out of this batch.
        fn, jn = from_new.nonzero(as_tuple=True)
        if len(fn):
            c = cand_idx[fn, pos[fn, jn] - n]  # candidate index
            ft = flat_tok[c]
            B, T = batch.input_ids.shape
            b, t = ft // T, ft % T
            offs = torch.arange(-W_left, W_right + 1, device=dev)
            p = t[:, None] + offs[None, :]  # [m, W]
            inside = (p >= 0) & (p < T)
            pc = p.clamp(0, T - 1)
            ids = batch.input_ids[b[:, None], pc].to(torch.int32)
            ids[~inside] = -1
            acts = z[b[:, None], pc, fn[:, None]].float()
            acts[~inside] = 0
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
        tok, feat = flat.nonzero(as_tuple=True)  # sparse: tens of features per token
        val = flat[tok, feat].float()
        self.count += torch.bincount(feat, minlength=d)
        self.total.index_add_(0, feat, val.double())
        self.max = torch.maximum(self.max, torch.zeros_like(self.max).scatter_reduce(
            0, feat, val, "amax"))
        bins = (torch.bucketize(val, self.edges) - 1).clamp(0, self.hist.shape[1] - 1)
        self.hist.view(-1).index_add_(0, feat * self.hist.shape[1] + bins,
                                      torch.ones_like(bins))
        self.top.offer(val, val, feat, tok, z, batch, cfg.window_left, cfg.window_right)
        u = torch.rand(len(val), generator=self.gen).to(val.device)
        self.sample.offer(u, val, feat, tok, z, batch, cfg.window_left, cfg.window_right)

    def state(self) -> dict:
        """CPU copies, so a checkpoint resumes on any device."""
        return {"count": self.count.cpu(), "total": self.total.cpu(), "max": self.max.cpu(),
                "hist": self.hist.cpu(), "top": self.top.state(), "sample": self.sample.state(),
                "gen": self.gen.get_state()}

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


# --- logit lens -----------------------------------------------------------------------------
def unembed_directions(model, dirs: torch.Tensor, W_U: torch.Tensor | None = None) -> torch.Tensor:
    """Residual directions [n, d_model] -> logits [n, vocab] through the final norm's gain.

    The norm's 1/rms (or 1/std) factor is a positive scalar per token and does not change the
    ranking; LayerNorm's centring does, so it is applied. Gemma's gain is (1 + w). `W_U`
    [vocab, d_model] may be passed in another dtype (logit_lens casts it once, not per block).
    """
    norm = model.module(model.arch.final_norm)
    x = dirs.to(device=norm.weight.device, dtype=torch.float32)  # directions may live on the CPU
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(dim=-1, keepdim=True)
    w = norm.weight.detach().float()
    gain = (1.0 + w) if model.arch.family in ("gemma2", "gemma3") else w
    if W_U is None:
        W_U = model.hf.get_output_embeddings().weight.detach()  # [vocab, d_model]
    x = (x * gain).to(device=W_U.device, dtype=W_U.dtype)
    return (x @ W_U.T).float()


def logit_lens(model, dirs: torch.Tensor, n: int = 10, block: int = 4096,
               vocab_block: int = 16384):
    """Top and bottom n tokens of each direction: (top_ids, top_vals, bot_ids, bot_vals) [N, n].

    Tiled over the vocabulary with a running top-n, so the [vocab, d_model] unembedding is read
    once per `block` directions (reading it once per small block made this memory-bound: 84 s
    per 4096-feature SAE on a 2-core CPU). It is cast once: to bf16 where bf16 matmuls are
    measurably faster (GPUs, CPUs with AVX-512 BF16), else kept in fp32 (a CPU without bf16
    units emulates them, ~5x slower than fp32).
    """
    from .train import _bf16_is_faster

    W_U = model.hf.get_output_embeddings().weight.detach()  # [vocab, d_model]
    fast_bf16 = dirs.shape[0] >= 64 and _bf16_is_faster(W_U.device)
    W_U = W_U.to(torch.bfloat16 if fast_bf16 else torch.float32)
    V = W_U.shape[0]
    outs = [[], [], [], []]
    for i in range(0, dirs.shape[0], block):
        b = min(block, dirs.shape[0] - i)
        top_v = torch.full((b, n), -float("inf"))
        bot_v = torch.full((b, n), float("inf"))
        top_i = torch.zeros(b, n, dtype=torch.long)
        bot_i = torch.zeros(b, n, dtype=torch.long)
        for j in range(0, V, vocab_block):
            logits = unembed_directions(model, dirs[i:i + b], W_U[j:j + vocab_block]).cpu()
            m = min(n, logits.shape[1])  # [b, vb] -> merge its top/bottom m into the running n
            tv, ti = logits.topk(m, dim=1)
            bv, bi = logits.topk(m, dim=1, largest=False)
            top_v, sel = torch.cat([top_v, tv], 1).topk(n, dim=1)
            top_i = torch.cat([top_i, ti + j], 1).gather(1, sel)
            bot_v, sel = torch.cat([bot_v, bv], 1).topk(n, dim=1, largest=False)
            bot_i = torch.cat([bot_i, bi + j], 1).gather(1, sel)
        for o, t in zip(outs, (top_i, top_v, bot_i, bot_v)):
            o.append(t)
    return tuple(torch.cat(o) for o in outs)


# --- labels ---------------------------------------------------------------------------------
def token_strings(tokenizer, ids) -> dict[int, str]:
    """Readable text of each token id (decoded one at a time, so spaces and bytes show)."""
    return {int(i): tokenizer.decode([int(i)]) for i in sorted(set(int(i) for i in ids) - {-1})}


def auto_label(center_ids: list[int], weights: list[float], logit_ids: list[int],
               strings: dict[int, str], doc_freq: np.ndarray, n_docs_tokens: int,
               n_words: int = 3) -> tuple[str, list[str]]:
    """A short label from the evidence: the most characteristic activating tokens (count in the
    top contexts, weighted by activation, times inverse corpus frequency), then the top logit
    tokens. Returns (label, characteristic tokens)."""
    score: dict[str, float] = {}
    for i, w in zip(center_ids, weights):
        if i < 0:
            continue
        raw = strings.get(i, "")
        # Whitespace tokens are real evidence (a feature may fire on the space before a year):
        # show them visibly instead of dropping them.
        s = raw.strip() or raw.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
        if not s:
            continue
        idf = math.log((1 + n_docs_tokens) / (1 + float(doc_freq[i]))) + 1.0
        score[s] = score.get(s, 0.0) + w * idf
    words = [w for w, _ in sorted(score.items(), key=lambda x: -x[1])[:n_words]]
    outs = []
    for i in logit_ids:
        s = strings.get(i, "").strip()
        if s and s not in outs and s not in words:
            outs.append(s)
        if len(outs) == 2:
            break
    label = (", ".join(repr(w)[1:-1] for w in words) if words else
             "(never active)" if not any(i >= 0 for i in center_ids) else "(unreadable tokens)")
    if outs:
        label += " → " + ", ".join(repr(w)[1:-1] for w in outs)
    return label, words


# --- the pass -------------------------------------------------------------------------------
def _index_identity(pack, model, cfg: IndexConfig) -> dict:
    from .flow import pack_fingerprint

    return {"pack": pack_fingerprint(pack), "model": model.name, "config": cfg.identity()}


def build_index(pack, model, out: str | os.PathLike, cfg: IndexConfig | None = None, *,
                force: bool = False, progress: bool = True,
                stop_after_batches: int | None = None) -> "FeatureIndex":
    """Run the model over `cfg.tokens` tokens once and index every feature of `pack`.

    Resumes from RUN/index/.state when it holds the state of the same pack, model and settings;
    refuses a state from another pack or corpus unless `force`.
    """
    from .corpora import TokenBatch
    from .scan import ScanError, ScanSpec, scan

    cfg = cfg or IndexConfig()
    pack.check_model(model)
    root = Path(out) / INDEX_DIR
    ident = _index_identity(pack, model, cfg)
    manifest = root / INDEX_MANIFEST
    if manifest.is_file() and not force:
        old = json.loads(manifest.read_text())
        if old.get("identity") == ident:
            from .index_tables import open_index

            return open_index(out)
        if old.get("identity", {}).get("pack") != ident["pack"]:
            raise IndexError_(f"{root} holds the index of a different pack; use another --out "
                              f"or --force")
    slots = sorted(pack.entries)
    dev = model.device  # the bookkeeping runs where the codes are: no dense copy to the host
    stats = {slot: _SlotStats(pack.entries[slot].d_sae, cfg, seed=cfg.seed * 1000 + i,
                              device=dev)
             for i, slot in enumerate(slots)}
    unigram = [torch.zeros(model.vocab_size, dtype=torch.long)]

    def on_batch(z, b, content):
        on_dev = TokenBatch(*(t.to(dev) for t in (b.input_ids, b.attention_mask, b.doc_ids,
                                                  b.token_index)))
        content_dev = content.to(dev)
        for slot, zs in z.items():
            stats[slot].update(zs, on_dev, content_dev, cfg)
        unigram[0] += torch.bincount(b.input_ids[content], minlength=model.vocab_size)

    def get_state():
        return {"unigram": unigram[0], "stats": {f"{L}/{p}": stats[(p, L)].state()
                                                 for p, L in slots}}

    def set_state(st):
        unigram[0] = st["unigram"]
        for p, L in slots:
            stats[(p, L)].load(st["stats"][f"{L}/{p}"])

    spec = ScanSpec(cfg.tokens, cfg.corpus, cfg.seed, cfg.batch_size, cfg.ctx_len,
                    cfg.encoder_dtype, cfg.checkpoint_every_s)
    try:
        res = scan(model, pack, slots, spec, root / ".state" / "state.pt", ident, on_batch,
                   get_state, set_state, force=force, progress=progress, desc="index",
                   stop_after_batches=stop_after_batches, codes_on_device=True)
    except ScanError as e:
        raise IndexError_(str(e)) from None
    if dev.type != "cpu":
        for st in stats.values():  # the table writer reads them as numpy arrays
            st.to_cpu()
    saes, unigram, tokens_done = res["saes"], unigram[0], res["tokens"]
    t_start = time.time() - res["seconds"]
    from .index_tables import write_index

    write_index(root, pack, model, saes, stats, unigram, cfg, ident, tokens_done,
                time.time() - t_start, progress=progress)
    from .index_tables import open_index

    return open_index(out)

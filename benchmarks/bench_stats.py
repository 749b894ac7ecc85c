"""Sparse co-activation statistics vs the dense einsum of the original work, in one run.

    .venv/bin/python benchmarks/bench_stats.py synthetic [--width 24576 --l0 64 --tokens 16384]
    .venv/bin/python benchmarks/bench_stats.py embedded [--tokens 8192]
    .venv/bin/python benchmarks/bench_stats.py device [--device cuda --width 4096 --k 32 \
        --tokens 16384 --batch 4096 --pairs 4]
    .venv/bin/python benchmarks/bench_stats.py consumers [--device cuda --layers 18 \
        --width 4096 --batch 4096 --batches 4 --baseline-src DIR]

synthetic: two SAEs' activations with a realistic L0 (power-law feature frequencies, and half of
    the downstream activity copied from upstream features). Times saeflow's PairAccumulator and
    the dense reference (per batch: einsum of the activations and of the indicators into
    d_up x d_down matrices) on the same tokens, and checks they agree.
embedded: the embedded model and pack: one capture + encode of every resid_post SAE (timed),
    then the 17 adjacent resid_post pairs accumulated sparsely and densely (timed); tokens/s
    of each with the encode included.
consumers: the statistics and eval consumers of a corpus pass (StatsShard, eval's reconstruction
    and firing accumulators) on the family's shape: --layers x 3 TopK SAEs of width --width,
    resid_post adjacent pairs, flow predecessors of every layer, random codes and inputs;
    per batch of --batch tokens the aten ops dispatched (each a kernel launch on a GPU), the
    ops that would make the host wait for a GPU, and tokens/s (the fastest of --batches). With
    --baseline-src DIR also DIR/src's library (a `git archive` of an older commit) in a
    child process on the same batches: new / old and whether their states are equal.
device: the per-token work of the corpus passes on random TopK codes (--pairs + 1 SAEs of
    width --width, k --k, batches of --batch tokens) on --device, old vs new in one run:
    statistics: the pre-issue-29 path (per pair: [T, m] lists copied to the host, bincounts
        and pair keys in numpy, index_add_ into CPU sums) vs the device path (each SAE's codes
        once, pair keys and sums on the device); checks C equal and P to 1e-12;
    index: _SlotStats.update with the old reservoir bookkeeping (boolean-mask indexing, a
        host sync each) vs the new one (gathers and masked writes); checks the tables equal.
    tok/s of each (tokens x SAE pairs, or x SAEs, per second) and new / old.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial

import numpy as np
import torch


def synthetic_acts(T: int, d: int, l0: int, seed: int, base: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    freq = 1.0 / torch.arange(1, d + 1).float() ** 0.7  # power-law feature frequencies
    freq = freq[torch.randperm(d, generator=g)]
    idx = torch.multinomial(freq, l0 * T, replacement=True, generator=g).view(T, l0)
    z = torch.zeros(T, d)
    z.scatter_(1, idx, torch.rand(T, l0, generator=g) * 4 + 0.1)
    if base is not None:  # half of the downstream activity follows upstream features
        perm = torch.randperm(d, generator=g)
        z[:, perm[: d // 2]] = torch.maximum(z[:, perm[: d // 2]], base[:, : d // 2] * 0.9)
    return z


def dense_update(Cd, Pd, zu, zd):
    Cd += (zu > 0).float().T @ (zd > 0).float()
    Pd += zu.T @ zd


def bench_synthetic(args) -> dict:
    from saeflow.evolution.stats import PairAccumulator

    T, d = args.tokens, args.width
    zu = synthetic_acts(T, d, args.l0, 0)
    zd = synthetic_acts(T, d, args.l0, 1, base=zu)
    acc = PairAccumulator(d, d, dense_limit=0)  # at 24k the sums are kept sparse
    t = time.perf_counter()
    for i in range(0, T, args.batch):
        acc.update(zu[i:i + args.batch], zd[i:i + args.batch])
    acc._compact()
    accumulate_s = time.perf_counter() - t
    n_pairs = len(acc.pairs()["up"])  # every measure of every co-active pair, once at the end
    sparse_s = time.perf_counter() - t
    del acc  # the dense reference below needs 2 x 2.4 GB at width 24k
    n_dense = min(T, args.dense_tokens)
    Cd = torch.zeros(d, d)
    Pd = torch.zeros(d, d)
    t = time.perf_counter()
    for i in range(0, n_dense, args.batch):
        dense_update(Cd, Pd, zu[i:i + args.batch], zd[i:i + args.batch])
    dense_s = time.perf_counter() - t
    # Agreement on the same tokens: accumulate the first n_dense tokens sparsely too.
    check = PairAccumulator(d, d, dense_limit=0)
    for i in range(0, n_dense, args.batch):
        check.update(zu[i:i + args.batch], zd[i:i + args.batch])
    q = check.pairs()
    count_err = float(np.abs(Cd[q["up"], q["down"]].numpy() - q["count"]).max())
    nnz_dense = int((Cd > 0).sum())
    del Cd, Pd
    sparse_tps, dense_tps = T / sparse_s, n_dense / dense_s
    return {"case": f"synthetic, width {d}, L0 {args.l0}", "tokens_sparse": T,
            "tokens_dense": n_dense, "sparse_accumulate_s": round(accumulate_s, 1),
            "sparse_measures_s": round(sparse_s - accumulate_s, 1),
            "sparse_tokens_per_s": round(sparse_tps, 1),
            "dense_tokens_per_s": round(dense_tps, 2), "speedup": round(sparse_tps / dense_tps, 1),
            "co_active_pairs": n_pairs, "same_pairs_as_dense": nnz_dense == len(q["up"]),
            "max_count_difference": count_err}


def bench_embedded(args) -> dict:
    from saeflow.evolution.stats import PairAccumulator
    from saeflow.lm.corpora import Corpus
    from saeflow.lm.hooks import HookPoint, capture
    from saeflow.lm.model import load_model
    from saeflow.saes.recipes import open_pack

    model = load_model("embedded")
    pack = open_pack("embedded")
    layers = pack.layers("resid_post")
    saes = {L: pack.sae("resid_post", L) for L in layers}
    pts = [HookPoint("resid_post", L) for L in layers]
    corpus = Corpus.from_spec("wiki=0.8,python=0.2", seed=0)
    zs = {L: [] for L in layers}
    t = time.perf_counter()
    for b in corpus.token_batches(model.tokenizer, 32, 128, max_tokens=args.tokens):
        acts = capture(model, b.input_ids, pts, attention_mask=b.attention_mask)
        with torch.inference_mode():
            for L, pt in zip(layers, pts):
                zs[L].append(saes[L].encode(acts[pt]).float()[b.content_mask()])
    encode_s = time.perf_counter() - t
    zs = {L: torch.cat(v) for L, v in zs.items()}
    T = zs[layers[0]].shape[0]
    pairs = [(L, L + 1) for L in layers if L + 1 in zs]
    t = time.perf_counter()
    for u, d in pairs:
        acc = PairAccumulator(zs[u].shape[1], zs[d].shape[1])
        for i in range(0, T, 4096):
            acc.update(zs[u][i:i + 4096], zs[d][i:i + 4096])
        acc.pairs()
    sparse_s = time.perf_counter() - t
    n = zs[layers[0]].shape[1]
    t = time.perf_counter()
    for u, d in pairs:
        Cd, Pd = torch.zeros(n, n), torch.zeros(n, n)
        for i in range(0, T, 4096):
            dense_update(Cd, Pd, zs[u][i:i + 4096], zs[d][i:i + 4096])
    dense_s = time.perf_counter() - t
    return {"case": f"embedded pack, {len(pairs)} adjacent resid_post pairs, width {n}",
            "tokens": T, "forward_and_encode_s": round(encode_s, 1),
            "sparse_pairs_s": round(sparse_s, 1), "dense_pairs_s": round(dense_s, 1),
            "sparse_tokens_per_s_with_encode": round(T / (encode_s + sparse_s), 1),
            "dense_tokens_per_s_with_encode": round(T / (encode_s + dense_s), 1),
            "speedup_pairs_only": round(dense_s / sparse_s, 1),
            "speedup_with_encode": round((encode_s + dense_s) / (encode_s + sparse_s), 2)}


# --- device: the pre-issue-29 paths, kept verbatim for the old-vs-new comparison --------------
def _old_lists(z, active):
    """The old _nonzero_lists: [T, m] lists built on z's device, then copied to the host."""
    nz = z > 0 if active is None else (z != 0) | active
    t, f = nz.nonzero(as_tuple=True)
    T = z.shape[0]
    per_token = torch.bincount(t, minlength=T)
    m = int(per_token.max()) if T else 0
    dev = z.device
    slot = torch.arange(len(t), device=dev) - (per_token.cumsum(0) - per_token)[t]
    idx = torch.zeros(T, m, dtype=torch.long, device=dev)
    val = torch.zeros(T, m, dtype=torch.float64, device=dev)
    ok = torch.zeros(T, m, dtype=torch.bool, device=dev)
    idx[t, slot], val[t, slot], ok[t, slot] = f, z[t, f].double(), True
    return idx.cpu().numpy(), val.cpu().numpy(), ok.cpu().numpy(), ok.cpu().numpy()


def old_update(acc, z_up, z_down) -> None:
    """The old PairAccumulator.update, dense path, "active" = z > 0 (`acc` on the CPU: its
    per-feature sums are numpy views this adds into, C and P CPU tensors)."""
    T = z_up.shape[0]
    acc.n_tokens += T
    iu, vu, nz_u, on_u = _old_lists(z_up, None)
    id_, vd, nz_d, on_d = _old_lists(z_down, None)
    for idx, val, nz, on, side in ((iu, vu, nz_u, on_u, "up"), (id_, vd, nz_d, on_d, "down")):
        d = getattr(acc, f"d_{side}")
        f, v = idx[nz], val[nz]
        getattr(acc, f"n_{side}")[:] += np.bincount(idx[on], minlength=d)
        getattr(acc, f"s_{side}")[:] += np.bincount(f, weights=v, minlength=d)
        getattr(acc, f"q_{side}")[:] += np.bincount(f, weights=v * v, minlength=d)
        np.maximum.at(getattr(acc, f"max_{side}"), f, v)
    step = max(1, acc.max_block_pairs // max(1, iu.shape[1] * id_.shape[1]))
    for a in range(0, T, step):
        b = slice(a, a + step)
        both = nz_u[b, :, None] & nz_d[b, None, :]
        keys = (iu[b, :, None] * acc.d_down + id_[b, None, :])[both]
        prods = (vu[b, :, None] * vd[b, None, :])[both]
        on = (on_u[b, :, None] & on_d[b, None, :])[both]
        kt = torch.from_numpy(keys)
        acc.C.index_add_(0, kt, torch.from_numpy(on).to(torch.int32))
        acc.P.index_add_(0, kt, torch.from_numpy(prods))


def _old_offer(self, key, act, feat, flat_tok, z, batch, W_left: int, W_right: int) -> None:
    """The old _Reservoir.offer (boolean-mask indexing: a host sync each)."""
    d, n = self.key.shape
    if key.numel() == 0:
        return
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
    new_key, pos = torch.cat([self.key, cand_key], 1).topk(n, dim=1)
    from_new = pos >= n
    fo, jo = (~from_new).nonzero(as_tuple=True)
    po = pos[fo, jo]
    value, doc, tok = self.value.clone(), self.doc.clone(), self.tok.clone()
    win_ids, win_act = self.win_ids.clone(), self.win_act.clone()
    value[fo, jo], doc[fo, jo], tok[fo, jo] = self.value[fo, po], self.doc[fo, po], self.tok[fo, po]
    win_ids[fo, jo], win_act[fo, jo] = self.win_ids[fo, po], self.win_act[fo, po]
    fn, jn = from_new.nonzero(as_tuple=True)
    if len(fn):
        c = cand_idx[fn, pos[fn, jn] - n]
        ft = flat_tok[c]
        B, T = batch.input_ids.shape
        b, t = ft // T, ft % T
        offs = torch.arange(-W_left, W_right + 1, device=dev)
        p = t[:, None] + offs[None, :]
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


def _old_slot_update(self, z, batch, content, cfg) -> None:
    """The old _SlotStats.update (bincount, index_add_ and a pageable copy of the sample keys)."""
    B, T, d = z.shape
    z = z * content[..., None].to(z.dtype)
    flat = z.reshape(B * T, d)
    tok, feat = flat.nonzero(as_tuple=True)
    val = flat[tok, feat].float()
    self.count += torch.bincount(feat, minlength=d)
    self.total.index_add_(0, feat, val.double())
    self.max = torch.maximum(self.max, torch.zeros_like(self.max).scatter_reduce(
        0, feat, val, "amax"))
    bins = (torch.bucketize(val, self.edges) - 1).clamp(0, self.hist.shape[1] - 1)
    self.hist.view(-1).index_add_(0, feat * self.hist.shape[1] + bins, torch.ones_like(bins))
    self.top.offer(val, val, feat, tok, z, batch, cfg.window_left, cfg.window_right)
    u = torch.rand(len(val), generator=self.gen).to(val.device)
    self.sample.offer(u, val, feat, tok, z, batch, cfg.window_left, cfg.window_right)


def topk_codes(n: int, T: int, d: int, k: int, device, seed: int = 0) -> list[torch.Tensor]:
    """n SAEs' random TopK codes [T, d] made on `device` (power-law feature frequencies; the
    same codes for the same seed on one kind of device)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    freq = (1.0 / torch.arange(1, d + 1, device=dev).float() ** 0.7).log()
    out = []
    for _ in range(n):
        gumbel = torch.rand(T, d, generator=g, device=dev).log().neg().log()
        score = freq[torch.randperm(d, generator=g, device=dev)] - gumbel
        top = score.topk(k, dim=1).indices  # Gumbel top-k: k distinct features per token
        vals = torch.rand(T, k, generator=g, device=dev) * 4 + 0.1
        out.append(torch.zeros(T, d, device=dev).scatter_(1, top, vals))
    return out


def _timed(fn, dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def _bench_stats_device(zs, args, dev) -> dict:
    from saeflow.evolution.sums import PairAccumulator, codes_of

    d, T, B = args.width, args.tokens, args.batch
    old = [PairAccumulator(d, d) for _ in range(args.pairs)]  # on the CPU, as they were
    new = [PairAccumulator(d, d, device=dev) for _ in range(args.pairs)]

    def run_old():
        for a in range(0, T, B):
            for p, acc in enumerate(old):
                old_update(acc, zs[p][a:a + B], zs[p + 1][a:a + B])

    def run_new():
        for a in range(0, T, B):
            codes = [codes_of(z[a:a + B]) for z in zs]  # each SAE once, as StatsShard does
            for p, acc in enumerate(new):
                acc.update_codes(codes[p], codes[p + 1])

    s_old, s_new = _timed(run_old, dev), _timed(run_new, dev)
    rel = max(float(((a.P.cpu() - b.P) / b.P.abs().clamp(min=1e-300)).abs().max())
              for a, b in zip(new, old))
    return {"stats_old_tok_s": round(T * args.pairs / s_old), "stats_new_tok_s":
            round(T * args.pairs / s_new), "stats_new_over_old": round(s_old / s_new, 2),
            "C_equal": all(torch.equal(a.C.cpu(), b.C) for a, b in zip(new, old)),
            "P_max_rel_diff": rel, "P_within_1e-12": rel <= 1e-12}


def _bench_index_device(zs, args, dev) -> dict:
    from saeflow.features.index import IndexConfig, _Reservoir, _SlotStats
    from saeflow.lm.corpora import TokenBatch

    cfg, T, B, ctx = IndexConfig(), args.tokens, args.batch, 128
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50_000, (T // ctx, ctx), generator=g).to(dev)
    tok = torch.arange(ctx, device=dev).repeat(T // ctx, 1) - 1
    old_stats = type("OldSlotStats", (_SlotStats,), {"update": _old_slot_update})
    old_reservoir = type("OldReservoir", (_Reservoir,), {"offer": _old_offer})
    stats = {name: [_SlotStats(args.width, cfg, seed=i, device=dev) for i in range(len(zs))]
             for name in ("old", "new")}
    for st in stats["old"]:  # the same statistics running the old methods
        st.__class__, st.top.__class__, st.sample.__class__ = (old_stats, old_reservoir,
                                                               old_reservoir)

    def run(name):
        for a in range(0, T // ctx, B // ctx):
            b = slice(a, a + B // ctx)
            batch = TokenBatch(ids[b], torch.ones_like(ids[b]), tok[b] * 0 + a, tok[b])
            for st, z in zip(stats[name], zs):
                st.update(z[a * ctx:(a + B // ctx) * ctx].view(-1, ctx, args.width), batch,
                          batch.token_index >= 0, cfg)

    s_old, s_new = _timed(lambda: run("old"), dev), _timed(lambda: run("new"), dev)
    same = all(_same_state(a.state(), b.state(), exact=dev.type == "cpu")
               for a, b in zip(stats["new"], stats["old"]))
    n = T * len(zs)
    return {"index_old_tok_s": round(n / s_old), "index_new_tok_s": round(n / s_new),
            "index_new_over_old": round(s_old / s_new, 2), "index_tables_equal": same}


def _same_state(a: dict, b: dict, exact: bool) -> bool:
    """Equal running statistics: every tensor on the CPU; on a GPU the keys and counts (ties
    among equal keys may pick other entries there, and float sums differ by rounding)."""
    for k, v in a.items():
        if isinstance(v, dict):
            if not _same_state(v, b[k], exact):
                return False
        elif isinstance(v, torch.Tensor) and (exact or k in ("key", "count", "hist", "max")):
            if not torch.equal(v, b[k]):
                return False
    return True


def bench_device(args) -> dict:
    dev = torch.device(args.device)
    zs = topk_codes(args.pairs + 1, args.tokens, args.width, args.k, dev)
    res = {"case": f"{args.pairs} pairs of TopK SAEs, width {args.width}, k {args.k}, "
                   f"{args.tokens} tokens in batches of {args.batch}, on {dev}"}
    res.update(_bench_stats_device(zs, args, dev))
    res.update(_bench_index_device(zs, args, dev))
    return res


# --- consumers: the pass's statistics and eval consumers at the family's shape -----------------
VIEW_OPS = {"view", "_unsafe_view", "reshape", "as_strided", "slice", "select", "expand", "t",
            "unsqueeze", "squeeze", "detach", "alias", "transpose", "permute", "unbind", "split",
            "_reshape_alias", "lift_fresh", "empty", "empty_like", "new_empty", "view_as"}
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique",
            "_unique2", "item", "bincount"}


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """aten ops dispatched (on a GPU each is a kernel launch; views and no-op casts aside) and
    those that make the host wait for a GPU (scalar reads, data-dependent sizes)."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        idx = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else []
        self.syncs += name in SYNC_OPS or any(i is not None and i.dtype == torch.bool
                                              for i in idx)
        self.ops += name not in VIEW_OPS and not (name in ("to", "contiguous")
                                                  and out is args[0])
        return out


def _family(args, dev):
    """The embedded family's statistics targets (resid_post adjacent pairs, flow predecessors
    of every layer) and eval plan, `--layers` layers x 3 positions of width `--width`."""
    from saeflow.evolution.shard import LayerPredecessors, StatsTargets
    from saeflow.ids import Slot
    from saeflow.saes.sae import random_sae

    W, n = args.width, args.layers
    slots = sorted(Slot(p, L) for L in range(n) for p in ("resid_post", "mlp_out", "attn_out"))
    g = np.random.default_rng(0)
    preds = {}
    for L in range(n):
        origins = {"res": Slot("resid_post", L - 1) if L else None,
                   "mlp": Slot("mlp_out", L), "attn": Slot("attn_out", L)}
        preds[L] = LayerPredecessors({o: np.where(g.random(W) < 0.1, -1, g.integers(0, W, W))
                                      for o, s in origins.items() if s}, origins)
    pairs = [(Slot("resid_post", L), Slot("resid_post", L + 1)) for L in range(n - 1)]
    targets = StatsTargets(pairs, slots, dict.fromkeys(slots, W), None, None, preds)
    saes = {s: random_sae(args.d_in, W, "topk", k=args.k, seed=i).to(dev)
            for i, s in enumerate(slots)}
    plan = {"slots": slots, "sae_of": saes.__getitem__, "d": dict.fromkeys(slots, W),
            "d_in": dict.fromkeys(slots, args.d_in)}
    return targets, plan


def bench_consumers(args) -> dict:
    """Per batch of --batch tokens: StatsShard.on_batch and eval's _Reconstruction / _Firing
    (ops dispatched, would-be host syncs, tokens/s of the fastest of --batches), on the library
    on PYTHONPATH; with --baseline-src DIR the same in a child process on DIR/src, its states
    compared with these."""
    from saeflow.evolution.shard import StatsShard
    from saeflow.saes.evaluate import _Firing, _Reconstruction

    dev = torch.device(args.device)
    if args.stacked:  # a GPU's layout of the pair sums on any device
        StatsShard.stacked_sums = True
    targets, plan = _family(args, dev)
    B, ctx = args.batch // 128, 128
    g = torch.Generator().manual_seed(1)
    acts = {s: torch.randn(B, ctx, args.d_in, generator=g).to(dev) for s in plan["slots"]}
    content = torch.ones(B, ctx, dtype=torch.bool)
    content[:, 0] = False  # BOS
    parts = {"stats": StatsShard(targets, 0, dev), "recon": _Reconstruction(plan, 0, dev),
             "firing": _Firing(plan, 0, dev)}
    res: dict = {"case": f"{len(plan['slots'])} SAEs of width {args.width} (k {args.k}), "
                         f"{len(targets.pairs)} pairs, batches of {args.batch} tokens, {dev}"}
    seconds: dict = {n: [] for n in parts}
    for i in range(args.batches + 2):  # a warm-up batch, one counted, the timed ones
        z = {s: codes.view(B, ctx, -1) for s, codes in zip(plan["slots"], topk_codes(
            len(plan["slots"]), args.batch, args.width, args.k, dev, seed=i))}
        for name, part in parts.items():
            if i == 1:
                with OpCounter() as c:
                    part.on_batch(z, None, content, acts)
                res[name] = {"ops_per_batch": c.ops, "syncs_per_batch": c.syncs}
            else:
                seconds[name].append(_timed(partial(part.on_batch, z, None, content, acts), dev))
        z = {}  # (freed before the next batch's codes are made)
    for name, t in seconds.items():
        # the fastest batch: other work on a shared machine only ever slows one down
        res[name]["tok_s"] = round(args.batch / min(t[1:]))
    if args.save_state:
        torch.save({n: p.state() for n, p in parts.items()}, args.save_state)
    if args.baseline_src:
        res.update(_consumers_baseline(args, res, {n: p.state() for n, p in parts.items()}))
    return res


def _consumers_baseline(args, res: dict, states: dict) -> dict:
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "state.pt"
        cmd = [sys.executable, __file__, "consumers", "--save-state", str(saved)] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
            ("device", "width", "k", "batch", "batches", "layers", "d_in")] + (
            ["--stacked"] if args.stacked else [])
        env = dict(os.environ, PYTHONPATH=str(Path(args.baseline_src).resolve() / "src"))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            return {"baseline_error": out.stderr.strip().splitlines()[-3:]}
        base = json.loads(out.stdout[out.stdout.index("{"):])
        old = torch.load(saved, weights_only=False)
    exact = args.device == "cpu"
    return {"baseline": {n: base[n] for n in states},
            "new_over_old_tok_s": {n: round(res[n]["tok_s"] / base[n]["tok_s"], 2)
                                   for n in states},
            "states_equal": {n: _equal_states(states[n], old[n], exact) for n in states}}


def _equal_states(a, b, exact: bool) -> bool:
    """Equal nested states: tensors and arrays exactly (float ones to 1e-12 off the CPU)."""
    if isinstance(a, dict):
        return list(a) == list(b) and all(_equal_states(a[k], b[k], exact) for k in a)
    if isinstance(a, (torch.Tensor, np.ndarray)):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if exact or not a.is_floating_point():
            return torch.equal(a, b)
        return torch.allclose(a, b, rtol=1e-12, atol=0)
    return a == b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["synthetic", "embedded", "device", "consumers"])
    ap.add_argument("--width", type=int, default=24576)
    ap.add_argument("--l0", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dense-tokens", type=int, default=1024,
                    help="synthetic: tokens the dense reference is timed on (it is slow)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--device", default="cpu", help="device: where the codes and sums live")
    ap.add_argument("--k", type=int, default=32, help="device: active features per token")
    ap.add_argument("--pairs", type=int, default=4, help="device: SAE pairs (a chain)")
    ap.add_argument("--layers", type=int, default=18, help="consumers: layers (3 SAEs each)")
    ap.add_argument("--d-in", type=int, default=640, help="consumers: the SAEs' input width")
    ap.add_argument("--batches", type=int, default=2, help="consumers: batches timed")
    ap.add_argument("--baseline-src", default=None,
                    help="consumers: also run an older checkout's library (DIR/src)")
    ap.add_argument("--stacked", action="store_true",
                    help="consumers: the pairs' C and P stacked (a GPU's layout) on any device")
    ap.add_argument("--save-state", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    modes = {"synthetic": bench_synthetic, "embedded": bench_embedded, "device": bench_device,
             "consumers": bench_consumers}
    res = modes[args.mode](args)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

"""The index pass's per-batch bookkeeping, SAE by SAE (before issue 29's grouping) against the
SAEs of one width as one group (`features/index._GroupStats`), in one run, on random TopK codes.

On a GPU the bookkeeping is host-bound: each `_SlotStats.update` is ~100 small ops, each a
kernel launch of a few microseconds on a few thousand features. The proxy measured here on the
CPU is the number of aten ops dispatched per batch (a TorchDispatchMode counter): the kernel
launches a GPU would do, less the sample-key draws (`rand` on each SAE's CPU generator: host
work on any device, counted apart). Also counted: nonzero() calls (each a host sync on a
GPU; the grouped path adds one more: the entries per SAE, a .tolist()).

Paths, each over the same `--batches` batches of `--tokens` tokens for `--slots` SAEs:
  old: the pre-grouping `_SlotStats.update` / `_Reservoir.offer` (copied below), per SAE;
  alone: the current code with each SAE a group of its own (what the pass does on the CPU);
  group: all the SAEs in one `_GroupStats`, codes stacked into [S, B, T, d] (what the pass
      does on a GPU; one more copy of every code in memory).
Prints ops per batch (counted on the first batch, a warm-up: any batch takes the same ops),
tokens per second of the whole bookkeeping on `--device` (the batches after the first), and
whether every SAE's state equals the old one bit for bit (on a GPU: keys, counts, maxima).

    .venv/bin/python benchmarks/bench_index_ops.py [--slots 54 --width 4096 --k 32 \\
        --tokens 4096 --batches 2 --distinct 3 --no-group --device cuda]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saeflow.features.index import IndexConfig, _GroupStats, _Reservoir, _SlotStats
from saeflow.lm.corpora import TokenBatch
from saeflow.saes.scan import add_at, to_device


class _OldReservoir(_Reservoir):
    def offer(self, key, act, feat, flat_tok, z, batch, W_left: int, W_right: int) -> None:
        """_Reservoir.offer before the grouping (commit b29fa0f): z [B, T, d] one SAE's."""
        d, n = self.key.shape
        if key.numel() == 0:
            return
        o = torch.argsort(key, descending=True, stable=True)
        o = o[torch.argsort(feat[o], stable=True)]
        f_sorted = feat[o]
        dev = key.device
        rank = torch.arange(len(o), device=dev) - torch.searchsorted(f_sorted, f_sorted)
        col = rank.clamp(max=n)
        cand_key = torch.full((d, n + 1), float("-inf"), device=dev)
        cand_key[f_sorted, col] = key[o]
        cand_idx = torch.full((d, n + 1), -1, dtype=torch.long, device=dev)
        cand_idx[f_sorted, col] = o
        cand_key, cand_idx = cand_key[:, :n], cand_idx[:, :n]
        new_key, pos = torch.cat([self.key, cand_key], 1).topk(n, dim=1)
        from_new = pos >= n
        po = pos.clamp(max=n - 1)
        W = self.win_ids.shape[2]
        value, doc, tok = (getattr(self, k).gather(1, po) for k in ("value", "doc", "tok"))
        pw = po[..., None].expand(-1, -1, W)
        win_ids, win_act = self.win_ids.gather(1, pw), self.win_act.gather(1, pw)
        fn, jn = from_new.nonzero(as_tuple=True)
        if len(fn):
            c = cand_idx[fn, pos[fn, jn] - n]
            ft = flat_tok[c]
            B, T = batch.input_ids.shape
            b, t = ft // T, ft % T
            offs = torch.arange(-W_left, W_right + 1, device=dev)
            p = t[:, None] + offs[None, :]
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


class _OldSlotStats(_SlotStats):
    def __init__(self, d: int, cfg: IndexConfig, seed: int, device=None):
        super().__init__(d, cfg, seed, device)
        self.top.__class__ = self.sample.__class__ = _OldReservoir

    def update(self, z, batch, content, cfg) -> None:
        """_SlotStats.update before the grouping (commit b29fa0f)."""
        B, T, d = z.shape
        z = z * content[..., None].to(z.dtype)
        flat = z.reshape(B * T, d)
        tok, feat = flat.nonzero(as_tuple=True)
        val = flat[tok, feat].float()
        self.count.index_add_(0, feat, torch.ones_like(feat))
        add_at(self.total, feat, val.double())
        self.max = torch.maximum(self.max, torch.zeros_like(self.max).scatter_reduce(
            0, feat, val, "amax"))
        bins = (torch.bucketize(val, self.edges) - 1).clamp(0, self.hist.shape[1] - 1)
        self.hist.view(-1).index_add_(0, feat * self.hist.shape[1] + bins,
                                      torch.ones_like(bins))
        self.top.offer(val, val, feat, tok, z, batch, cfg.window_left, cfg.window_right)
        u = to_device(torch.rand(len(val), generator=self.gen), val.device)
        self.sample.offer(u, val, feat, tok, z, batch, cfg.window_left, cfg.window_right)


class _OpCounter(TorchDispatchMode):
    """aten ops dispatched: all, the sample-key draws (host work anywhere), nonzero()."""

    def __init__(self):
        super().__init__()
        self.ops = self.rand = self.nonzero = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops += 1
        self.rand += name == "rand"
        self.nonzero += name == "nonzero"
        return func(*args, **(kwargs or {}))


def topk_codes(n: int, T: int, d: int, k: int, seed: int = 0) -> torch.Tensor:
    """[n, T, d] random TopK codes: k distinct features per token (Gumbel top-k on power-law
    frequencies), activations in [0.1, 4.1) rounded to 1/8 so that they tie."""
    g = torch.Generator().manual_seed(seed)
    logf = (1.0 / torch.arange(1, d + 1).float() ** 0.7).log()
    out = torch.zeros(n, T, d)
    for i in range(n):
        score = logf[torch.randperm(d, generator=g)] - torch.rand(T, d, generator=g).log().neg().log()
        top = score.topk(k, dim=1).indices
        out[i].scatter_(1, top, ((torch.rand(T, k, generator=g) * 4 + 0.1) * 8).round() / 8)
    return out


def _batches(args):
    """(codes of each SAE [B, T, d] (views: SAE j reads codes[j % distinct]), batch, content)."""
    ctx, B, dev = args.ctx, args.tokens // args.ctx, torch.device(args.device)
    codes = topk_codes(args.distinct, args.batches * args.tokens, args.width, args.k).to(dev)
    g = torch.Generator().manual_seed(1)
    for i in range(args.batches):
        ids = torch.randint(0, 50_000, (B, ctx), generator=g)
        tok = torch.arange(ctx).repeat(B, 1) - 1  # token 0 of each context: BOS, not content
        doc = torch.arange(B)[:, None] + B * i + 0 * ids
        z = codes[:, i * args.tokens:(i + 1) * args.tokens].view(args.distinct, B, ctx, -1)
        yield [z[j % args.distinct] for j in range(args.slots)], \
            TokenBatch(*(t.to(dev) for t in (ids, torch.ones_like(ids), doc, tok))), \
            (tok >= 0).to(dev)


def run_path(name: str, args, cfg) -> tuple[dict, list[dict]]:
    """One path over every batch: its figures and each SAE's final state."""
    seeds = [cfg.seed * 1000 + j for j in range(args.slots)]
    if name in ("old", "alone"):
        own = [(_OldSlotStats if name == "old" else _SlotStats)(args.width, cfg, seed=s,
                                                                device=args.device)
               for s in seeds]

        def step(zs, b, content):
            for st, z in zip(own, zs):
                st.update(z, b, content, cfg)
    else:
        group = _GroupStats(args.width, cfg, seeds, device=args.device)

        def step(zs, b, content):
            group.update_group(zs, b, content, cfg)
    seconds, count = 0.0, _OpCounter()
    for i, (zs, b, content) in enumerate(_batches(args)):
        if i == 0:  # a warm-up, its ops counted (any batch takes the same ops)
            with count:
                step(zs, b, content)
            continue
        t0 = time.perf_counter()
        step(zs, b, content)
        if args.device != "cpu":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
    states = ([st.state() for st in own] if name != "group"
              else [group.slot(j).state() for j in range(args.slots)])
    return {"ops_per_batch": count.ops - count.rand, "sample_key_draws": count.rand,
            "nonzero_calls": count.nonzero, "seconds": round(seconds, 2),
            "tok_s": round((args.batches - 1) * args.tokens / seconds)}, states


def _same_bits(a, b, exact: bool = True) -> bool:
    """Equal states; not `exact` (a GPU): the keys, counts and maxima only (its ties may pick
    other entries, its float sums round otherwise)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(
            _same_bits(a[k], b[k], exact) for k in a
            if exact or k in ("top", "sample", "key", "count", "hist", "max"))
    if a.dtype.is_floating_point:
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(ints), b.view(ints)
    return torch.equal(a, b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=54, help="SAEs of one width")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32, help="active features per token")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batches", type=int, default=2, help="at least 2 (the first: warm-up)")
    ap.add_argument("--distinct", type=int, default=3,
                    help="distinct code tensors, shared round robin by the SAEs (memory)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the GPU's own timings")
    ap.add_argument("--no-group", action="store_true",
                    help="skip the grouped path (it holds one more copy of all the codes)")
    args = ap.parse_args()
    cfg = IndexConfig()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    res: dict = {"case": f"{args.slots} TopK SAEs of width {args.width}, k {args.k}, "
                         f"{args.batches} batches of {args.tokens} tokens, n_top {cfg.n_top}, "
                         f"n_samples {cfg.n_samples}, window {cfg.window}, on {args.device}"}
    # a process's first pass over such tensors is slow (allocator, page faults): untimed
    run_path("alone", argparse.Namespace(**{**vars(args), "slots": min(args.slots, 6)}), cfg)
    old, ref = run_path("old", args, cfg)
    res["old"] = old
    for name in ("alone", "group")[:1 if args.no_group else 2]:
        fig, states = run_path(name, args, cfg)
        fig["equal_to_old"] = all(_same_bits(a, b, args.device == "cpu")
                                  for a, b in zip(states, ref))
        fig["ops_old_over_new"] = round(old["ops_per_batch"] / fig["ops_per_batch"], 1)
        fig["speed_new_over_old"] = round(old["seconds"] / fig["seconds"], 2)
        res[name] = fig
        del states
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

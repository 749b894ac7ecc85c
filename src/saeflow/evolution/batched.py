"""The statistics pass's per-batch work over many pairs at once (issue 29): on a GPU each torch
op is a kernel launch and a few microseconds of host time, so a batch of the 54-SAE family must
not cost tens of small ops per pair.

- `feature_sums`: the per-feature sums (n, s, q, max) of a stack of SAEs' codes, one op each.
- `PairGroup`: dense pairs whose upstream codes share one stack and downstream codes another:
  their per-feature sums live in [pairs, d] tensors and, on a GPU, their C and P in one
  [pairs * d_up * d_down] tensor each, so that one block of tokens is one index_add_ (C) and one
  add_at (P) for all of them. Every PairAccumulator of the group holds views of these, so its
  state(), merge() and pairs() are those of every saeflow version.

The sums are those of `PairAccumulator.update_codes`, bit for bit on the CPU: every entry gets
the same terms in the same (token) order; P's float64 adds go through `add_at`, which on a GPU
sorts stably (index_put_ with accumulate) instead of index_add_'s atomics, so its sums come out
the same on every run.
"""
from __future__ import annotations

import torch

from saeflow.evolution.sums import SIDE_SUMS, Codes, PairAccumulator
from saeflow.saes.scan import add_at


def feature_sums(c: Codes, n_saes: int, d: int) -> dict[str, torch.Tensor]:
    """The per-feature sums of one batch of a stack of codes (`codes_of` of [S, T, d]):
    {n, s, q, max: [S, d]}, each formed from zero in entry order, as one pair's update forms
    them."""
    dev, size = c.val.device, n_saes * d
    return {"n": torch.zeros(size, dtype=torch.long, device=dev).index_add_(0, c.feat,
                                                                             c.on.long()),
            "s": add_at(torch.zeros(size, dtype=torch.float64, device=dev), c.feat, c.val),
            "q": add_at(torch.zeros(size, dtype=torch.float64, device=dev), c.feat,
                        c.val * c.val),
            "max": torch.zeros(size, dtype=torch.float64, device=dev).scatter_reduce_(
                0, c.feat, c.val, "amax")}


def _lists(c: Codes, rows: torch.Tensor) -> Codes:
    """The lists of the SAEs `rows` of a stack: [P, T, m] each (one gather a field)."""
    idx, lval, ok = (x.index_select(0, rows) for x in (c.idx, c.lval, c.ok))
    lon = ok if c.lon is c.ok else c.lon.index_select(0, rows)
    return c._replace(idx=idx, lval=lval, ok=ok, lon=lon)


class PairGroup:
    """Dense PairAccumulators (one d_up, one d_down) updated together from two stacks of codes:
    pair p reads row up_rows[p] of the upstream stack and down_rows[p] of the downstream one.

    stacked: C and P of all pairs in one tensor each (the default on a GPU: a block of tokens
    is then two launches for all the pairs); otherwise each pair keeps its own C and P (the CPU:
    no launches to save, and a pair's state is then its own memory, written without a copy).
    max_pairs: co-nonzero pairs materialised at once over all pairs of the group (None: each
    pair's max_block_pairs, summed; with separate sums on the CPU: the largest of them).
    """

    def __init__(self, accs: list[PairAccumulator], up_rows: list[int], down_rows: list[int],
                 stacked: bool | None = None, max_pairs: int | None = None):
        a0 = accs[0]
        self.accs, dev = accs, torch.device(a0.device or "cpu")
        self.d_up, self.d_down = a0.d_up, a0.d_down
        if any((a.d_up, a.d_down, a.device) != (self.d_up, self.d_down, dev) or not a.dense
               for a in accs):
            raise ValueError("a PairGroup holds dense pairs of one shape on one device")
        self.rows = {"up": torch.tensor(up_rows, device=dev),
                     "down": torch.tensor(down_rows, device=dev)}
        self.stacked = dev.type != "cpu" if stacked is None else stacked
        self.max_pairs = max_pairs or (sum(a.max_block_pairs for a in accs) if self.stacked
                                       else max(a.max_block_pairs for a in accs))
        P = len(accs)
        # per-feature sums: {name: {side: [P, d_side]}}; each accumulator's are views of them
        self.sums = {name: {side: torch.stack([a._sums[f"{name}_{side}"] for a in accs])
                            for side in ("up", "down")} for name, _ in SIDE_SUMS}
        for p, a in enumerate(accs):
            a._sums = {f"{name}_{side}": self.sums[name][side][p]
                       for name, _ in SIDE_SUMS for side in ("up", "down")}
            a.grouped, a.stacked = True, self.stacked
        if self.stacked:
            D = self.d_up * self.d_down
            self.C = torch.stack([a.C for a in accs]).view(-1)  # [P * D]
            self.P = torch.stack([a.P for a in accs]).view(-1)
            for p, a in enumerate(accs):
                a.C, a.P = self.C[p * D:(p + 1) * D], self.P[p * D:(p + 1) * D]
            self.offset = torch.arange(P, device=dev)[:, None] * D  # [P, 1]

    def update(self, up: Codes, down: Codes, sums_up: dict, sums_down: dict) -> None:
        """One batch: up, down the two stacks' codes on the same T tokens (down may be up),
        sums_* their `feature_sums`."""
        T = up.idx.shape[1]
        for acc in self.accs:
            acc.n_tokens += T
        for side, fs, d in (("up", sums_up, self.d_up), ("down", sums_down, self.d_down)):
            rows = self.rows[side]
            for name, _ in SIDE_SUMS:
                cur, new = self.sums[name][side], fs[name].view(-1, d)[rows]  # [P, d]
                if name == "max":
                    torch.maximum(cur, new, out=cur)
                else:
                    cur += new
        U, D = _lists(up, self.rows["up"]), _lists(down, self.rows["down"])
        full = up.full and down.full
        step = max(1, self.max_pairs // max(1, len(self.accs) * U.idx.shape[2]
                                            * D.idx.shape[2]))
        for a in range(0, T, step):
            self._add_block(U, D, slice(a, a + step), full)

    def _add_block(self, U: Codes, D: Codes, b: slice, full: bool) -> None:
        """The co-nonzero pairs of the tokens b of every pair: keys i * d_down + j, [P, n]."""
        P = len(self.accs)
        keys = (U.idx[:, b, :, None] * self.d_down + D.idx[:, b, None, :]).reshape(P, -1)
        prods = (U.lval[:, b, :, None] * D.lval[:, b, None, :]).reshape(P, -1)
        on = (U.lon[:, b, :, None] & D.lon[:, b, None, :]).reshape(P, -1).to(torch.int32)
        ok = None if full else (U.ok[:, b, :, None] & D.ok[:, b, None, :]).reshape(P, -1)
        if self.stacked:  # one launch each for all pairs; padding compressed away (one sync)
            keys, prods, on = (keys + self.offset).view(-1), prods.view(-1), on.view(-1)
            if ok is not None:
                sel = ok.view(-1).nonzero().squeeze(1)
                keys, prods, on = keys[sel], prods[sel], on[sel]
            self.C.index_add_(0, keys, on)
            add_at(self.P, keys, prods)
            return
        for p, acc in enumerate(self.accs):
            k, pr, o = keys[p], prods[p], on[p]
            if ok is not None:
                sel = ok[p].nonzero().squeeze(1)
                k, pr, o = k[sel], pr[sel], o[sel]
            acc.C.index_add_(0, k, o)
            add_at(acc.P, k, pr)



def _take_into(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> None:
    """out[...] = src.flatten()[index] (one launch where the dtypes agree)."""
    if src.dtype == out.dtype:
        torch.take(src, index, out=out)
    else:
        out.copy_(torch.take(src, index))


class PredecessorCounts:
    """The predecessor-group and co-firing counts of the layers whose resid_post SAEs share one
    stack of codes (width d), all layers at once: for every active resid_post feature on every
    content token, which of its top-1 data-free predecessors (RES / MLP / ATT) are active there
    too. The counts are [layers, 4, d] (co-firing) and [layers, 8] (groups, by RES + 2 MLP +
    4 ATT); the shard's per-layer counts are views of them.

    layers: {L: LayerPredecessors}, r_rows: each layer's resid_post row in the stack; where:
    {slot: (stack width, row)} of the stacked SAEs (a predecessor in a stack is read there,
    one launch for all of them; any other from the pass's codes, one launch each);
    thresholds: {slot: [d] float32} ("active" is z > it), None: z > 0.
    """

    def __init__(self, layers: dict, r_rows: list[int], d: int, where: dict, widths: dict,
                 thresholds: dict | None, device):
        dev = self.dev = torch.device(device)
        n = len(layers)
        self.cofire = torch.zeros(n, 4, d, dtype=torch.long, device=dev)
        self.groups = torch.zeros(n, 8, dtype=torch.long, device=dev)
        self.r_rows = torch.tensor(r_rows, device=dev)
        self.base = torch.arange(n, device=dev) * (4 * d)  # row 0 (every active target)
        self.eight = torch.arange(8, device=dev)
        look = []  # the stacked predecessors first, by stack; then the others
        for li, info in enumerate(layers.values()):
            for row, (bit, origin) in enumerate(((1, "res"), (2, "mlp"), (4, "attn")), start=1):
                slot = info.slots.get(origin)
                if slot is None or origin not in info.top1:
                    continue
                w, srow = where.get(slot, (-1, -1))
                look.append((w < 0, w, srow, li, row, bit, slot, info.top1[origin]))
        look.sort(key=lambda x: x[:3])
        self.n_look = len(look)
        if not look:
            return
        col = list(zip(*look))
        self.g_layer = torch.tensor(col[3], device=dev)
        self.g_cell = (self.g_layer * 4 + torch.tensor(col[4], device=dev)) * d
        self.g_bit = torch.tensor(col[5], device=dev)
        self.g_base = torch.arange(len(look), device=dev) * d  # into the [G, d] tables
        # [G, d]: the top-1 predecessor of each resid_post feature (-1: none), and the
        # threshold its activation must pass to count as active
        pred = torch.stack([torch.as_tensor(t, dtype=torch.long) for t in col[7]])
        self.pred = pred.to(dev)
        self.thr = None if thresholds is None else torch.stack(
            [thresholds[s].cpu()[p.clamp(min=0)] for s, p in zip(col[6], pred)]).to(dev)
        self.in_stack = []  # (first, end, stack width, [end - first] stack rows)
        for w in sorted({x[1] for x in look if not x[0]}):
            g = [i for i, x in enumerate(look) if not x[0] and x[1] == w]
            self.in_stack.append((g[0], g[-1] + 1, w,
                                  torch.tensor([look[i][2] for i in g], device=dev)))
        self.others = [(i, x[6]) for i, x in enumerate(look) if x[0]]
        self.d_other = torch.tensor([widths[s] for _, s in self.others], device=dev)

    def count(self, R, flats: dict, z: dict, rows: torch.Tensor) -> None:
        """R: the stack's codes (`codes_of` of [S, T, d]); flats {width: [S, T, width]} the
        stacked content codes; z {slot: [B, T', width]} the pass's codes; rows [T] their
        content rows."""
        F = R.idx.index_select(0, self.r_rows)  # [n, T, m] the active targets' features
        on = R.lon.index_select(0, self.r_rows)  # [n, T, m] bool (padding: False)
        n, T, m = F.shape
        cof = self.cofire.view(-1)
        cof.index_add_(0, (self.base[:, None, None] + F).view(-1), on.view(-1).long())
        code = torch.zeros_like(F)
        if self.n_look:
            Fg = F.index_select(0, self.g_layer)  # [G, T, m]
            at = self.g_base[:, None, None] + Fg
            pred = self.pred.view(-1)[at]  # [G, T, m] each target's predecessor, -1: none
            p = pred.clamp(min=0)  # (-1 reads feature 0 and is masked out: no sync)
            src = next(iter(flats.values())) if flats else z[self.others[0][1]]
            vals = torch.empty(Fg.shape, dtype=src.dtype, device=self.dev)  # [G, T, m]
            tok = torch.arange(T, device=self.dev)[None, :, None]
            for a, b, w, srows in self.in_stack:
                _take_into(vals[a:b], flats[w], (srows[:, None, None] * T + tok) * w + p[a:b])
            if self.others:
                o = self.others[0][0]
                at_z = rows[None, :, None] * self.d_other[:, None, None] + p[o:]
                for g, slot in self.others:
                    _take_into(vals[g], z[slot].to(self.dev), at_z[g - o])
            thr = 0 if self.thr is None else self.thr.view(-1)[at]
            fired = ((vals > thr) & (pred >= 0) & on.index_select(0, self.g_layer)).long()
            cof.index_add_(0, (self.g_cell[:, None, None] + Fg).view(-1), fired.view(-1))
            code.index_add_(0, self.g_layer, fired * self.g_bit[:, None, None])
        # [n, 8] counts by group: a compare-and-sum (an index_add_ into 8 bins would make every
        # GPU thread contend for the same 8 atomics)
        self.groups += ((code[..., None] == self.eight) & on[..., None]).sum((1, 2))

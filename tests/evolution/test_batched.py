"""The statistics pass's batched per-batch work (evolution/batched.py, issue 29): a StatsShard
updates its pairs as PairGroups and its predecessor counts for all layers at once; the sums are
those of one pair at a time (bit for bit on the CPU), in both layouts of C and P, and a batch
of TopK codes makes two host syncs and a number of launches that does not grow with the pairs."""
import functools
import io
import pickle

import numpy as np
import pytest
import torch
from fixtures import count_syncs

from saeflow.evolution import shard as shard_mod
from saeflow.evolution.shard import LayerPredecessors, StatsShard, StatsTargets
from saeflow.evolution.sums import PairAccumulator
from saeflow.ids import Slot

LAYERS = 4
WIDTH = {"resid_post": 37, "mlp_out": 37, "attn_out": 29}


def _codes(kind: str, T: int, d: int, seed: int) -> torch.Tensor:
    """[T, d] TopK codes (k 5), or ReLU-like ones with a varying number nonzero per token."""
    g = torch.Generator().manual_seed(seed)
    if kind == "topk":
        top = torch.rand(T, d, generator=g).topk(5, dim=1).indices
        return torch.zeros(T, d).scatter_(1, top, torch.rand(T, 5, generator=g) * 3 + 0.1)
    return (torch.rand(T, d, generator=g) < 0.15) * torch.rand(T, d, generator=g) * 3


def _targets(frac: float | None, pairs: str = "both") -> StatsTargets:
    g = np.random.default_rng(0)
    R = {L: Slot("resid_post", L) for L in range(LAYERS)}
    slots = sorted(Slot(p, L) for p in WIDTH for L in range(LAYERS))
    out = [(R[L], R[L + 1]) for L in range(LAYERS - 1)]
    if pairs in ("mlp", "both"):  # 37 x 37 too: the same PairGroup
        out += [(Slot("mlp_out", L), Slot("mlp_out", L + 1)) for L in range(LAYERS - 1)]
    if pairs == "both":
        out += [(Slot("attn_out", L), R[L]) for L in range(LAYERS)]
        out += [(Slot("mlp_out", L), R[L]) for L in (1, 2)]
    preds = {}
    for L in range(LAYERS):
        origins = {"res": R[L - 1] if L else None, "mlp": Slot("mlp_out", L),
                   "attn": Slot("attn_out", L) if L != 2 else None}
        top1 = {o: np.where(g.random(37) < 0.2, -1, g.integers(0, WIDTH[s.position], 37))
                for o, s in origins.items() if s is not None}
        preds[L] = LayerPredecessors(top1, origins)
    maxima = {s: np.full(WIDTH[s.position], 2.0, np.float32) for s in slots}
    return StatsTargets(out, slots, {s: WIDTH[s.position] for s in slots}, frac,
                        maxima if frac else None, preds)


def _batches(n: int, B: int = 3, T: int = 24):
    """n batches: ({slot: [B, T, d]} codes, content [B, T] bool)."""
    out = []
    for i in range(n):
        z = {Slot(p, L): _codes("relu" if p == "mlp_out" else "topk", B * T, d,
                                100 * i + 10 * L + j).view(B, T, d)
             for j, (p, d) in enumerate(WIDTH.items()) for L in range(LAYERS)}
        content = torch.ones(B, T, dtype=torch.bool)
        content[:, 0] = False
        content[1, T // 2:] = False
        out.append((z, content))
    return out


def _reference(targets: StatsTargets, batches) -> tuple[dict, dict, dict]:
    """One PairAccumulator per pair fed one batch at a time (the one-pair path; 37 x 37 pairs
    sparse), and the predecessor counts token by token in numpy."""
    acc = {pr: PairAccumulator(targets.widths[pr[0]], targets.widths[pr[1]], dense_limit=1200)
           for pr in targets.pairs}
    groups = {L: np.zeros(8, np.int64) for L in targets.predecessors}
    cofire = {L: np.zeros((4, targets.widths[Slot("resid_post", L)]), np.int64)
              for L in targets.predecessors}
    for z, content in batches:
        flat = {s: v[content] for s, v in z.items()}
        act = {s: v > (0 if targets.active_fraction is None
                       else torch.as_tensor(targets.maxima[s]) * targets.active_fraction)
               for s, v in flat.items()}
        for (u, d), a in acc.items():
            a.update(flat[u], flat[d], *((None, None) if targets.active_fraction is None
                                         else (act[u], act[d])))
        for L, info in targets.predecessors.items():
            on = act[Slot("resid_post", L)].numpy()
            for t, f in zip(*np.nonzero(on)):
                code = 0
                cofire[L][0, f] += 1
                for row, (bit, o) in enumerate(((1, "res"), (2, "mlp"), (4, "attn")), 1):
                    if info.slots.get(o) is None or info.top1[o][f] < 0:
                        continue
                    fired = bool(act[info.slots[o]][t, info.top1[o][f]])
                    code += bit * fired
                    cofire[L][row, f] += fired
                groups[L][code] += 1
    return acc, groups, cofire


def _same_tensor(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    if exact or not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("frac", [None, 0.5])
def test_shard_equals_one_pair_at_a_time_and_keeps_its_state_format(
        test_device, monkeypatch, stacked, frac):
    """Pairs of two shapes, ReLU lists with padding, a sparse pair, predecessors in and out of
    the stacks, -1 predecessors and absent origins; split over a saved, loaded and merged
    state. Exact on the CPU (float sums to 1e-12 on a GPU, which may add in another order)."""
    dev = torch.device(test_device)
    monkeypatch.setattr(StatsShard, "stacked_sums", stacked)
    # pairs of 37 x 37 above 1200 sums are kept sparse: the one-pair path inside the shard
    monkeypatch.setattr(shard_mod, "PairAccumulator",
                        functools.partial(PairAccumulator, dense_limit=1200))
    targets = _targets(frac)
    batches = _batches(4)
    ref, groups, cofire = _reference(targets, batches[:2])
    ref2, groups2, cofire2 = _reference(targets, batches[2:])
    for pr, a in ref.items():  # as the shards are merged: (b1 + b2) + (b3 + b4)
        a.merge(ref2[pr])
    first, second = StatsShard(targets, 0, dev), StatsShard(targets, 1, dev)
    assert {a.dense for a in first.acc.values()} == {True, False}
    for z, content in batches[:2]:
        first.on_batch({s: v.to(dev) for s, v in z.items()}, None, content)
    for z, content in batches[2:]:
        second.on_batch({s: v.to(dev) for s, v in z.items()}, None, content)
    st = first.state()
    buf = io.BytesIO()
    torch.save(st, buf)
    total = StatsShard(targets, 0, dev)
    total.load(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    total.merge(second)
    exact = dev.type == "cpu"
    for pr, a in total.acc.items():
        mine, theirs = a.state(), ref[pr].state()
        assert list(mine) == list(theirs)
        for k, v in mine.items():
            if isinstance(v, torch.Tensor):
                assert v.device.type == "cpu" and v.dtype == theirs[k].dtype, k
                # each tensor owns its memory: pickle writes no stacked neighbours
                assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
                assert _same_tensor(v, theirs[k], exact), (pr, k)
            else:
                assert v == theirs[k], (pr, k)
    for L in targets.predecessors:
        np.testing.assert_array_equal(total.group_counts[L], groups[L] + groups2[L])
        np.testing.assert_array_equal(total.cofire[L], cofire[L] + cofire2[L])
    tensors = sum(v.numel() * v.element_size() for a in st["pairs"].values()
                  for v in a.values() if isinstance(v, torch.Tensor))
    assert len(pickle.dumps(st)) < 1.2 * tensors + 100_000


class _Launches(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops dispatched (each a kernel launch on a GPU), views aside."""

    VIEWS = {"view", "_unsafe_view", "reshape", "as_strided", "slice", "select", "expand", "t",
             "unsqueeze", "squeeze", "detach", "alias", "transpose", "permute", "unbind",
             "split", "_reshape_alias", "lift_fresh", "empty", "empty_like", "view_as"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ not in self.VIEWS
        return func(*args, **(kwargs or {}))


def test_a_batch_of_topk_codes_is_two_syncs_and_launches_that_do_not_grow_with_pairs(
        test_device, monkeypatch):
    """Stacked sums (a GPU's layout): one batch of TopK codes syncs twice for each width of
    SAEs (the codes' size and width); launches grow with the SAEs and shapes, not the pairs."""
    dev = torch.device(test_device)
    monkeypatch.setattr(StatsShard, "stacked_sums", True)
    z = {Slot(p, L): _codes("topk", 64, WIDTH[p], 10 * L + j).view(2, 32, -1).to(dev)
         for j, p in enumerate(WIDTH) for L in range(LAYERS)}
    content = torch.ones(2, 32, dtype=torch.bool)
    launches = {}
    for pairs in ("adjacent", "mlp", "both"):
        shard = StatsShard(_targets(None, pairs), 0, dev)
        shard.on_batch(z, None, content)  # warm-up
        # two a width of SAEs (on the CPU the content rows' nonzero counts too: in a pass it
        # runs on the host, where content is)
        syncs = count_syncs(dev, lambda: shard.on_batch(z, None, content))
        assert syncs == 2 * len(shard.stacks) + (dev.type == "cpu")
        with _Launches() as c:
            shard.on_batch(z, None, content)
        launches[pairs] = c.n
    # 3 pairs more of the same shape: the 4 more SAEs' rows gathered into their stack
    assert launches["mlp"] - launches["adjacent"] <= 4
    # 6 more, 4 of another shape: one more stack (attn_out, 29 wide) and pair group
    assert len(_targets(None, "both").pairs) == 12
    assert launches["both"] - launches["mlp"] <= 80, launches

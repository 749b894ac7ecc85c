"""One shard of the statistics pass: the sums of every SAE pair, and the co-firing of each
resid_post feature with its top-1 data-free predecessors (from the flow in RUN)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saeflow.errors import MissingResultError, StatsError
from saeflow.evolution.batched import PairGroup, PredecessorCounts, feature_sums
from saeflow.evolution.sums import Codes, PairAccumulator, codes_of
from saeflow.flow.run import open_flow
from saeflow.ids import Slot
from saeflow.saes.packs import pack_fingerprint
from saeflow.saes.scan import to_device


@dataclass
class LayerPredecessors:
    """The flow's top-1 predecessor of every resid_post feature of one layer, per origin."""
    top1: dict[str, np.ndarray]  # origin ("res"/"mlp"/"attn") -> [d] feature index, -1: none
    slots: dict[str, Slot | None]  # origin -> the predecessor SAE (None: not in the pack)


@dataclass
class FlowPredecessors:
    """The flow in RUN as the statistics read it: its cache key (part of their identity) and
    the top-1 predecessors of the layers whose predecessor SAEs are in the pack."""
    cache_key: str
    layers: dict[int, LayerPredecessors]


@dataclass
class StatsTargets:
    """What a statistics pass accumulates, the same for every shard."""
    pairs: list[tuple[Slot, Slot]]  # (upstream, downstream) SAE pairs
    slots: list[Slot]  # every SAE read: the pairs' and the predecessors'
    widths: dict[Slot, int]  # d_sae of each slot
    active_fraction: float | None  # "active" is z > F * the feature's max; None: z > 0
    maxima: dict[Slot, np.ndarray] | None  # [d] each feature's max (with active_fraction)
    predecessors: dict[int, LayerPredecessors]  # by layer; {} without a flow


def flow_predecessors(run, pack) -> FlowPredecessors | None:
    """The flow's top-1 predecessors from RUN, for layers whose predecessor SAEs are in
    `pack`; None when RUN holds no flow."""
    try:
        fr = open_flow(run)
    except MissingResultError:
        return None
    if fr.manifest["pack"]["fingerprint"] != pack_fingerprint(pack):
        raise StatsError(f"{run} holds a flow of a different pack; statistics and flow must "
                         f"come from the same pack (use another --out)")
    pred = fr.predecessors()
    layers = {}
    for L in fr.layers:
        sel = pred[pred.layer == L].sort_values("feature")
        slots: dict[str, Slot | None] = {}
        top1: dict[str, np.ndarray] = {}
        for origin, slot in fr.predecessor_slots(L).items():
            if slot is None or slot not in pack or slot.position == "attn_z":
                slots[origin] = None
                continue
            slots[origin] = slot
            top1[origin] = sel[f"pred_{origin}"].fillna(-1).to_numpy().astype(np.int64)
        layers[L] = LayerPredecessors(top1, slots)
    return FlowPredecessors(fr.manifest["cache_key"], layers)


def pair_key(up: Slot, down: Slot) -> str:
    """'2/resid_post->3/resid_post': a pair's key in a checkpoint."""
    return f"{Slot.of(up)}->{Slot.of(down)}"


class StatsShard:
    """The sums of every pair (and the predecessor-group counts) over one shard of tokens, kept
    on `device` (the codes' device in a pass); state() and the properties hand numpy arrays to
    the host.

    A batch is a few launches for the whole family, not tens per pair (issue 29): the codes of
    the SAEs the sums read (the pairs', and the resid_post of each predecessor layer) are built
    once for each width, as one stack; dense pairs of one shape are updated as one `PairGroup`;
    the predecessor counts of all layers at once (`PredecessorCounts`). Pairs too wide for
    dense sums keep the one-pair path."""

    stacked_sums: bool | None = None  # PairGroup's `stacked` (None: on a GPU; tests force it)

    def __init__(self, targets: StatsTargets, k: int, device):
        self.targets = targets
        dev = self.dev = torch.device(device)
        self.acc = {pr: PairAccumulator(targets.widths[pr[0]], targets.widths[pr[1]], device=dev)
                    for pr in targets.pairs}
        self.thresholds = None
        if targets.active_fraction is not None:
            assert targets.maxima is not None
            self.thresholds = {s: torch.as_tensor(targets.maxima[s], dtype=torch.float32,
                                                  device=dev) * targets.active_fraction
                               for s in targets.slots}
        dense = [pr for pr, a in self.acc.items() if a.dense]
        self.sparse = [pr for pr, a in self.acc.items() if not a.dense]
        coded = [s for pr in dense for s in pr] + [Slot("resid_post", L)
                                                     for L in targets.predecessors]
        self.stacks: dict[int, list[Slot]] = {}  # {width: the SAEs of one stack of codes}
        for s in dict.fromkeys(coded):
            self.stacks.setdefault(targets.widths[s], []).append(s)
        self.where = {s: (w, i) for w, ss in self.stacks.items() for i, s in enumerate(ss)}
        self._thr = None if self.thresholds is None else {  # [S, 1, width]
            w: torch.stack([self.thresholds[s] for s in ss])[:, None, :]
            for w, ss in self.stacks.items()}
        by_shape: dict[tuple[int, int], list] = {}
        for u, d in dense:
            by_shape.setdefault((targets.widths[u], targets.widths[d]), []).append((u, d))
        self.pair_groups = {shape: PairGroup([self.acc[pr] for pr in prs],
                                             [self.where[u][1] for u, _ in prs],
                                             [self.where[d][1] for _, d in prs],
                                             stacked=self.stacked_sums)
                            for shape, prs in by_shape.items()}
        self._summed = {w for shape in self.pair_groups for w in shape}
        self._predecessors(targets)

    def _predecessors(self, targets: StatsTargets) -> None:
        """The predecessor counts, one `PredecessorCounts` per width of the resid_post SAEs;
        the per-layer counts (`_groups`, `_cofire`) are views of theirs."""
        by_width: dict[int, dict[int, LayerPredecessors]] = {}
        for L, info in targets.predecessors.items():
            by_width.setdefault(targets.widths[Slot("resid_post", L)], {})[L] = info
        self.pred_counts = {w: PredecessorCounts(
            layers, [self.where[Slot("resid_post", L)][1] for L in layers], w, self.where,
            targets.widths, self.thresholds, self.dev) for w, layers in by_width.items()}
        views = {L: (pc.groups[i], pc.cofire[i]) for w, pc in self.pred_counts.items()
                 for i, L in enumerate(by_width[w])}
        # [8] counts by predecessor group, and [4, d_sae] counts of the target on, and on with
        # its top-1 RES / MLP / ATT predecessor (the co-firing that tells a real data-free match
        # from a chance one), in the order of the layers
        self._groups = {L: views[L][0] for L in targets.predecessors}
        self._cofire = {L: views[L][1] for L in targets.predecessors}

    @property
    def group_counts(self) -> dict[int, np.ndarray]:
        """{layer: [8] counts by predecessor group}, on the host."""
        return {L: _host(v) for L, v in self._groups.items()}

    @property
    def cofire(self) -> dict[int, np.ndarray]:
        """{layer: [4, d] co-firing counts}, on the host."""
        return {L: _host(v) for L, v in self._cofire.items()}

    def on_batch(self, z, b, content, acts=None) -> None:
        """z {slot: [B, T, d]} codes of one batch; content [B, T] bool (document tokens)."""
        dev = self.dev
        # the content tokens' rows, found where `content` lives (the host in a pass: no sync)
        rows = to_device(content.reshape(-1).nonzero().squeeze(1), dev)
        flats, codes, sums = {}, {}, {}
        for w, ss in self.stacks.items():
            flat = flats[w] = torch.empty(len(ss), len(rows), w, dtype=z[ss[0]].dtype,
                                          device=dev)  # [S, T_content, w]
            for i, s in enumerate(ss):
                _select_rows(flat[i], z[s].to(dev).reshape(-1, w), rows)
            # "active": above the threshold, else nonzero (the codes' own z > 0)
            codes[w] = codes_of(flat, None if self._thr is None else flat > self._thr[w])
            if w in self._summed:
                sums[w] = feature_sums(codes[w], len(ss), w)
        for (wu, wd), g in self.pair_groups.items():
            g.update(codes[wu], codes[wd], sums[wu], sums[wd])
        one: dict[Slot, Codes] = {}  # pairs too wide for dense sums: one SAE's codes each
        for u, d in self.sparse:
            for s in (u, d):
                if s not in one:
                    flat = z[s].to(dev).reshape(-1, z[s].shape[-1]).index_select(0, rows)
                    one[s] = codes_of(flat, None if self.thresholds is None
                                      else flat > self.thresholds[s])
            self.acc[(u, d)].update_codes(one[u], one[d])
        for w, pc in self.pred_counts.items():
            pc.count(codes[w], flats, z, rows)

    def state(self) -> dict:
        return {"pairs": {pair_key(u, d): a.state() for (u, d), a in self.acc.items()},
                "groups": self.group_counts, "cofire": self.cofire}

    def load(self, st: dict) -> None:
        for (u, d), a in self.acc.items():
            a.load(st["pairs"][pair_key(u, d)])
        # a state saved before saeflow counted co-firing has none: the pass then starts over
        if "cofire" not in st and self._cofire:
            raise StatsError("this statistics checkpoint predates the co-firing counts; rerun "
                             "with --force")
        for mine, saved in ((self._groups, st["groups"]), (self._cofire, st.get("cofire", {}))):
            for L, v in saved.items():  # into the stacked counts, whose views these are
                mine[L].copy_(torch.as_tensor(np.asarray(v, np.int64)))

    def merge(self, other: "StatsShard") -> None:
        for pr, a in self.acc.items():
            a.merge(other.acc[pr])
        for L, v in other._groups.items():
            self._groups[L] += v.to(self.dev)
        for L, v in other._cofire.items():
            self._cofire[L] += v.to(self.dev)


def _host(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of `t` (never a view of a live counter)."""
    return t.to("cpu", copy=True).numpy()


def _select_rows(out: torch.Tensor, z: torch.Tensor, rows: torch.Tensor) -> None:
    """out = z[rows] (one launch where the dtypes agree)."""
    if z.dtype == out.dtype:
        torch.index_select(z, 0, rows, out=out)
    else:
        out.copy_(z.index_select(0, rows))

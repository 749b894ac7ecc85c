"""One shard of the statistics pass: the sums of every SAE pair, and the co-firing of each
resid_post feature with its top-1 data-free predecessors (from the flow in RUN)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saeflow.errors import MissingResultError, StatsError
from saeflow.evolution.sums import PairAccumulator
from saeflow.flow.run import open_flow
from saeflow.ids import Slot
from saeflow.saes.packs import pack_fingerprint


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
    """The sums of every pair (and the predecessor-group counts) over one shard of tokens."""

    def __init__(self, targets: StatsTargets, k: int, device):
        self.targets = targets
        dev = self.dev = torch.device(device)
        self.acc = {pr: PairAccumulator(targets.widths[pr[0]], targets.widths[pr[1]])
                    for pr in targets.pairs}
        self.group_counts: dict[int, np.ndarray] = {L: np.zeros(8, np.int64)
                                                    for L in targets.predecessors}
        # per layer: [4, d_sae] counts of the target on, and on with its top-1 RES / MLP / ATT
        # predecessor (the co-firing that tells a real data-free match from a chance one)
        self.cofire: dict[int, np.ndarray] = {
            L: np.zeros((4, targets.widths[Slot("resid_post", L)]), np.int64)
            for L in targets.predecessors}
        self.thresholds = None
        if targets.active_fraction is not None:
            assert targets.maxima is not None
            self.thresholds = {s: torch.as_tensor(targets.maxima[s], dtype=torch.float32,
                                                  device=dev) * targets.active_fraction
                               for s in targets.slots}
        self.pred_of: dict[int, dict[str, torch.Tensor]] = {
            L: {origin: torch.as_tensor(info.top1[origin], device=dev)
                for origin in ("res", "mlp", "attn") if origin in info.top1}
            for L, info in targets.predecessors.items()}

    def on_batch(self, z, b, content, acts=None) -> None:
        """z {slot: [B, T, d]} codes of one batch; content [B, T] bool (document tokens)."""
        thresholds = self.thresholds
        content = content.to(self.dev)
        flat = {s: z[s][content] for s in self.targets.slots}  # [T_content, d]
        # "active": above the threshold, else nonzero
        act = {s: (flat[s] > thresholds[s]) if thresholds else flat[s] > 0 for s in flat}
        for (u, d), a in self.acc.items():
            if thresholds:
                a.update(flat[u], flat[d], act[u], act[d])
            else:  # the default: the accumulator's own z > 0 (no mask to carry)
                a.update(flat[u], flat[d])
        for L, info in self.targets.predecessors.items():
            self._count_groups(L, info, act)

    def _count_groups(self, L: int, info: LayerPredecessors, act: dict) -> None:
        """Empirical predecessor groups: for every active resid_post feature of layer L on
        every token, which of its top-1 predecessors are active there too."""
        dev = self.dev
        on_r = act[Slot("resid_post", L)]  # [T_content, d] bool
        t, f = on_r.nonzero(as_tuple=True)
        code = torch.zeros(len(t), dtype=torch.long, device=dev)
        n_d = on_r.shape[1]
        self.cofire[L][0] += torch.bincount(f, minlength=n_d).cpu().numpy()
        for row, (bit, origin) in enumerate(((1, "res"), (2, "mlp"), (4, "attn")), start=1):
            slot = info.slots.get(origin)
            if slot is None:
                continue
            pred = self.pred_of[L][origin][f]  # top-1 predecessor of each active feature
            ok = pred >= 0
            src = act[slot]
            fired = torch.zeros(len(t), dtype=torch.bool, device=dev)
            fired[ok] = src[t[ok], pred[ok]]
            code += bit * fired.long()
            self.cofire[L][row] += torch.bincount(f[fired], minlength=n_d).cpu().numpy()
        self.group_counts[L] += torch.bincount(code, minlength=8).cpu().numpy()

    def state(self) -> dict:
        return {"pairs": {pair_key(u, d): a.state() for (u, d), a in self.acc.items()},
                "groups": {L: v.copy() for L, v in self.group_counts.items()},
                "cofire": {L: v.copy() for L, v in self.cofire.items()}}

    def load(self, st: dict) -> None:
        for (u, d), a in self.acc.items():
            a.load(st["pairs"][pair_key(u, d)])
        self.group_counts.update({L: np.array(v, np.int64) for L, v in st["groups"].items()})
        # a state saved before saeflow counted co-firing has none: the pass then starts over
        if "cofire" not in st and self.cofire:
            raise StatsError("this statistics checkpoint predates the co-firing counts; rerun "
                             "with --force")
        self.cofire.update({L: np.array(v, np.int64) for L, v in st.get("cofire", {}).items()})

    def merge(self, other: "StatsShard") -> None:
        for pr, a in self.acc.items():
            a.merge(other.acc[pr])
        for L, v in other.group_counts.items():
            self.group_counts[L] += v
        for L, v in other.cofire.items():
            self.cofire[L] += v

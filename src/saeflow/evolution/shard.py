"""One shard of the statistics pass: the sums of every SAE pair, and the co-firing of each
resid_post feature with its top-1 data-free predecessors (from the flow in RUN)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saeflow.errors import MissingResultError, StatsError
from saeflow.evolution.sums import PairAccumulator, codes_of
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
    the host."""

    def __init__(self, targets: StatsTargets, k: int, device):
        self.targets = targets
        dev = self.dev = torch.device(device)
        self.acc = {pr: PairAccumulator(targets.widths[pr[0]], targets.widths[pr[1]], device=dev)
                    for pr in targets.pairs}
        self._groups = {L: torch.zeros(8, dtype=torch.long, device=dev)
                        for L in targets.predecessors}
        # per layer: [4, d_sae] counts of the target on, and on with its top-1 RES / MLP / ATT
        # predecessor (the co-firing that tells a real data-free match from a chance one)
        self._cofire = {L: torch.zeros(4, targets.widths[Slot("resid_post", L)],
                                       dtype=torch.long, device=dev)
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
        thresholds, dev = self.thresholds, self.dev
        # the content tokens' rows, found where `content` lives (the host in a pass: no sync)
        rows = to_device(content.reshape(-1).nonzero().squeeze(1), dev)
        flat = {s: z[s].to(dev).reshape(-1, z[s].shape[-1]).index_select(0, rows)
                for s in self.targets.slots}  # [T_content, d]
        # "active": above the threshold, else nonzero
        act = {s: (flat[s] > thresholds[s]) if thresholds else flat[s] > 0 for s in flat}
        # each SAE's codes once for all its pairs; the default "active" is the codes' own z > 0
        codes = {s: codes_of(flat[s], act[s] if thresholds else None)
                 for s in dict.fromkeys(s for pr in self.acc for s in pr)}
        for (u, d), a in self.acc.items():
            a.update_codes(codes[u], codes[d])
        for L, info in self.targets.predecessors.items():
            self._count_groups(L, info, act)

    def _count_groups(self, L: int, info: LayerPredecessors, act: dict) -> None:
        """Empirical predecessor groups: for every active resid_post feature of layer L on
        every token, which of its top-1 predecessors are active there too. One host sync (the
        number of active entries); the counts stay on the device."""
        on_r = act[Slot("resid_post", L)]  # [T_content, d] bool
        t, f = on_r.nonzero(as_tuple=True)
        code = torch.zeros(len(t), dtype=torch.long, device=self.dev)
        cofire = self._cofire[L]
        cofire[0].index_add_(0, f, torch.ones_like(f))
        for row, (bit, origin) in enumerate(((1, "res"), (2, "mlp"), (4, "attn")), start=1):
            slot = info.slots.get(origin)
            if slot is None:
                continue
            pred = self.pred_of[L][origin][f]  # top-1 predecessor of each active feature
            # -1 (none) reads column 0 and is masked out: no boolean indexing, no sync
            fired = (act[slot][t, pred.clamp(min=0)] & (pred >= 0)).long()
            code += bit * fired
            cofire[row].index_add_(0, f, fired)
        # [8] counts by group: a compare-and-sum (an index_add_ into 8 bins would make every
        # GPU thread contend for the same 8 atomics)
        self._groups[L] += (code[:, None] == torch.arange(8, device=self.dev)).sum(0)

    def state(self) -> dict:
        return {"pairs": {pair_key(u, d): a.state() for (u, d), a in self.acc.items()},
                "groups": self.group_counts, "cofire": self.cofire}

    def load(self, st: dict) -> None:
        for (u, d), a in self.acc.items():
            a.load(st["pairs"][pair_key(u, d)])
        self._groups.update({L: _device_counts(v, self.dev) for L, v in st["groups"].items()})
        # a state saved before saeflow counted co-firing has none: the pass then starts over
        if "cofire" not in st and self._cofire:
            raise StatsError("this statistics checkpoint predates the co-firing counts; rerun "
                             "with --force")
        self._cofire.update({L: _device_counts(v, self.dev)
                             for L, v in st.get("cofire", {}).items()})

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


def _device_counts(v, device) -> torch.Tensor:
    return torch.as_tensor(np.array(v, np.int64), device=device)

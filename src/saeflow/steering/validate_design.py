"""The design of the deactivation experiment (see steering/validate.py): which features become
targets, what each method removes for a target (its trials), and the matched controls. No model
runs here: the trials are keys that lm/trials.py runs and steering/validate.py reads back."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from saeflow.errors import ValidateError
from saeflow.flow.inputs import slot_directions
from saeflow.flow.match import permutation_match
from saeflow.ids import Slot, group_name
from saeflow.lm.trials import Removal, TrialKey, trial_key
from saeflow.steering.validate_config import (
    KINDS,
    RANK_BIN,
    TARGET_CHOICES,
    ValidateConfig,
    rank_bin,
)


# --- who is who: features, candidates, upstream features, controls ------------------------------
class SlotFeature(NamedTuple):
    """A feature of one SAE (equal to the tuple (slot, feature))."""
    slot: tuple[str, int]
    feature: int


class Candidate(NamedTuple):
    """A predecessor a method may name, with its decoder cosine to the target."""
    slot: tuple[str, int]
    feature: int
    similarity: float

    @property
    def ref(self) -> SlotFeature:
        return SlotFeature(self.slot, self.feature)


class Upstream(NamedTuple):
    """A feature active on the token upstream of R_L: its activation and removal norm |a v|."""
    slot: tuple[str, int]
    feature: int
    activation: float
    norm: float

    @property
    def ref(self) -> SlotFeature:
        return SlotFeature(self.slot, self.feature)

    @property
    def removal(self) -> Removal:
        return Removal(self.slot, self.feature, self.activation)


class ControlPick(NamedTuple):
    """A matched control and its removal norm over the norm of the member it stands in for."""
    upstream: Upstream
    norm_ratio: float


class ControlDraw(NamedTuple):
    """exhaustive_control's stand-in for one active upstream feature: an inactive feature of
    the same slot, removed by `amount` so that the removal has the same norm."""
    slot: tuple[str, int]
    feature: int
    amount: float
    matched: Upstream


def feature_name(slot, feature: int) -> str:
    return Slot.of(slot).feature(feature)


def slots_of(index, L: int) -> dict[str, Slot]:
    """{kind: the SAE the residual features of layer L were matched against}, where it exists."""
    found = index.predecessor_slots.get(L, {})  # kind -> Slot, or None where the pack has none
    return {kind: found[kind] for kind in KINDS if found.get(kind)}


def top_predecessor(index, L: int, f: int, kind: str, rank: int = 0) -> Candidate | None:
    """The `rank`-th predecessor of (R_L, f) of one kind, or None."""
    p = index.predecessor(L, f, kind, rank)
    if p is None:
        return None
    position, layer, feature, similarity = p
    return Candidate((position, layer), feature, similarity)


def predecessor_candidates(index, L: int, f: int, k: int = 5, live=None) -> list[Candidate]:
    """The top-k predecessors of (R_L, f) per kind, best first overall. `live` ({slot: [d_sae]
    bool}) drops latents known never to fire."""
    out = []
    for kind in KINDS:
        for rank in range(k):
            c = top_predecessor(index, L, f, kind, rank)
            if c is None:
                break
            mask = None if live is None else live.get(c.slot)
            if mask is not None and not mask[c.feature]:
                continue
            out.append(c)
    return sorted(out, key=lambda c: -c.similarity)


def pearson_top1(stats, L: int) -> dict[int, SlotFeature]:
    """{target feature: its upstream feature} by the highest Pearson among the stored pairs
    into R_L (adjacent R_{L-1} -> R_L, and M_L / A_L -> R_L when computed)."""
    if stats is None:
        return {}
    e = stats.edges(down=("resid_post", L))
    if e.empty:
        return {}
    e = e.sort_values("pearson", ascending=False).drop_duplicates("down")
    return {int(r.down): SlotFeature((r.up_position, int(r.up_layer)), int(r.up))
            for r in e.itertuples() if r.pearson > 0}


def permutation_partners(pack, L: int) -> dict[int, int]:
    """{feature of R_L: its SAE Match partner in R_{L-1}}."""
    if ("resid_post", L - 1) not in pack:
        return {}
    rows, cols, _ = permutation_match(slot_directions(pack, ("resid_post", L - 1)),
                                      slot_directions(pack, ("resid_post", L)))
    return {int(c): int(r) for r, c in zip(rows, cols)}


def choose_targets(active: list[int], activations: list[float], max_features: int | None,
                   choice: str, rng: np.random.Generator) -> list[int]:
    """Which active features (indices into `active`) become targets.

    random       a uniform sample of max_features (without replacement), seeded by rng
    all          every active feature
    most_active  the max_features largest activations (biased to hard targets)
    """
    n = len(active)
    if choice == "all" or max_features is None or max_features >= n:
        pick = list(range(n))
    elif choice == "random":
        pick = sorted(rng.choice(n, max_features, replace=False).tolist())
    elif choice == "most_active":
        pick = sorted(np.argsort(-np.asarray(activations), kind="stable")[:max_features].tolist())
    else:
        raise ValidateError(f"target_choice must be one of {', '.join(TARGET_CHOICES)}")
    return [active[i] for i in pick]


def pick_control(top1, upstream: list, candidates: set, tolerance: float,
                 rng: np.random.Generator) -> ControlPick | None:
    """A random active upstream feature that is no candidate, whose removal norm |a v| is within
    [1/tolerance, tolerance] x the top-1 predecessor's; the same slot as the top-1 first, then
    any slot; when none is in range, the nearest in log ratio. `upstream`: Upstream entries (or
    tuples of their fields); `top1` one of them; `candidates` {(slot, feature)}."""
    top1 = Upstream(*top1)
    pool = [u for u in map(Upstream._make, upstream)
            if u.ref not in candidates and u.ref != top1.ref]
    if not pool:
        return None
    ratio = np.array([u.norm / top1.norm for u in pool])
    log_r = np.abs(np.log(np.maximum(ratio, 1e-12)))
    in_range = log_r <= math.log(tolerance)
    same_slot = np.array([u.slot == top1.slot for u in pool])
    for sel in (in_range & same_slot, in_range):
        if sel.any():
            i = int(rng.choice(np.flatnonzero(sel)))
            return ControlPick(pool[i], float(ratio[i]))
    i = int(np.argmin(log_r))
    return ControlPick(pool[i], float(ratio[i]))


def draw_inactive_matches(upstream: list, active_at: dict, dec_norms: dict, exclude: set,
                          rng: np.random.Generator, live: dict | None = None
                          ) -> list[ControlDraw]:
    """exhaustive_control's draws: for each active upstream feature, a random feature q of the
    same slot that is not active on the token (`active_at[slot]`: its [d_sae] activations
    there), no member of `exclude` ({(slot, feature)}), known to fire when `live` says so, with
    a nonzero decoder row; drawn without replacement within a slot while the pool lasts. Its
    removal amount is |a v| / |v_q|, so that the removal has the same norm. `dec_norms[slot]`:
    [d_sae] norms of the decoder rows in the input's units (|W_dec| / input_scale)."""
    out: list[ControlDraw] = []
    by_slot: dict[tuple, list[Upstream]] = {}
    for u in map(Upstream._make, upstream):
        by_slot.setdefault(u.slot, []).append(u)
    for slot, us in by_slot.items():
        norms = np.asarray(dec_norms[slot], dtype=np.float64)  # [d_sae]
        ok = (np.asarray(active_at[slot]) <= 0) & (norms > 0)
        mask = None if live is None else live.get(slot)
        if mask is not None:
            ok &= np.asarray(mask, dtype=bool)
        for s, q in exclude:
            if s == slot:
                ok[q] = False
        pool = np.flatnonzero(ok)
        if not len(pool):
            continue
        picks = rng.choice(pool, len(us), replace=len(us) > len(pool))
        for u, q in zip(us, picks.tolist()):
            out.append(ControlDraw(slot, int(q), float(u.norm / norms[q]), u))
    return out


# --- one target's trials ------------------------------------------------------------------------
class TrialSet:
    """The trials of one token, each registered once: {TrialKey: row number}."""

    def __init__(self) -> None:
        self.rows: dict[TrialKey, int] = {}

    def add(self, layer: int, removed) -> TrialKey:
        key = trial_key(layer, removed)
        self.rows.setdefault(key, len(self.rows))
        return key

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Design:
    """What the run fixed before any text: the settings and the per-layer lookups."""
    cfg: ValidateConfig
    index: Any  # FlowIndex
    layers: list[int]
    pearson: dict[int, dict[int, SlotFeature]]  # layer -> target -> top Pearson partner
    perm: dict[int, dict[int, int]]  # layer -> target -> SAE Match partner in R_{L-1}
    available: set[str]  # the methods this run rates
    width: dict[int, int]  # layer -> rank bin width
    live: dict | None = None  # {slot: [d_sae] bool} of latents known to fire


@dataclass
class CaseSetup:
    """A case (target at a token) and what its methods may name."""
    case: dict[str, Any]  # the case's columns of cases.parquet
    group: list[Candidate]  # the active top-1 predecessor of each kind, most similar first
    candidates: list[Candidate]  # the top-5 lists over the slots at hand, most similar first
    named: set  # {(slot, feature)} any method could name: no control may be one of them
    partner: dict[str, SlotFeature]  # "permutation" / "top1_pearson" -> their partner


@dataclass
class TokenLayer:
    """What every case at one (token, layer) shares: the active upstream features and the
    trials of exhaustive and exhaustive_control."""
    layer: int
    upstream: list[Upstream]
    by_key: dict[tuple, Upstream]  # (slot, feature) -> its upstream entry
    singles: list[TrialKey]  # exhaustive: each upstream feature alone
    control_keys: list[TrialKey]  # exhaustive_control's draws
    control_matched: dict[TrialKey, str]  # the upstream feature each draw stands in for


@dataclass
class MethodTrials:
    """A method's trials for one case ([] when it has nothing to remove there)."""
    case: dict[str, Any]
    method: str
    keys: list[TrialKey]
    control_norm_ratio: float = float("nan")
    matched: str = ""  # the feature(s) a control stands in for
    matched_by_key: dict[TrialKey, str] | None = None  # exhaustive_control's, per trial


def case_setup(design: Design, at: TokenLayer, f: int, rank: int, n_active: int,
               base: dict[str, Any], slots_at: set) -> CaseSetup | None:
    """The case of target f, its candidates and the top-1 predecessor of each kind that is
    active on the token; None for a "From nowhere" target (no active top-1 predecessor: left
    out, as in the paper). `base`: the case's text and token; `slots_at`: slots with codes."""
    L = at.layer
    group, fired = [], {}
    for kind in slots_of(design.index, L):
        p = top_predecessor(design.index, L, f, kind)
        fired[kind] = p is not None and p.ref in at.by_key
        if fired[kind]:
            assert p is not None
            group.append(p)
    if not group:
        return None
    group.sort(key=lambda c: -c.similarity)  # the most similar first: top1_cosine
    cands = [c for c in predecessor_candidates(design.index, L, f, live=design.live)
             if c.slot in slots_at]
    # Everything a method could name is a candidate: the top-k lists, SAE Match, Pearson.
    named = {c.ref for c in predecessor_candidates(design.index, L, f)}
    partner = {}
    if f in design.perm.get(L, {}):
        partner["permutation"] = SlotFeature(("resid_post", L - 1), design.perm[L][f])
    if f in design.pearson.get(L, {}):
        partner["top1_pearson"] = design.pearson[L][f]
    named |= set(partner.values())
    case = {**base, "layer": L, "feature": f,
            "group": group_name(fired.get("res", False), fired.get("mlp", False),
                                fired.get("attn", False)),
            "top1_similarity": float(cands[0].similarity) if cands else float(group[0].similarity),
            "target_rank": rank, "rank_bin": rank_bin(rank, design.width.get(L, RANK_BIN)),
            "n_active": n_active, "target_choice": design.cfg.target_choice}
    return CaseSetup(case, group, cands, named, partner)


def _controls(design: Design, st: CaseSetup, at: TokenLayer, trials: TrialSet,
              rng: np.random.Generator) -> list[MethodTrials]:
    """control_matched and control_group: active upstream features no method names, of the
    same removal norm as the member they stand in for."""
    excluded = set(st.named) | {c.ref for c in st.group}
    tolerance = design.cfg.control_tolerance
    top1 = at.by_key[st.group[0].ref]
    ctl = pick_control(top1, at.upstream, excluded, tolerance, rng)
    if ctl is None:
        matched = MethodTrials(st.case, "control_matched", [])
    else:
        matched = MethodTrials(st.case, "control_matched",
                               [trials.add(at.layer, (ctl.upstream.removal,))],
                               control_norm_ratio=ctl.norm_ratio,
                               matched=feature_name(top1.slot, top1.feature))
    chosen: list[Removal] = []
    ratios: list[float] = []
    for g in st.group:
        c = pick_control(at.by_key[g.ref], at.upstream,
                         excluded | {(x.slot, x.feature) for x in chosen}, tolerance, rng)
        if c is not None:
            chosen.append(c.upstream.removal)
            ratios.append(c.norm_ratio)
    group = MethodTrials(st.case, "control_group",
                         [trials.add(at.layer, tuple(chosen))] if chosen else [],
                         control_norm_ratio=float(np.prod(ratios)) ** (1 / len(ratios))
                         if ratios else float("nan"),
                         matched=",".join(feature_name(g.slot, g.feature) for g in st.group))
    return [matched, group]


def method_trials(design: Design, st: CaseSetup, at: TokenLayer, trials: TrialSet,
                  rng: np.random.Generator) -> list[MethodTrials]:
    """The trials of every available method for one case (registered in `trials`)."""

    def removal(ref) -> Removal | None:  # None when the feature is not active at the token
        u = at.by_key.get((ref.slot, ref.feature))
        return None if u is None else u.removal

    def one(chosen) -> list[TrialKey]:
        removed = tuple(r for r in (removal(c) for c in chosen) if r is not None)
        return [trials.add(at.layer, removed)] if removed else []

    cands = st.candidates
    out = [MethodTrials(st.case, "top1_cosine", one(st.group[:1])),
           MethodTrials(st.case, "predecessor_group", one(st.group)),
           MethodTrials(st.case, "top5_cosine", one(cands[:5])),
           MethodTrials(st.case, "random_top5",
                        one([cands[int(rng.integers(min(5, len(cands))))]] if cands else []))]
    for m in ("permutation", "top1_pearson"):
        if m in design.available:
            out.append(MethodTrials(st.case, m,
                                    one([st.partner[m]]) if m in st.partner else []))
    out.append(MethodTrials(st.case, "exhaustive", list(at.singles)))
    out.append(MethodTrials(st.case, "exhaustive_top5",
                            [trials.add(at.layer, (r,)) for r in
                             (removal(c) for c in cands) if r is not None]))
    out.append(MethodTrials(st.case, "exhaustive_control", list(at.control_keys),
                            matched_by_key=at.control_matched))
    out += _controls(design, st, at, trials, rng)
    return [p for p in out if p.method in design.available]

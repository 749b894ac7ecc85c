"""Steering plans: which features to push, where, by how much, with which edit (its `op`):
add (s typical activations of the feature's direction) or rescale (r times its current
activation); see edits.py for what each does to the residual stream.

Plans are plain JSON (schema.py), so they can be saved and shared; what depends on the pack
(the layer and position exist, the feature is in range) and the sane bounds that `--force`
lifts (MAX_STRENGTH, MAX_INTERVENTIONS) are checked by `SteeringPlan.check(pack)`. Plans are
built for one feature, or over its flow graph (`plan_from_graph`, `build_plan`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import networkx as nx
from pydantic import ValidationError

from saeflow.errors import FlowError, MissingResultError, PlanError
from saeflow.flow import open_flow, run_flow
from saeflow.flow.graphs import trace
from saeflow.ids import Slot, feature_id, parse_feature
from saeflow.saes.packs import pack_fingerprint
from saeflow.steering.edits import CallScope, plan_edits, special_token_ids
from saeflow.steering.schema import (
    GRAPH_MODES,
    MAX_DESCRIPTION_CHARS,
    MAX_INTERVENTIONS,
    MAX_LAYER,
    MAX_PLAN_INTERVENTIONS,
    MAX_STRENGTH,
    MAX_TOKEN_POSITION,
    OPS,
    PLAN_FORMAT,
    SCHEDULES,
    STRENGTH_LIMIT,
    InterventionSchema,
    PlanBody,
    PlanSchema,
    TokenPosition,
    schema_errors,
)
from saeflow.steering.typical import typical_activations
from saeflow.store import cache_dir, write_json_atomic

MODES = OPS  # the old name of the plan's edit operations

__all__ = [  # what other modules import from here (some of it lives in schema/edits/typical)
    "GRAPH_MODES", "MAX_DESCRIPTION_CHARS", "MAX_INTERVENTIONS", "MAX_LAYER",
    "MAX_PLAN_INTERVENTIONS", "MAX_STRENGTH", "MAX_TOKEN_POSITION", "MODES", "OPS",
    "PLAN_FORMAT", "SCHEDULES", "STRENGTH_LIMIT", "CallScope", "Intervention",
    "InterventionSchema", "PlanBody", "PlanSchema", "SteeringPlan", "TokenPosition",
    "build_plan", "flow_for_pack", "plan_edits", "plan_for_feature", "plan_from_graph",
    "schedule_strength", "schema_errors", "special_token_ids", "typical_activations",
]


@dataclass(frozen=True)
class Intervention:
    layer: int
    position: str
    feature: int
    strength: float

    @property
    def id(self) -> str:
        return feature_id(self.layer, self.position, self.feature)


@dataclass
class SteeringPlan:
    op: str  # the edit: add or rescale (the JSON key "mode")
    interventions: list[Intervention]
    tokens: list[int] | None = None  # None (or "all" when given): every token
    description: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.op not in OPS:
            raise PlanError(f"plan mode must be one of {', '.join(OPS)}, not {self.op!r}")
        for i in self.interventions:
            strength = i.strength if isinstance(i, Intervention) else None
            if isinstance(strength, (int, float)) and not math.isfinite(strength):
                raise PlanError(f"{i.id}: strength must be a finite number, not {strength}")
        body = _validated(PlanBody, {
            "mode": self.op, "tokens": self.tokens, "description": self.description,
            "meta": self.meta, "interventions": [asdict(i) if isinstance(i, Intervention) else i
                                                 for i in self.interventions]})
        self.interventions = [Intervention(i.layer, i.position, i.feature, i.strength)
                              for i in body.interventions]
        self.tokens = None if body.tokens in (None, "all") else sorted(set(body.tokens))
        self.description, self.meta = body.description, body.meta

    @property
    def mode(self) -> str:
        """The plan's edit under its JSON name (`op` in the code)."""
        return self.op

    # --- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": 1, "mode": self.op,
                "tokens": self.tokens, "description": self.description, "meta": self.meta,
                "interventions": [asdict(i) for i in self.interventions]}

    @classmethod
    def from_dict(cls, d: Any) -> "SteeringPlan":
        """A plan from its JSON (a plan file, an API request); PlanError says what is wrong."""
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a saeflow steering plan (expected \"format\": \"{PLAN_FORMAT}\")")
        return cls.from_schema(_validated(PlanSchema, d))

    @classmethod
    def from_schema(cls, s: PlanBody) -> "SteeringPlan":
        """A plan from its validated schema (the web app's requests arrive as one)."""
        ivs = [Intervention(i.layer, i.position, i.feature, i.strength) for i in s.interventions]
        return cls(s.mode, ivs, None if s.tokens == "all" else s.tokens, s.description,
                   dict(s.meta))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SteeringPlan":
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"no plan file at {path}") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(d)

    # --- checks --------------------------------------------------------------------------
    def slots(self) -> list[Slot]:
        """The SAEs the plan edits, in order."""
        return sorted({Slot(i.position, i.layer) for i in self.interventions})

    def check(self, pack, *, force: bool = False, max_strength: float = MAX_STRENGTH,
              max_interventions: int = MAX_INTERVENTIONS) -> None:
        """Refuse, before any generation, what the pack does not have or what is absurd."""
        if not self.interventions:
            raise PlanError("the plan has no interventions")
        if len(self.interventions) > max_interventions and not force:
            raise PlanError(f"the plan has {len(self.interventions)} interventions; the limit is "
                            f"{max_interventions} (use --force to lift it)")
        for i in self.interventions:
            if (i.position, i.layer) not in pack:
                raise PlanError(f"unknown feature {i.id}: the pack has no SAE at layer {i.layer} "
                                f"{i.position} (positions {', '.join(pack.positions)}, layers "
                                f"{pack.layers()[0]}..{pack.layers()[-1]})")
            d_sae = pack.info(i.position, i.layer).d_sae
            if not 0 <= i.feature < d_sae:
                raise PlanError(f"unknown feature {i.id}: that SAE has features 0..{d_sae - 1}")
            if abs(i.strength) > max_strength and not force:
                raise PlanError(f"{i.id}: strength {i.strength:g} is beyond the sane bound "
                                f"|strength| <= {max_strength:g}; use --force to pass it anyway")


def _validated(schema: type[PlanBody], d: dict) -> Any:
    try:
        return schema.model_validate(d)
    except ValidationError as e:
        raise PlanError(f"not a valid steering plan: {schema_errors(e)}") from None


# --- building plans ---------------------------------------------------------------------------
def plan_for_feature(feature: str, strength: float, op: str = "add",
                     tokens: list[int] | None = None) -> SteeringPlan:
    """`op` (add or rescale) one feature, LAYER/POSITION/INDEX, at `strength`."""
    L, pos, f = parse_feature(feature)
    return SteeringPlan(op, [Intervention(L, pos, f, float(strength))], tokens,
                        description=f"{op} {feature} x {strength:g}",
                        meta={"seed": feature_id(L, pos, f), "graph_mode": "seed"})


def schedule_strength(strength: float, layer: int, schedule: str = "constant",
                      alpha: float = -0.05, span: tuple[int, int] | None = None) -> float:
    """The strength at `layer` under a schedule (flow paper, section 6):
    constant s; exponential s * exp(alpha * l); linear from (l_start, s) to (l_end, 1)."""
    if schedule == "constant":
        return strength
    if schedule == "exponential":
        return strength * math.exp(alpha * layer)
    if schedule == "linear":
        if span is None or span[1] == span[0]:
            return strength
        t = (layer - span[0]) / (span[1] - span[0])
        return strength + (1.0 - strength) * min(max(t, 0.0), 1.0)
    raise PlanError(f"schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")


def plan_from_graph(G: nx.DiGraph, strength: float, graph_mode: str = "cumulative",
                    layer: int | None = None, op: str = "add", schedule: str = "constant",
                    alpha: float = -0.05, tokens: list[int] | None = None,
                    positions: tuple[str, ...] = ("resid_post",), *,
                    mode: str | None = None) -> SteeringPlan:
    """A plan that does `op` (add or rescale) over a flow graph's nodes (graphs.trace):
    seed        the seed feature only;
    single      the graph's features at `layer`;
    cumulative  all graph features at layers <= `layer` (the whole graph when layer is None);
    span        every feature of the graph.
    `positions` picks which nodes count (residual only by default; add mlp_out/attn_out to
    steer the module predecessors too). `mode` is the old name of `op`."""
    op = mode if mode is not None else op
    if graph_mode not in GRAPH_MODES:
        raise PlanError(f"graph mode must be one of {', '.join(GRAPH_MODES)}, not {graph_mode!r}")
    seed = G.graph.get("seed")
    nodes = [(d["layer"], d["position"], d["feature"]) for _, d in G.nodes(data=True)
             if d["position"] in positions or (graph_mode == "seed" and _is_seed(d))]
    if graph_mode == "seed":
        nodes = [n for n in nodes if feature_id(*n) == seed]
    elif graph_mode in ("single", "cumulative") and layer is not None:
        keep = (lambda L: L == layer) if graph_mode == "single" else (lambda L: L <= layer)
        nodes = [n for n in nodes if keep(n[0])]
    elif graph_mode == "single":
        raise PlanError("single-layer mode needs the layer to steer at")
    if not nodes:
        have = sorted({d["layer"] for _, d in G.nodes(data=True) if d["position"] in positions})
        raise PlanError(f"the flow graph of {seed} has no {'/'.join(positions)} feature for "
                        f"{graph_mode} mode at layer {layer} (its layers: {have})")
    layers = [n[0] for n in nodes]
    span = (min(layers), max(layers))
    ivs = [Intervention(L, pos, f, schedule_strength(strength, L, schedule, alpha, span))
           for L, pos, f in sorted(nodes)]
    return SteeringPlan(op, ivs, tokens,
                        description=f"{op} along the flow graph of {seed}: {graph_mode}"
                                    f"{'' if layer is None else f' at layer {layer}'}, "
                                    f"strength {strength:g}, {schedule} schedule",
                        meta={"seed": seed, "graph_mode": graph_mode, "layer": layer,
                              "strength": strength, "schedule": schedule, "alpha": alpha})


def _is_seed(d: dict) -> bool:
    return d.get("role") == "seed"


# --- plans from the command line / API requests -----------------------------------------------
def flow_for_pack(pack, run: str | os.PathLike | None = None, model=None):
    """The flow of `pack`: from RUN when it holds one of this pack, else computed once into the
    cache (data-free). A flow in RUN that is corrupt is an error, not a reason to recompute."""

    fp = pack_fingerprint(pack)
    if run is not None:
        try:
            fr = open_flow(run)
        except MissingResultError:
            fr = None
        if fr is not None:
            if fr.manifest["pack"]["fingerprint"] != fp:
                raise FlowError(f"{run} holds the flow of a different pack; steer with the pack "
                                f"it was computed from, or another RUN")
            return fr
    return run_flow(pack, cache_dir("flow-runs") / fp, model=model, progress=False)


def build_plan(pack, *, feature: str, strength: float = 4.0,
               graph_mode: Literal["seed", "single", "cumulative", "span"] = "seed",
               kind: Literal["add", "rescale"] = "add", layer: int | None = None,
               schedule: Literal["constant", "linear", "exponential"] = "constant",
               alpha: float = -0.05, tokens: list[int] | None = None, run=None, model=None,
               t_res: float = 0.5, t_mod: float | None = None,
               positions: tuple[str, ...] = ("resid_post",)) -> SteeringPlan:
    """One feature, or its flow graph in seed / single / cumulative / span mode; `kind` is the
    plan's op, add or rescale (its name on the command line and in API requests)."""
    plan = plan_for_feature(feature, strength, kind, tokens)
    plan.check(pack, force=True)  # an unknown feature fails here, clearly (bounds: later)
    if graph_mode == "seed":
        return plan

    G = trace(flow_for_pack(pack, run, model), feature, t_res=t_res, t_mod=t_mod)
    return plan_from_graph(G, strength, graph_mode, layer, kind, schedule, alpha, tokens,
                           positions)

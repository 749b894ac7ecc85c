"""Steering plans: which features to push, where, by how much; and the edits that apply them.

A plan is a list of (layer, position, feature, strength) interventions in one mode:
    add      h <- h + s * a_typ * W_dec[f]     s in units of the feature's typical activation
    rescale  h <- h + (r - 1) * z_f * W_dec[f] z_f the feature's current activation: r = 0
                                                deactivates, r < 0 inverts
applied at every token or at chosen token positions (0-based, over prompt + generated tokens).

Special tokens are never edited: BOS, EOS, PAD, separators and chat markers (the tokenizer's
special ids) and padding positions keep their activations bit for bit. The SAEs never saw them
in training (a feature can fire at z ~ 57 on BOS), and editing them wrecks the model. Each
call's CallScope learns the input ids of every forward (`CallScope.set_inputs`) before it runs.

Plans are plain JSON, so they can be saved and shared. One schema (`PlanSchema`, pydantic) holds
the rules of that JSON for plan files (the CLI), API requests (the web app documents it in its
OpenAPI) and `SteeringPlan` itself:
    {"format": "saeflow-steering-plan", "version": 1, "mode": "add" | "rescale",
     "tokens": null | "all" | [0-based positions >= 0],      null and "all": every token
     "description": "...", "meta": {...any JSON object...},
     "interventions": [{"layer": int >= 0, "position": one of POSITIONS, "feature": int >= 0,
                        "strength": finite, |strength| <= STRENGTH_LIMIT}, ...]}
Unknown keys are ignored (older and hand-written plans keep loading). What depends on the pack
(the layer and position exist, the feature is in range) and the sane bounds that `--force`
lifts (MAX_STRENGTH, MAX_INTERVENTIONS) are checked by `SteeringPlan.check(pack)`.

`plan_edits` turns a plan into per-hook edits for one call; each edit only acts inside the call that made it (a context variable), so
concurrent calls on one model never see each other's interventions.
"""
from __future__ import annotations

import contextvars
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import networkx as nx
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from saeflow.errors import FlowError, PlanError
from saeflow.features.tables import open_index
from saeflow.flow.graphs import trace
from saeflow.flow.predecessors import open_flow, run_flow
from saeflow.ids import feature_id, parse_feature
from saeflow.lm.corpora import DEFAULT_SPEC, Corpus
from saeflow.lm.hookpoints import POSITIONS, check_position
from saeflow.lm.hooks import HookPoint, capture
from saeflow.saes.packs import pack_fingerprint
from saeflow.store import cache_dir, write_json_atomic

MODES = ("add", "rescale")
GRAPH_MODES = ("seed", "single", "cumulative", "span")
SCHEDULES = ("constant", "linear", "exponential")
PLAN_FORMAT = "saeflow-steering-plan"

# Bounds a request must stay within unless forced (the web app never forces).
MAX_STRENGTH = 64.0  # |s| in typical activations, or |r|
MAX_INTERVENTIONS = 256
# Bounds no plan passes, forced or not: beyond them a plan is a typo or an attack, not a setting
# (|s| 1e4 already swamps any residual stream; bf16 overflows not far above).
STRENGTH_LIMIT = 1e4
MAX_LAYER = 1000
MAX_TOKEN_POSITION = 1_000_000
MAX_PLAN_INTERVENTIONS = 100_000
MAX_DESCRIPTION_CHARS = 10_000


# --- the plan schema ------------------------------------------------------------------------
class InterventionSchema(BaseModel):
    """One feature pushed at one hook point."""
    model_config = ConfigDict(extra="ignore")
    layer: int = Field(..., ge=0, le=MAX_LAYER)
    position: str = Field(..., json_schema_extra={"enum": list(POSITIONS)})
    feature: int = Field(..., ge=0)
    strength: float = Field(..., ge=-STRENGTH_LIMIT, le=STRENGTH_LIMIT, allow_inf_nan=False,
                            description="add: in units of the feature's typical activation; "
                                        "rescale: the factor r on its activation")

    @field_validator("position")
    @classmethod
    def _known_position(cls, v: str) -> str:
        return check_position(v)


TokenPosition = Annotated[int, Field(ge=0, le=MAX_TOKEN_POSITION)]


class PlanBody(BaseModel):
    """The rules of a plan's content (SteeringPlan applies them on construction)."""
    model_config = ConfigDict(extra="ignore")
    mode: Literal["add", "rescale"] = "add"
    interventions: list[InterventionSchema] = Field(..., max_length=MAX_PLAN_INTERVENTIONS)
    tokens: list[TokenPosition] | Literal["all"] | None = Field(
        None, max_length=MAX_TOKEN_POSITION,
        description="0-based positions over prompt + output to edit; null or \"all\": every token")
    description: str = Field("", max_length=MAX_DESCRIPTION_CHARS)
    meta: dict[str, Any] = Field(default_factory=dict, description="any JSON object")

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens_shape(cls, v: Any) -> Any:
        # one clear line instead of pydantic's error per branch of the union
        if v is None or v == "all":
            return v
        if not isinstance(v, (list, tuple)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                and 0 <= t <= MAX_TOKEN_POSITION for t in v):
            raise ValueError(f'tokens must be null, "all" or a list of 0-based token positions '
                             f'(integers 0..{MAX_TOKEN_POSITION}) into prompt + output')
        return v


class PlanSchema(PlanBody):
    """A steering plan as JSON: a plan file, or the `plan` of an API request."""
    format: Literal["saeflow-steering-plan"]
    version: Literal[1] = 1


def schema_errors(e: ValidationError, limit: int = 3) -> str:
    """A pydantic error as one short line: 'interventions.0.layer: Input should be ...; ...'.
    The offending values are not repeated (a plan can be megabytes)."""
    parts = [f"{'.'.join(str(x) for x in err['loc']) or 'plan'}: "
             f"{err['msg'].removeprefix('Value error, ')}"
             for err in e.errors(include_url=False, include_input=False)[:limit]]
    more = e.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


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
    mode: str
    interventions: list[Intervention]
    tokens: list[int] | None = None  # None (or "all" when given): every token
    description: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise PlanError(f"plan mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        for i in self.interventions:
            strength = i.strength if isinstance(i, Intervention) else None
            if isinstance(strength, (int, float)) and not math.isfinite(strength):
                raise PlanError(f"{i.id}: strength must be a finite number, not {strength}")
        body = _validated(PlanBody, {
            "mode": self.mode, "tokens": self.tokens, "description": self.description,
            "meta": self.meta, "interventions": [asdict(i) if isinstance(i, Intervention) else i
                                                 for i in self.interventions]})
        self.interventions = [Intervention(i.layer, i.position, i.feature, i.strength)
                              for i in body.interventions]
        self.tokens = None if body.tokens in (None, "all") else sorted(set(body.tokens))
        self.description, self.meta = body.description, body.meta

    # --- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": 1, "mode": self.mode,
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
    def slots(self) -> list[tuple[str, int]]:
        return sorted({(i.position, i.layer) for i in self.interventions})

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
def plan_for_feature(feature: str, strength: float, mode: str = "add",
                     tokens: list[int] | None = None) -> SteeringPlan:
    L, pos, f = parse_feature(feature)
    return SteeringPlan(mode, [Intervention(L, pos, f, float(strength))], tokens,
                        description=f"{mode} {feature} x {strength:g}",
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
                    layer: int | None = None, mode: str = "add", schedule: str = "constant",
                    alpha: float = -0.05, tokens: list[int] | None = None,
                    positions: tuple[str, ...] = ("resid_post",)) -> SteeringPlan:
    """A plan over a flow graph's nodes (graphs.trace):
    seed        the seed feature only;
    single      the graph's features at `layer`;
    cumulative  all graph features at layers <= `layer` (the whole graph when layer is None);
    span        every feature of the graph.
    `positions` picks which nodes count (residual only by default; add mlp_out/attn_out to
    steer the module predecessors too)."""
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
    return SteeringPlan(mode, ivs, tokens,
                        description=f"{mode} along the flow graph of {seed}: {graph_mode}"
                                    f"{'' if layer is None else f' at layer {layer}'}, "
                                    f"strength {strength:g}, {schedule} schedule",
                        meta={"seed": seed, "graph_mode": graph_mode, "layer": layer,
                              "strength": strength, "schedule": schedule, "alpha": alpha})


def _is_seed(d: dict) -> bool:
    return d.get("role") == "seed"


# --- typical activations (the unit of additive strengths) ---------------------------------------
def typical_activations(pack, slots, run: str | os.PathLike | None = None, model=None,
                        tokens: int = 4096) -> dict[tuple[str, int], torch.Tensor]:
    """{slot: [d_sae]} each feature's mean activation where active.

    From the feature index in `run` when it has these slots; else measured once on `tokens`
    corpus tokens with `model` and cached by pack content. Features never seen active get the
    median of the others (a unit is needed even for them)."""

    slots = sorted(set(slots))
    out = _typical_from_index(run, slots) if run is not None else {}
    todo = [s for s in slots if s not in out]
    if not todo:
        return out
    key = pack_fingerprint(pack)
    cached = cache_dir("typical") / f"{key}-{tokens}.npz"
    have = dict(np.load(cached)) if cached.is_file() else {}
    missing = [s for s in todo if f"{s[1]}/{s[0]}" not in have]
    if missing:
        if model is None:
            raise PlanError("additive steering needs each feature's typical activation: give a "
                            "RUN with a feature index, or a model to measure it")
        have.update(_measure_typical(pack, model, missing, tokens))
        tmp = cached.with_name(cached.name + ".tmp.npz")
        np.savez(tmp, **have)
        os.replace(tmp, cached)
    for s in todo:
        out[s] = torch.from_numpy(np.asarray(have[f"{s[1]}/{s[0]}"], np.float32))
    return out


def _fill_unseen(mean: np.ndarray) -> np.ndarray:
    seen = mean > 0
    return np.where(seen, mean, np.median(mean[seen]) if seen.any() else 1.0).astype(np.float32)


def _typical_from_index(run, slots) -> dict:
    try:
        idx = open_index(run)
    except ValueError:
        return {}
    con = idx._con()
    out = {}
    for pos, L in slots:
        rows = con.execute("SELECT mean_act FROM features WHERE layer=? AND position=? "
                           "ORDER BY feature", [L, pos]).fetchall()
        if rows:
            out[(pos, L)] = torch.from_numpy(_fill_unseen(np.array([r[0] or 0 for r in rows])))
    return out


def _measure_typical(pack, model, slots, tokens: int) -> dict[str, np.ndarray]:
    points = [HookPoint(p, L) for p, L in slots]
    saes = {s: pack.sae(*s, device=model.device) for s in slots}
    sums = {s: torch.zeros(saes[s].d_sae, dtype=torch.float64) for s in slots}
    counts = {s: torch.zeros(saes[s].d_sae, dtype=torch.float64) for s in slots}
    corpus = Corpus.from_spec(DEFAULT_SPEC, seed=1)
    for b in corpus.token_batches(model.tokenizer, 16, 128, max_tokens=tokens):
        acts = capture(model, b.input_ids, points, attention_mask=b.attention_mask)
        content = b.content_mask()
        with torch.inference_mode():
            for s, pt in zip(slots, points):
                z = saes[s].encode(acts[pt]).float().cpu()[content]  # [T, d_sae]
                sums[s] += z.sum(0).double()
                counts[s] += (z > 0).sum(0).double()
    return {f"{s[1]}/{s[0]}": _fill_unseen((sums[s] / counts[s].clamp_min(1)).numpy())
            for s in slots}


# --- applying a plan --------------------------------------------------------------------------
_CURRENT_CALL: contextvars.ContextVar = contextvars.ContextVar("saeflow_call", default=None)


def special_token_ids(tokenizer) -> list[int]:
    """The ids steering never edits: the tokenizer's `all_special_ids` (BOS, EOS, PAD, UNK,
    Gemma's <start_of_turn>/<end_of_turn>, ...), its bos/eos/pad ids, and every added token
    marked special."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or ())}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        i = getattr(tokenizer, name, None)
        if isinstance(i, int):
            ids.add(i)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, t in added.items() if getattr(t, "special", False))
    return sorted(ids)


class CallScope:
    """Marks the code that runs one call's forwards: edits made for this call act only inside
    it (in this thread), so hooks another call installed on the same modules pass through.

    It also knows which positions of the current forward are protected: before each forward
    the caller gives its input ids (and attention mask) to `set_inputs`; positions holding one
    of `special_ids` or masked out (padding, left or right) are then left unedited by every
    edit of this scope. A scope that was never given ids protects nothing (every in-repo caller
    gives them; `CallScope.for_model(model)` takes the special ids from the model's tokenizer).
    """

    def __init__(self, special_ids: Iterable[int] = ()):
        self.token = object()
        self.seen = 0  # tokens of the sequence processed so far (for token positions)
        self.special_ids = torch.tensor(sorted({int(i) for i in special_ids}), dtype=torch.long)
        self.protected: torch.Tensor | None = None  # [batch, seq] bool of the current forward
        self._reset = None

    @classmethod
    def for_model(cls, model) -> "CallScope":
        """A scope protecting the special tokens of `model`'s tokenizer."""
        return cls(special_token_ids(model.tokenizer))

    def set_inputs(self, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> None:
        """The forward about to run: input ids [batch, seq] and, when there is padding, its
        attention mask ([batch, seq], or [batch, past + seq] with a KV cache; 0 = padding).
        Call it before every forward of the call (the prompt, then each generated token)."""
        protected = torch.isin(input_ids, self.special_ids.to(input_ids.device))
        if attention_mask is not None:
            seq = input_ids.shape[1]
            protected |= attention_mask[:, -seq:].to(input_ids.device) == 0
        self.protected = protected

    def __enter__(self):
        self._reset = _CURRENT_CALL.set(self.token)
        return self

    def __exit__(self, *exc):
        _CURRENT_CALL.reset(self._reset)
        return False

    @property
    def active(self) -> bool:
        return _CURRENT_CALL.get() is self.token


def plan_edits(plan: SteeringPlan, pack, scope: CallScope, typical=None,
               device=None) -> dict[HookPoint, Callable]:
    """{hook point: edit} for Hooks(edits=...), acting only inside `scope`.

    Token positions are counted by `scope.seen`, which the generation loop advances after
    each forward (prompt, then one token per step). Positions the scope protects (special
    tokens and padding of the current forward, see CallScope.set_inputs) are never edited."""
    if plan.mode == "add" and typical is None:
        raise PlanError("additive plans need typical activations (typical_activations())")
    edits = {}
    for pos, L in plan.slots():
        ivs = [i for i in plan.interventions if (i.position, i.layer) == (pos, L)]
        sae = pack.sae(pos, L, device=device)
        feats = torch.tensor([i.feature for i in ivs])
        strength = torch.tensor([i.strength for i in ivs], dtype=torch.float32)
        W = (sae.W_dec[feats].float() / sae.input_scale).to(device)  # [n, d_model]
        if plan.mode == "add":
            coef = strength * typical[(pos, L)][feats]  # [n]
            delta = (coef.to(device)[:, None] * W).sum(0)  # [d_model]
            edit = _add_edit(delta, plan.tokens, scope)
        else:
            edit = _rescale_edit(sae, feats.to(device), (strength - 1).to(device), W,
                                 plan.tokens, scope)
        edits[HookPoint(pos, L)] = edit
    return edits


def _edit_mask(tokens, scope: CallScope, act: torch.Tensor) -> torch.Tensor | None:
    """[batch or 1, seq, 1] bool: where this forward's edit applies (the plan's token positions,
    minus the positions the scope protects), or None for every position."""
    batch, seq = act.shape[:2]
    m = None
    if tokens is not None:
        pos = torch.arange(scope.seen, scope.seen + seq)
        m = torch.isin(pos, torch.tensor(tokens)).to(act.device)[None, :]  # [1, seq]
    if scope.protected is not None:
        if tuple(scope.protected.shape) != (batch, seq):
            raise PlanError(f"the steering scope was given input ids of shape "
                            f"{tuple(scope.protected.shape)} but the forward runs "
                            f"[{batch}, {seq}]: call scope.set_inputs before every forward")
        keep = ~scope.protected.to(act.device)
        m = keep if m is None else m & keep
    return None if m is None else m[..., None]


def _add_edit(delta: torch.Tensor, tokens, scope: CallScope):
    def edit(act: torch.Tensor):  # act [batch, seq, d_model]
        if not scope.active:
            return None
        m = _edit_mask(tokens, scope, act)
        d = delta.to(device=act.device, dtype=act.dtype)  # the edit follows the activation
        return act + d if m is None else torch.where(m, act + d, act)  # protected: untouched
    return edit


def _rescale_edit(sae, feats: torch.Tensor, factor: torch.Tensor, W: torch.Tensor, tokens,
                  scope: CallScope):
    def edit(act: torch.Tensor):  # act [batch, seq, d_model]
        nonlocal sae, feats, factor, W
        if not scope.active:
            return None
        if W.device != act.device:  # built on another device: follow the activation, once
            sae, feats, factor, W = (t.to(act.device) for t in (sae, feats, factor, W))
        z = sae.encode(act)[..., feats].float()  # [batch, seq, n] current activations
        change = (z * factor) @ W  # [batch, seq, d_model]: sum_f (r_f - 1) z_f W_dec[f]
        new = act + change.to(act.dtype)
        m = _edit_mask(tokens, scope, act)
        return new if m is None else torch.where(m, new, act)  # protected: untouched
    return edit


# --- plans from the command line / API requests -----------------------------------------------
def flow_for_pack(pack, run: str | os.PathLike | None = None, model=None):
    """The flow of `pack`: from RUN when it holds one of this pack, else computed once into the
    cache (data-free: seconds to a minute)."""

    fp = pack_fingerprint(pack)
    if run is not None:
        try:
            fr = open_flow(run)
        except (ValueError, FileNotFoundError):
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
    """One feature, or its flow graph in seed / single / cumulative / span mode."""
    plan = plan_for_feature(feature, strength, kind, tokens)
    plan.check(pack, force=True)  # an unknown feature fails here, clearly (bounds: later)
    if graph_mode == "seed":
        return plan

    G = trace(flow_for_pack(pack, run, model), feature, t_res=t_res, t_mod=t_mod)
    return plan_from_graph(G, strength, graph_mode, layer, kind, schedule, alpha, tokens,
                           positions)

"""The steering plan as JSON: its format, its words, its bounds, and the pydantic schema that
holds its rules for plan files (the CLI), API requests (the web app documents it in its
OpenAPI) and `SteeringPlan` itself (plans.py):
    {"format": "saeflow-steering-plan", "version": 1, "mode": "add" | "rescale",
     "tokens": null | "all" | [0-based positions >= 0],      null and "all": every token
     "description": "...", "meta": {...any JSON object...},
     "interventions": [{"layer": int >= 0, "position": one of POSITIONS, "feature": int >= 0,
                        "strength": finite, |strength| <= STRENGTH_LIMIT}, ...]}
The JSON key "mode" holds the plan's edit operation, called `op` in the code: add or rescale.
Unknown keys are ignored (older and hand-written plans keep loading)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from saeflow.lm.hookpoints import POSITIONS, check_position

PLAN_FORMAT = "saeflow-steering-plan"
# The edit a plan makes at its features (JSON "mode"; the CLI's --kind).
OPS = ("add", "rescale")
# Which features of a flow graph a plan built from it steers.
GRAPH_MODES = ("seed", "single", "cumulative", "span")
# How a graph plan's strength changes over the graph's layers.
SCHEDULES = ("constant", "linear", "exponential")

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

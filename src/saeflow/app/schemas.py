"""The request bodies of the API (pydantic): strict, so "3" is not a number, and bounded, so
a request cannot ask for more than the server will do."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from saeflow.steering.generate import MAX_NEW_TOKENS, MAX_SAMPLES
from saeflow.steering.plans import MAX_INTERVENTIONS, MAX_STRENGTH, PlanSchema

MAX_PROMPT_CHARS = 4000


class FeatureStrength(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not a number here
    feature: str = Field(..., max_length=64, description="LAYER/POSITION/INDEX")
    strength: float = Field(..., ge=-MAX_STRENGTH, le=MAX_STRENGTH)


class SteerRequest(BaseModel):
    """Default and steered completions. Give one of `feature` (with `mode`), `features`
    (several features, each with its strength, like Neuronpedia's steer) or `plan`."""
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not a number here
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    feature: str | None = Field(None, max_length=64)
    features: list[FeatureStrength] | None = Field(None, max_length=MAX_INTERVENTIONS)
    plan: PlanSchema | None = None
    mode: Literal["seed", "single", "cumulative", "span"] = "seed"
    kind: Literal["add", "rescale"] = "add"
    strength: float = Field(4.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH)
    layer: int | None = Field(None, ge=0, le=1000, strict=True)
    schedule: Literal["constant", "linear", "exponential"] = "constant"
    alpha: float = Field(-0.05, ge=-10, le=10)
    t_res: float = Field(0.5, ge=-1, le=1)
    t_mod: float | None = Field(None, ge=-1, le=1)  # None: each layer's threshold from the flow
    n: int = Field(1, ge=1, le=MAX_SAMPLES, strict=True)
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS, strict=True)
    temperature: float = Field(1.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=2**31 - 1, strict=True)
    score: bool = Field(False, strict=True)
    concept: str | None = Field(None, max_length=500)


class ActivationsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not a number here
    text: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    top_k: int = Field(8, ge=1, le=64, strict=True)
    token: int | None = Field(None, ge=0, le=4096, strict=True)  # "3" is not a token index

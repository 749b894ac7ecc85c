"""Interventions: steering plans, generation under edits, deactivation experiments, steering
scores and sweeps.

    config      SamplingConfig, SweepConfig and the sweep's profiles (no torch, no pandas)
    schema      the plan's JSON: PlanSchema, its words (OPS, GRAPH_MODES, SCHEDULES), bounds
    plans       SteeringPlan and the builders (one feature, or along its flow graph)
    edits       the hook edits that apply a plan inside one call (CallScope)
    typical     typical activations, the unit of additive strengths
    generate    sampling with and without a plan; `steer` side by side
    scores      concept and coherence of steered text (and the LLM judge)
    sweep       the steering sweep (tables in sweep_tables, figures in sweep_plots)
    validate    the deactivation experiments

Words: a plan's `op` is its edit, add or rescale (written "mode" in the plan's JSON and
`--kind` on the command line); a `graph_mode` says which features of a flow graph a plan
steers (seed, single, cumulative, span; the sweep adds cumulative_norm, its `mode` column); a
`schedule` says how a graph plan's strength changes over the layers.

The names below are imported on first use, so importing a config does not load torch."""
from __future__ import annotations

from typing import TYPE_CHECKING

from saeflow._lazy import lazy_exports

__all__ = [
    "CallScope", "DEFAULT_PROMPT", "GRAPH_MODES", "Intervention", "OPS", "PLAN_FORMAT",
    "PlanSchema", "SCHEDULES", "STEER_SAMPLING", "SWEEP_GRAPH_MODES", "SWEEP_PROFILES",
    "SamplingConfig", "SteeringPlan", "SweepConfig", "SweepJob", "THEMES", "Theme",
    "ValidateConfig", "build_plan", "compare_completions", "flow_for_pack",
    "plan_edits", "plan_for_feature", "plan_from_graph", "run_sweep", "run_validation",
    "sample", "score_texts", "special_token_ids", "steer", "sweep_profile", "theme",
    "topic_classifier", "typical_activations",
]
# module of this package -> the names above that it defines
_EXPORTS = {
    "config": ["DEFAULT_PROMPT", "STEER_SAMPLING", "SWEEP_GRAPH_MODES", "SWEEP_PROFILES",
               "SamplingConfig", "SweepConfig", "sweep_profile"],
    "schema": ["GRAPH_MODES", "OPS", "PLAN_FORMAT", "SCHEDULES", "PlanSchema"],
    "plans": ["Intervention", "SteeringPlan", "build_plan", "flow_for_pack", "plan_for_feature",
              "plan_from_graph"],
    "edits": ["CallScope", "plan_edits", "special_token_ids"],
    "typical": ["typical_activations"],
    "generate": ["sample", "steer"],  # not `generate`: the submodule has that name
    "scores": ["THEMES", "Theme", "compare_completions", "score_texts", "theme",
               "topic_classifier"],
    "sweep": ["SweepJob", "run_sweep"],
    "validate_config": ["ValidateConfig"],
    "validate": ["run_validation"],
}
_MODULE_OF = {name: f"{__name__}.{module}" for module, names in _EXPORTS.items()
              for name in names}

if TYPE_CHECKING:
    from saeflow.steering.config import (
        DEFAULT_PROMPT,
        STEER_SAMPLING,
        SWEEP_GRAPH_MODES,
        SWEEP_PROFILES,
        SamplingConfig,
        SweepConfig,
        sweep_profile,
    )
    from saeflow.steering.edits import CallScope, plan_edits, special_token_ids
    from saeflow.steering.generate import sample, steer
    from saeflow.steering.plans import (
        Intervention,
        SteeringPlan,
        build_plan,
        flow_for_pack,
        plan_for_feature,
        plan_from_graph,
    )
    from saeflow.steering.schema import GRAPH_MODES, OPS, PLAN_FORMAT, SCHEDULES, PlanSchema
    from saeflow.steering.scores import (
        THEMES,
        Theme,
        compare_completions,
        score_texts,
        theme,
        topic_classifier,
    )
    from saeflow.steering.sweep import SweepJob, run_sweep
    from saeflow.steering.typical import typical_activations
    from saeflow.steering.validate import run_validation
    from saeflow.steering.validate_config import ValidateConfig

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)

"""`saeflow run`: the stages of the main job and the report they write.

    config.py     PipelineConfig (the stages' own configs, nested), EvalConfig, the profiles,
                  each stage's identity (its settings digest)
    stages.py     run_pipeline: pack -> flow -> eval -> index -> stats -> validate -> sweep ->
                  report over one RUN, resumable; RUN/pipeline.json
    report.py     report.html / report.md
    scorecard.py  this run against the v0.1 pack's figures and the paper

The names below load on first use, so importing one module (pipeline.config) stays light."""
from __future__ import annotations

from typing import TYPE_CHECKING

from saeflow._lazy import lazy_exports

_EXPORTS = {
    "PipelineConfig": "saeflow.pipeline.config",
    "EvalConfig": "saeflow.pipeline.config",
    "PROFILES": "saeflow.pipeline.config",
    "stage_identity": "saeflow.pipeline.config",
    "STAGES": "saeflow.pipeline.stages",
    "Pipeline": "saeflow.pipeline.stages",
    "run_pipeline": "saeflow.pipeline.stages",
    "stage_digest": "saeflow.pipeline.stages",
    "write_report": "saeflow.pipeline.report",
    "scorecard": "saeflow.pipeline.scorecard",
    "measure_run": "saeflow.pipeline.scorecard",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from saeflow.pipeline.config import PROFILES as PROFILES
    from saeflow.pipeline.config import EvalConfig as EvalConfig
    from saeflow.pipeline.config import PipelineConfig as PipelineConfig
    from saeflow.pipeline.config import stage_identity as stage_identity
    from saeflow.pipeline.report import write_report as write_report
    from saeflow.pipeline.scorecard import measure_run as measure_run
    from saeflow.pipeline.scorecard import scorecard as scorecard
    from saeflow.pipeline.stages import STAGES as STAGES
    from saeflow.pipeline.stages import Pipeline as Pipeline
    from saeflow.pipeline.stages import run_pipeline as run_pipeline
    from saeflow.pipeline.stages import stage_digest as stage_digest

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

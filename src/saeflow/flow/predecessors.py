"""The flow stage's former single module, kept so that `from saeflow.flow.predecessors import X`
works for every name it used to hold. New code imports from the modules that define them:
flow/config.py (FlowConfig), flow/inputs.py (layer_slots, slot_directions), flow/compute.py
(run_flow, compute_layer), flow/thresholds.py, flow/run.py (FlowRun, open_flow)."""
from __future__ import annotations

from saeflow.flow.compute import CACHE_VERSION, FlowJob, compute_layer, run_flow
from saeflow.flow.config import FlowConfig
from saeflow.flow.inputs import (
           WEIGHT_FILES,
           LayerSlots,
           check_pack_files,
           layer_slots,
           slot_directions,
)
from saeflow.flow.run import FLOW_FORMAT, FLOW_MANIFEST, FlowRun, open_flow
from saeflow.flow.thresholds import (
           default_thresholds,
           resolve_geometry,
           resolve_thresholds,
           s_res_shares,
)

LayerPlan = LayerSlots  # the former names
plan_layers = layer_slots

__all__ = ["CACHE_VERSION", "FLOW_FORMAT", "FLOW_MANIFEST", "WEIGHT_FILES", "FlowConfig",
           "FlowJob", "FlowRun", "LayerPlan", "LayerSlots", "check_pack_files", "compute_layer",
           "default_thresholds", "layer_slots", "open_flow", "plan_layers", "resolve_geometry",
           "resolve_thresholds", "run_flow", "s_res_shares", "slot_directions"]

"""Data-free feature flow (Laptev et al. 2025): decoder matching, predecessors and classes,
the flow tables, flow graphs and their plots."""

from saeflow.flow.predecessors import FlowConfig, FlowRun, open_flow, run_flow

__all__ = ["FlowConfig", "FlowRun", "open_flow", "run_flow"]

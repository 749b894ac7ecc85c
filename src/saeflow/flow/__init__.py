"""Data-free feature flow (Laptev et al. 2025): decoder matching, predecessors and classes,
the flow tables, flow graphs and their plots.

    config.py      FlowConfig (import-light: the command line reads it)
    inputs.py      which SAEs feed which, their directions in residual space
    match.py       exact blocked top-k matching, null models, one-to-one matching
    tiles.py       the tiled top-k engine under match.py (GEMM tiles, running top-k on the device)
    compute.py     run_flow: the stage (matches cached per layer, tables, manifest)
    thresholds.py  class thresholds, the matching geometry, thresholds.json
    tables.py      predecessors.parquet and successors.parquet
    run.py         open_flow -> FlowRun: the reader every later stage uses
    graphs.py      trace one feature through depth; export the graphs
    pairs.py       match any two SAEs (`saeflow match`)
    plots.py       the flow figures

The names below load on first use, so importing one module (flow.config) stays light."""
from __future__ import annotations

from typing import TYPE_CHECKING

from saeflow._lazy import lazy_exports

_EXPORTS = {
    "FlowConfig": "saeflow.flow.config",
    "FlowRun": "saeflow.flow.run",
    "open_flow": "saeflow.flow.run",
    "run_flow": "saeflow.flow.compute",
    "FlowIndex": "saeflow.flow.graphs",
    "trace": "saeflow.flow.graphs",
    "persistence": "saeflow.flow.graphs",
    "match_pair": "saeflow.flow.pairs",
    "write_flow_plots": "saeflow.flow.plots",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from saeflow.flow.compute import run_flow as run_flow
    from saeflow.flow.config import FlowConfig as FlowConfig
    from saeflow.flow.graphs import FlowIndex as FlowIndex
    from saeflow.flow.graphs import persistence as persistence
    from saeflow.flow.graphs import trace as trace
    from saeflow.flow.pairs import match_pair as match_pair
    from saeflow.flow.plots import write_flow_plots as write_flow_plots
    from saeflow.flow.run import FlowRun as FlowRun
    from saeflow.flow.run import open_flow as open_flow

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

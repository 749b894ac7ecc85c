"""Features as evidence: the feature index (top activations, histograms), logit-lens labels,
its tables, explanations and dashboards.

    config.py      IndexConfig (import-light: the command line reads it)
    index.py       the index pass: running statistics per feature (build_index)
    writer.py      features/examples/tokens.parquet and index.json from those statistics
    tables.py      open_index -> FeatureIndex: the reader (DuckDB), search, bulk columns
    labels.py      automatic labels, token strings, the logit lens of directions
    lens.py        LogitLens: a feature's logit lens, computed when asked
    liveness.py    which features fire (from the index, or a firing pass)
    explain.py     LLM explanations of features (explanations.parquet)
    dashboards.py  Neuronpedia-style dashboards of one feature or whole SAEs

The names below load on first use, so importing one module (features.config) stays light."""
from __future__ import annotations

from typing import TYPE_CHECKING

from saeflow._lazy import lazy_exports

_EXPORTS = {
    "IndexConfig": "saeflow.features.config",
    "build_index": "saeflow.features.index",
    "index_job": "saeflow.features.index",
    "write_index": "saeflow.features.writer",
    "FeatureIndex": "saeflow.features.tables",
    "open_index": "saeflow.features.tables",
    "add_labels": "saeflow.features.tables",
    "LogitLens": "saeflow.features.lens",
    "open_index_with_lens": "saeflow.features.tables",
    "Liveness": "saeflow.features.liveness",
    "liveness_for": "saeflow.features.liveness",
    "liveness_from_index": "saeflow.features.liveness",
    "firing_pass": "saeflow.features.liveness",
    "ExplainerConfig": "saeflow.features.explain_config",
    "explain_features": "saeflow.features.explain",
    "dashboard": "saeflow.features.dashboards",
    "export_dashboards": "saeflow.features.dashboards",
    "auto_label": "saeflow.features.labels",
    "logit_lens": "saeflow.features.labels",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from saeflow.features.config import IndexConfig as IndexConfig
    from saeflow.features.dashboards import dashboard as dashboard
    from saeflow.features.dashboards import export_dashboards as export_dashboards
    from saeflow.features.explain import explain_features as explain_features
    from saeflow.features.explain_config import ExplainerConfig as ExplainerConfig
    from saeflow.features.index import build_index as build_index
    from saeflow.features.index import index_job as index_job
    from saeflow.features.labels import auto_label as auto_label
    from saeflow.features.labels import logit_lens as logit_lens
    from saeflow.features.lens import LogitLens as LogitLens
    from saeflow.features.liveness import Liveness as Liveness
    from saeflow.features.liveness import firing_pass as firing_pass
    from saeflow.features.liveness import liveness_for as liveness_for
    from saeflow.features.liveness import liveness_from_index as liveness_from_index
    from saeflow.features.tables import FeatureIndex as FeatureIndex
    from saeflow.features.tables import add_labels as add_labels
    from saeflow.features.tables import open_index as open_index
    from saeflow.features.tables import open_index_with_lens as open_index_with_lens
    from saeflow.features.writer import write_index as write_index

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

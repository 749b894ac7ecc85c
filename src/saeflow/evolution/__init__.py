"""Data-driven feature evolution (Balcells, Lerner et al. 2024): co-activation statistics
between SAEs, their tables, and the analyses built on them.

    config.py      StatsConfig (import-light: the command line reads it)
    stats.py       the stage: which SAE pairs, the corpus pass (run_stats)
    sums.py        PairAccumulator: the running sums of one pair, over co-active pairs only
    measures.py    Pearson, Jaccard, sufficiency, necessity, mutual information from the sums
    shard.py       one shard of the pass (sums and predecessor co-firing)
    batched.py     a shard's per-batch work over many pairs and layers at once (PairGroup)
    tables.py      edges/features/cofire.parquet, groups.json; open_stats -> StatsRun (reader)
    analyses.py    pass-through, gates, communities, agreement; their files and figures

The names below load on first use, so importing one module (evolution.config) stays light."""
from __future__ import annotations

from typing import TYPE_CHECKING

from saeflow._lazy import lazy_exports

_EXPORTS = {
    "StatsConfig": "saeflow.evolution.config",
    "run_stats": "saeflow.evolution.stats",
    "stats_job": "saeflow.evolution.stats",
    "stat_pairs": "saeflow.evolution.stats",
    "PairAccumulator": "saeflow.evolution.sums",
    "dense_reference": "saeflow.evolution.measures",
    "StatsRun": "saeflow.evolution.tables",
    "open_stats": "saeflow.evolution.tables",
    "write_stats": "saeflow.evolution.tables",
    "MEASURES": "saeflow.evolution.tables",
    "pass_through": "saeflow.evolution.analyses",
    "gates": "saeflow.evolution.analyses",
    "communities": "saeflow.evolution.analyses",
    "agreement": "saeflow.evolution.analyses",
    "write_evolution_outputs": "saeflow.evolution.analyses",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from saeflow.evolution.analyses import agreement as agreement
    from saeflow.evolution.analyses import communities as communities
    from saeflow.evolution.analyses import gates as gates
    from saeflow.evolution.analyses import pass_through as pass_through
    from saeflow.evolution.analyses import write_evolution_outputs as write_evolution_outputs
    from saeflow.evolution.config import StatsConfig as StatsConfig
    from saeflow.evolution.measures import dense_reference as dense_reference
    from saeflow.evolution.stats import run_stats as run_stats
    from saeflow.evolution.stats import stat_pairs as stat_pairs
    from saeflow.evolution.stats import stats_job as stats_job
    from saeflow.evolution.sums import PairAccumulator as PairAccumulator
    from saeflow.evolution.tables import MEASURES as MEASURES
    from saeflow.evolution.tables import StatsRun as StatsRun
    from saeflow.evolution.tables import open_stats as open_stats
    from saeflow.evolution.tables import write_stats as write_stats

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""StatsConfig: the settings of the co-activation statistics pass. Import-light (no torch, numpy
or pandas): the command line reads it to build its options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saeflow.configs import setting
from saeflow.errors import StatsError
from saeflow.saes.pass_config import CorpusPassConfig


@dataclass
class StatsConfig(CorpusPassConfig):
    pairs: Literal["adjacent", "flow", "both"] = setting(
        "adjacent", "SAE pairs: adjacent layers, the flow's module pairs, or both")
    positions: str = setting(
        "resid_post", "adjacent pairs at these positions (comma list, or all); each pair of "
        "4096-wide SAEs holds 192 MB of sums")
    active: str = setting("zero", "zero (z > 0) or frac:F (z > F * the feature's max)")
    top_k: int = setting(10, "pairs kept per row and per column (by Pearson)")
    floor: float = setting(0.1, "and every pair with |Pearson| or Jaccard at or above it")
    checkpoint_every_s: float = setting(
        600.0, "seconds between saved states (they hold every pair's sums)")

    def active_fraction(self) -> float | None:
        if self.active == "zero":
            return None
        if self.active.startswith("frac:"):
            f = float(self.active[5:])
            if not 0 < f < 1:
                raise StatsError("active=frac:F needs 0 < F < 1")
            return f
        raise StatsError(f"active must be 'zero' or 'frac:F' (e.g. frac:0.2), not {self.active!r}")

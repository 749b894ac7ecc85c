"""IndexConfig: the settings of the feature index pass. Import-light (no torch, numpy or
pandas): the command line reads it to build its options."""
from __future__ import annotations

from dataclasses import dataclass

from saeflow.configs import setting
from saeflow.saes.pass_config import CorpusPassConfig


@dataclass
class IndexConfig(CorpusPassConfig):
    n_top: int = setting(16, "top contexts kept per feature")
    n_samples: int = setting(8, "random contexts kept per feature (a bottom-k sketch)")
    window_left: int = setting(10, "tokens kept left of the activating token")
    window_right: int = setting(3, "tokens kept right of it")
    n_logits: int = setting(10, "logit-lens tokens kept per feature and sign")
    checkpoint_every_s: float = setting(
        120.0, "seconds between saved states (a killed pass resumes)")

    @property
    def window(self) -> int:
        return self.window_left + 1 + self.window_right

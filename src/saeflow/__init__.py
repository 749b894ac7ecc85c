"""saeflow: how SAE features flow from layer to layer, and steering along those flows.

The names below load on first use, so that `import saeflow` (and the command line's
`saeflow --help`) does not import torch."""
from __future__ import annotations

from typing import TYPE_CHECKING

from saeflow._lazy import lazy_exports
from saeflow._version import __version__

_EXPORTS = {
    "POSITIONS": "saeflow.lm.hookpoints",
    "Slot": "saeflow.ids",
    "HookPoint": "saeflow.lm.hooks",
    "Hooks": "saeflow.lm.hooks",
    "capture": "saeflow.lm.hooks",
    "LoadedModel": "saeflow.lm.model",
    "load_model": "saeflow.lm.model",
    "Pack": "saeflow.saes.packs",
    "load_pack": "saeflow.saes.packs",
    "save_pack": "saeflow.saes.packs",
    "convert_pack": "saeflow.saes.packs",
    "SAE": "saeflow.saes.sae",
    "random_sae": "saeflow.saes.sae",
}

__all__ = ["POSITIONS", "Slot", "HookPoint", "Hooks", "capture", "LoadedModel", "load_model",
           "Pack", "load_pack", "save_pack", "convert_pack", "SAE", "random_sae", "__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from saeflow.ids import Slot
    from saeflow.lm.hookpoints import POSITIONS
    from saeflow.lm.hooks import HookPoint, Hooks, capture
    from saeflow.lm.model import LoadedModel, load_model
    from saeflow.saes.packs import Pack, convert_pack, load_pack, save_pack
    from saeflow.saes.sae import SAE, random_sae

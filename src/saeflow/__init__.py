"""saeflow: how SAE features flow from layer to layer, and steering along those flows."""
from saeflow._version import __version__
from saeflow.lm.hookpoints import POSITIONS  # noqa: E402
from saeflow.lm.hooks import HookPoint, Hooks, capture  # noqa: E402
from saeflow.lm.model import LoadedModel, load_model  # noqa: E402
from saeflow.saes.packs import Pack, convert_pack, load_pack, save_pack  # noqa: E402
from saeflow.saes.sae import SAE, random_sae  # noqa: E402

__all__ = ["POSITIONS", "HookPoint", "Hooks", "capture", "LoadedModel", "load_model", "Pack",
           "load_pack", "save_pack", "convert_pack", "SAE", "random_sae", "__version__"]

"""saeflow: how SAE features flow from layer to layer, and steering along those flows."""
__version__ = "0.1.0"

from .hookpoints import POSITIONS  # noqa: E402
from .hooks import HookPoint, Hooks, capture  # noqa: E402
from .models import LoadedModel, load_model  # noqa: E402
from .packs import Pack, convert_pack, load_pack, save_pack  # noqa: E402
from .sae import SAE, random_sae  # noqa: E402

__all__ = ["POSITIONS", "HookPoint", "Hooks", "capture", "LoadedModel", "load_model", "Pack",
           "load_pack", "save_pack", "convert_pack", "SAE", "random_sae", "__version__"]

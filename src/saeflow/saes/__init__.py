"""Sparse autoencoders: the SAE, its file formats, packs (one SAE per layer and position), the
hub, training, the embedded recipes, evaluation, and the shared scan over a corpus.

    sae.py          SAE: encode, decode, the architectures (relu, jumprelu, topk, batchtopk, groupmax)
    formats/        read and write single SAEs (saelens, gemmascope, gemmascope2, sparsify)
    packs.py        Pack: a family of SAEs keyed by Slot; load_pack, save_pack, convert_pack
    hub.py          fetch a released family (Gemma Scope, Gemma Scope 2) from the hub
    recipes.py      the embedded pack, trained on first use; open_pack
    train/          training a family (config, engines, the family loop)
    evaluate.py     reconstruction, L0, dead latents and spliced CE of a pack
    pass_config.py  CorpusPassConfig and ScanSpec (import-light: the command line reads them)
    scan.py         one resumable pass of the model over a corpus, feeding SAE codes to consumers

The names below load on first use, so importing one module (saes.pass_config) stays light."""
from __future__ import annotations

from typing import TYPE_CHECKING

from saeflow._lazy import lazy_exports

_EXPORTS = {
    "SAE": "saeflow.saes.sae",
    "random_sae": "saeflow.saes.sae",
    "SAEInfo": "saeflow.saes.formats",
    "load_checked": "saeflow.saes.formats",
    "Pack": "saeflow.saes.packs",
    "load_pack": "saeflow.saes.packs",
    "save_pack": "saeflow.saes.packs",
    "convert_pack": "saeflow.saes.packs",
    "pack_fingerprint": "saeflow.saes.packs",
    "open_pack": "saeflow.saes.recipes",
    "ensure_embedded_pack": "saeflow.saes.recipes",
    "TrainConfig": "saeflow.saes.train",
    "TrainResult": "saeflow.saes.train",
    "train_family": "saeflow.saes.train",
    "evaluate_pack": "saeflow.saes.evaluate",
    "CorpusPassConfig": "saeflow.saes.pass_config",
    "ScanSpec": "saeflow.saes.pass_config",
    "PassJob": "saeflow.saes.scan",
    "PassParts": "saeflow.saes.scan",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from saeflow.saes.evaluate import evaluate_pack as evaluate_pack
    from saeflow.saes.formats import SAEInfo as SAEInfo
    from saeflow.saes.formats import load_checked as load_checked
    from saeflow.saes.packs import Pack as Pack
    from saeflow.saes.packs import convert_pack as convert_pack
    from saeflow.saes.packs import load_pack as load_pack
    from saeflow.saes.packs import pack_fingerprint as pack_fingerprint
    from saeflow.saes.packs import save_pack as save_pack
    from saeflow.saes.pass_config import CorpusPassConfig as CorpusPassConfig
    from saeflow.saes.pass_config import ScanSpec as ScanSpec
    from saeflow.saes.recipes import ensure_embedded_pack as ensure_embedded_pack
    from saeflow.saes.recipes import open_pack as open_pack
    from saeflow.saes.sae import SAE as SAE
    from saeflow.saes.sae import random_sae as random_sae
    from saeflow.saes.scan import PassJob as PassJob
    from saeflow.saes.scan import PassParts as PassParts
    from saeflow.saes.train import TrainConfig as TrainConfig
    from saeflow.saes.train import TrainResult as TrainResult
    from saeflow.saes.train import train_family as train_family

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

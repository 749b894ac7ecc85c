"""The language model: loading (HF folders, hub ids, GGUF), hook points and hooks, and the
text corpora that feed every pass.

    model.py        load_model -> LoadedModel; devices and dtypes
    mappings.py     maps from a position's directions into the residual stream
    hookpoints.py   positions, families' module names, hook names of other libraries
    hooks.py        Hooks and capture at a HookPoint (an ids.Slot)
    corpus_spec.py  corpus specs and token counts as written (import-light)
    corpora.py      Corpus: documents and token batches that remember their source

The names below load on first use, so importing one module (lm.corpus_spec) stays light."""
from __future__ import annotations

from typing import TYPE_CHECKING

from saeflow._lazy import lazy_exports

_EXPORTS = {
    "LoadedModel": "saeflow.lm.model",
    "load_model": "saeflow.lm.model",
    "resolve_device": "saeflow.lm.model",
    "resolve_dtype": "saeflow.lm.model",
    "residual_mapping": "saeflow.lm.mappings",
    "describe_mapping": "saeflow.lm.mappings",
    "POSITIONS": "saeflow.lm.hookpoints",
    "check_position": "saeflow.lm.hookpoints",
    "parse_hook_name": "saeflow.lm.hookpoints",
    "HookPoint": "saeflow.lm.hooks",
    "Hooks": "saeflow.lm.hooks",
    "capture": "saeflow.lm.hooks",
    "DEFAULT_SPEC": "saeflow.lm.corpus_spec",
    "parse_tokens": "saeflow.lm.corpus_spec",
    "Corpus": "saeflow.lm.corpora",
    "TokenBatch": "saeflow.lm.corpora",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from saeflow.lm.corpora import Corpus as Corpus
    from saeflow.lm.corpora import TokenBatch as TokenBatch
    from saeflow.lm.corpus_spec import DEFAULT_SPEC as DEFAULT_SPEC
    from saeflow.lm.corpus_spec import parse_tokens as parse_tokens
    from saeflow.lm.hookpoints import POSITIONS as POSITIONS
    from saeflow.lm.hookpoints import check_position as check_position
    from saeflow.lm.hookpoints import parse_hook_name as parse_hook_name
    from saeflow.lm.hooks import HookPoint as HookPoint
    from saeflow.lm.hooks import Hooks as Hooks
    from saeflow.lm.hooks import capture as capture
    from saeflow.lm.mappings import describe_mapping as describe_mapping
    from saeflow.lm.mappings import residual_mapping as residual_mapping
    from saeflow.lm.model import LoadedModel as LoadedModel
    from saeflow.lm.model import load_model as load_model
    from saeflow.lm.model import resolve_device as resolve_device
    from saeflow.lm.model import resolve_dtype as resolve_dtype

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

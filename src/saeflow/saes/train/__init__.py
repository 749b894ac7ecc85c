"""Training a family of SAEs (layers x positions) from one pass of the model over a corpus.

  config    TrainConfig (the CLI reads it; no torch of its own)
  kernels   the sparse autograd products of the per-SAE engine
  recipe    what both engines share: scales, init, geometric median, resampling, export fold,
            checkpoint layout, and the `Engine` protocol the family loop drives
  sparse    SAETrainer: one SAE stepped alone with sparse products (fastest on a CPU)
  stacked   StackedTrainer: the SAEs of one width stepped as one batched problem (on a GPU)
  family    train_family: capture, chunks, checkpoints, the pack

Names load lazily: `from saeflow.saes.train import TrainConfig` imports config.py only.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saeflow.saes.train.config import TrainConfig
    from saeflow.saes.train.family import (
        CKPT_FILE,
        EngineGroup,
        TrainResult,
        check_resume,
        count_tokens,
        make_engines,
        pack_identity,
        prepare_training,
        train_family,
    )
    from saeflow.saes.train.kernels import BlockPre, GatherPre, csr_rows
    from saeflow.saes.train.recipe import (
        DIM_SCALE_NOTE,
        Engine,
        dim_scale,
        dim_scale_metadata,
        fold_dim_scale,
        moments,
    )
    from saeflow.saes.train.recipe import dim_scale as _dim_scale  # noqa: F401
    from saeflow.saes.train.recipe import dim_scale_metadata as _dim_scale_metadata  # noqa: F401
    from saeflow.saes.train.recipe import fold_dim_scale as _fold_dim_scale  # noqa: F401
    from saeflow.saes.train.sparse import SAETrainer
    from saeflow.saes.train.stacked import StackedTrainer

_WHERE = {
    "TrainConfig": "config",
    **dict.fromkeys(("CKPT_FILE", "EngineGroup", "TrainResult", "check_resume", "count_tokens",
                     "make_engines", "pack_identity", "prepare_training", "train_family"),
                    "family"),
    **dict.fromkeys(("BlockPre", "GatherPre", "csr_rows"), "kernels"),
    **dict.fromkeys(("DIM_SCALE_NOTE", "Engine", "dim_scale", "dim_scale_metadata",
                     "fold_dim_scale", "moments"), "recipe"),
    "SAETrainer": "sparse",
    "StackedTrainer": "stacked",
}
# Names of the single module this package was, kept for old imports.
_OLD_NAMES = {"_GatherPre": "GatherPre", "_BlockPre": "BlockPre", "_csr_rows": "csr_rows",
              "_dim_scale": "dim_scale", "_dim_scale_metadata": "dim_scale_metadata",
              "_fold_dim_scale": "fold_dim_scale", "_moments": "moments"}

__all__ = ["CKPT_FILE", "DIM_SCALE_NOTE", "BlockPre", "Engine", "EngineGroup", "GatherPre",
           "SAETrainer", "StackedTrainer", "TrainConfig", "TrainResult", "check_resume",
           "count_tokens", "csr_rows", "dim_scale", "dim_scale_metadata", "fold_dim_scale",
           "make_engines", "moments", "pack_identity", "prepare_training", "train_family"]


def __getattr__(name: str) -> Any:
    new = _OLD_NAMES.get(name, name)
    if new not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[new]}"), new)
    globals()[name] = value
    return value

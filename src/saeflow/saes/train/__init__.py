"""Training a family of SAEs (layers x positions) from one pass of the model over a corpus.

  config    TrainConfig (no torch: the CLI reads it)
  kernels   the sparse autograd products of the per-SAE engine
  recipe    what both engines share: scales, init, geometric median, resampling, export fold,
            checkpoint layout, and the `Engine` protocol the family loop drives
  sparse    SAETrainer, one SAE stepped alone with sparse products (CPU)
  stacked   StackedTrainer, SAEs of one width stepped as one batched dense problem (GPU)
  family    train_family: capture, chunking, checkpoints, the pack

Names load lazily, so `from saeflow.saes.train import TrainConfig` imports no torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saeflow.saes.train.config import TrainConfig
    from saeflow.saes.train.family import (
        CKPT_FILE,
        DIM_SCALE_NOTE,
        SAETrainer,
        StackedTrainer,
        TrainResult,
        check_resume,
        count_tokens,
        pack_identity,
        prepare_training,
        train_family,
    )
    from saeflow.saes.train.family import (
        _csr_rows as _csr_rows,
    )
    from saeflow.saes.train.family import (
        _dim_scale as _dim_scale,
    )
    from saeflow.saes.train.family import (
        _dim_scale_metadata as _dim_scale_metadata,
    )
    from saeflow.saes.train.family import (
        _fold_dim_scale as _fold_dim_scale,
    )
    from saeflow.saes.train.family import (
        _GatherPre as _GatherPre,
    )
    from saeflow.saes.train.family import (
        _moments as _moments,
    )

_WHERE = {
    "TrainConfig": "config",
    **{name: "family" for name in (
        "CKPT_FILE", "DIM_SCALE_NOTE", "SAETrainer", "StackedTrainer", "TrainResult", "_csr_rows",
        "_dim_scale", "_dim_scale_metadata", "_fold_dim_scale", "_GatherPre", "_moments",
        "check_resume", "count_tokens", "pack_identity", "prepare_training", "train_family")},
}

__all__ = ["CKPT_FILE", "DIM_SCALE_NOTE", "SAETrainer", "StackedTrainer", "TrainConfig",
           "TrainResult", "check_resume", "count_tokens", "pack_identity", "prepare_training",
           "train_family"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value

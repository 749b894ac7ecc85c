"""Scale-out on Ray: corpus passes cut into token shards whose sums merge exactly, the flow
fanned out by layer, training split into groups of SAEs.

This package is light to import: Ray itself is imported only by `saeflow.scale.ray_backend`,
which the stages reach only when `workers` is set. Without it every pass runs in this process
through the same shard-then-merge accumulation, so the results do not depend on the number of
workers (docs/scale.md).

    ScaleConfig, shard_batches   here (import-light: the command line reads ScaleConfig)
    merge.py        shard ranges and the in-order merge of shard accumulators
    shards.py       sharded_scan, run_jobs: one corpus pass for several consumers, any workers
    ray_backend.py  Ray: connecting, version checks, the shards and independent tasks on workers
    train.py        train_family_on_ray: a family's layers in groups, one Ray task per group

The other names below load on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from saeflow._lazy import lazy_exports
from saeflow.configs import Tokens, setting
from saeflow.errors import ScaleError

_EXPORTS = {
    "shard_ranges": "saeflow.scale.merge",
    "merge_in_order": "saeflow.scale.merge",
    "sharded_scan": "saeflow.scale.shards",
    "run_jobs": "saeflow.scale.shards",
    "train_family_on_ray": "saeflow.scale.train",
}

__all__ = ["DEFAULT_SHARD_TOKENS", "ScaleConfig", "shard_batches", *_EXPORTS]

if TYPE_CHECKING:
    from saeflow.scale.merge import merge_in_order as merge_in_order
    from saeflow.scale.merge import shard_ranges as shard_ranges
    from saeflow.scale.shards import run_jobs as run_jobs
    from saeflow.scale.shards import sharded_scan as sharded_scan
    from saeflow.scale.train import train_family_on_ray as train_family_on_ray

DEFAULT_SHARD_TOKENS = 262_144


@dataclass
class ScaleConfig:
    workers: int = setting(
        0, "Ray workers (tasks at once); 0: run in this process, Ray not imported")
    ray_address: str = setting(
        "", "a Ray cluster to join (host:6379 or ray://host:10001); empty: a local Ray with "
        "--workers CPUs")
    retries: int = setting(3, "tries of one shard (a killed worker included) before the job stops")
    shard_tokens: Tokens = setting(
        DEFAULT_SHARD_TOKENS, "tokens per corpus shard; results are bit-identical for any worker "
        "count at the same shard size (the single-process run included), so changing it changes "
        "the last bits")

    def __post_init__(self):
        if self.workers < 0:
            raise ScaleError(f"--workers must be 0 or more, not {self.workers}")
        if self.retries < 1:
            raise ScaleError(f"--retries must be at least 1, not {self.retries}")
        if self.shard_tokens < 1:
            raise ScaleError(f"--shard-tokens must be positive, not {self.shard_tokens}")
        if self.ray_address and not self.workers:
            raise ScaleError("--ray-address needs --workers N (how many tasks run at once)")

    @property
    def distributed(self) -> bool:
        return self.workers > 0


def shard_batches(cfg: ScaleConfig | None, batch_size: int, ctx_len: int) -> int:
    """Batches per shard: the shard size in tokens, rounded up to whole batches."""
    tokens = (cfg or ScaleConfig()).shard_tokens
    return max(1, -(-tokens // (batch_size * ctx_len)))

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

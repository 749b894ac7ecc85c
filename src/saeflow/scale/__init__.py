"""Scale-out on Ray: corpus passes cut into token shards whose sums merge exactly, the flow
fanned out by layer, training split into groups of SAEs.

This package is light to import: Ray itself is imported only by `saeflow.scale.ray_backend`,
which the stages reach only when `workers` is set. Without it every pass runs in this process
through the same shard-then-merge accumulation, so the results do not depend on the number of
workers (docs/scale.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from saeflow.errors import ScaleError

DEFAULT_SHARD_TOKENS = 262_144


@dataclass
class ScaleConfig:
    workers: int = 0  # Ray workers (tasks at once); 0: run in this process, Ray not imported
    ray_address: str = ""  # a Ray cluster to join (host:6379 or ray://host:10001); empty: a local Ray with --workers CPUs
    retries: int = 3  # tries of one shard (a killed worker included) before the job stops
    # tokens per corpus shard; results are bit-identical for any worker count at the same
    # shard size (the single-process run included), so changing it changes the last bits
    shard_tokens: int = DEFAULT_SHARD_TOKENS

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

"""The flow stage's settings (`FlowConfig`), and the names of its matching methods and null
models. Import-light (no torch, numpy or pandas at import time): the command line reads it to
build its options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from saeflow.configs import setting
from saeflow.errors import FlowError

if TYPE_CHECKING:
    import torch

MATCH_METHODS = ("decoder", "encoder", "folded", "permutation")
NULL_MODELS = ("shuffle", "columns", "rotation", "gaussian")


@dataclass
class FlowConfig:
    k: int = setting(5, "matches kept per feature and predecessor kind")
    method: Literal["decoder", "encoder", "folded", "permutation"] = setting(
        "decoder", "which directions are matched")
    precision: Literal["fp32", "bf16"] = setting(
        "fp32", "bf16 ranks in bf16 and re-scores the candidates exactly in fp32")
    null: Literal["columns", "rotation", "shuffle", "gaussian"] = setting(
        "columns", 'null model of the MLP / attention class thresholds: "columns" draws each '
        "coordinate from its column (keeps the components all features share; chosen by the "
        'co-firing evidence, docs/decisions.md); "rotation" turns the rows by a random '
        "orthogonal matrix; \"shuffle\" permutes each row's coordinates; \"gaussian\" is isotropic")
    null_samples: int = setting(2048, "null directions drawn per pair")
    null_quantile: float = setting(0.99, "the null's quantile that becomes the default threshold")
    seed: int = setting(0, "seed of the null model")
    geometry: Literal["auto", "no_massive", "raw"] = setting(
        "auto", "which coordinates the matching compares: \"no_massive\" sets each layer's massive "
        "residual dimensions (from the firing pass's variances) to zero before the cosine, \"raw\" "
        'keeps them; "auto": no_massive when the variances are known, else raw (the manifest '
        "says which ran)")
    block_a: int | None = setting(None, "rows of A per block; None: 1024 on a CPU, 8192 on a GPU")
    block_b: int | None = setting(None, "rows of B per block; None: 4096 on a CPU, 16384 on a GPU")
    memory_budget_mb: int = setting(
        512, "dictionaries larger than this are streamed from disk in blocks")
    device: str = setting(
        "auto", 'where the similarity products run: "auto" (cuda when present, else the CPU), or '
        "a device name. Results are the same up to fp32 rounding, so it is not part of the cache "
        "key.")

    def __post_init__(self):
        if self.method not in MATCH_METHODS:
            raise FlowError(f"unknown matching method {self.method!r}; use one of "
                            f"{', '.join(MATCH_METHODS)}")
        if self.k < 1:
            raise FlowError("k must be >= 1")
        if not 0.5 <= self.null_quantile < 1:
            raise FlowError("null_quantile must be in [0.5, 1)")
        if self.null not in NULL_MODELS:
            raise FlowError(f"unknown null model {self.null!r}; use one of {', '.join(NULL_MODELS)}")
        if self.geometry not in ("auto", "no_massive", "raw"):
            raise FlowError(f"unknown geometry {self.geometry!r}; use auto, no_massive or raw")

    def resolved_device(self) -> torch.device:
        import torch

        from saeflow.lm.model import resolve_device

        if self.device == "auto":  # not mps: the flow's top-k merges are not worth it there
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return resolve_device(self.device)

    def blocks(self) -> tuple[int, int]:
        """Block sizes: cache-sized on a CPU; large on a GPU, where one block's GEMM must
        outweigh its kernel launches and top-k merges."""
        gpu = self.resolved_device().type == "cuda"
        return (self.block_a or (8192 if gpu else 1024), self.block_b or (16384 if gpu else 4096))

    def match_kw(self, memory_budget: bool = True) -> dict:
        """The keyword arguments of top_k_pairs that say how (not what) to compute."""
        block_a, block_b = self.blocks()
        kw = dict(block_a=block_a, block_b=block_b, device=self.resolved_device())
        if memory_budget:
            kw["memory_budget"] = self.memory_budget_mb << 20
        return kw

    def identity(self) -> dict:
        """The settings that change the matches (block sizes do not)."""
        k = 1 if self.method == "permutation" else self.k
        return {"k": k, "method": self.method, "precision": self.precision, "null": self.null,
                "null_samples": self.null_samples, "seed": self.seed, "geometry": self.geometry}

"""The settings of the deactivation experiment (`ValidateConfig`), its method names and rank
bins. Kept free of torch and pandas so that the CLI and the pipeline's config can import them
without loading either; the field comments are the options' help."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from saeflow.configs import CorpusSpec, Layers, setting
from saeflow.errors import ValidateError
from saeflow.ids import PRED_ORIGINS
from saeflow.lm.corpus_spec import DEFAULT_SPEC

METHODS = ("top1_cosine", "predecessor_group", "top5_cosine", "random_top5", "permutation",
           "top1_pearson", "exhaustive", "exhaustive_top5", "exhaustive_control",
           "control_matched", "control_group")
# The headline rates: their CIs are what `ci_halfwidth` bounds, the breakdown tables' columns.
HEADLINE_METHODS = ("top1_cosine", "predecessor_group", "exhaustive", "exhaustive_control",
                    "control_matched")
# Paired differences on the same cases: a method minus its own null.
PAIRS = (("top1_cosine", "control_matched"), ("exhaustive", "exhaustive_control"),
         ("predecessor_group", "control_group"))
VALIDATE_DIR = "validate"  # RUN/validate: cases.parquet, summary.json, r_sweep.csv
RULES = ("rank", "threshold")
TARGET_CHOICES = ("random", "all", "most_active")
KINDS = PRED_ORIGINS
RANK_BIN = 8  # rank bin width when the target SAE has no k (a TopK SAE's bins are k/4 wide)
RANK_BINS = 4  # bins below the top one; ranks >= RANK_BINS x width share the last bin
HEADLINE_RANKS = 16  # the separate headline "top1_cosine, ranks 0-15"
SIMILARITY_BINS = [0.0, 0.3, 0.5, 0.7, 1.01]
# The paper's layers (Gemma 2 2B, 26 layers), scaled to other depths by `paper_layers`.
PAPER_LAYERS, PAPER_DEPTH = (6, 12, 18), 26

# The paper's Table 1 (Gemma 2 2B + Gemma Scope, 1,894 features), for side-by-side reports.
PAPER_TABLE1 = {"top1_cosine": (0.75, 0.65), "top1_pearson": (0.74, 0.65),
                "exhaustive": (0.83, 0.73)}


@dataclass
class ValidateConfig:
    layers: Layers | None = setting(
        None, "default: the paper's layers 6, 12 and 18 of 26 scaled to the model's depth (4, 8, "
        "12 of 18)")
    texts: int = setting(30, "at least this many texts (more when ci_halfwidth asks for them)")
    tokens_per_text: int = setting(
        5, "token positions tried per text (the paper: 35 texts x 5 tokens)")
    max_features: int | None = setting(
        10, "targets per (text, token, layer); None: every active one")
    target_choice: Literal["random", "all", "most_active"] = setting(
        "random", "which active features become targets: a uniform sample, all of them, or the "
        "most active (biased towards hard targets)")
    ctx_len: int = setting(64, "tokens per text")
    corpus: CorpusSpec = setting(DEFAULT_SPEC, "")
    split: Literal["heldout", "train", "all"] = setting(
        "heldout", "the corpus split the texts come from: heldout (documents the SAEs never "
        "trained on)")
    seed: int = setting(0, "seed of the texts, tokens and targets")
    batch_rows: int = setting(
        128, "trial rows per one-token forward (each holds a copy of the KV cache)")
    interval: Literal["t", "bootstrap"] = setting(
        "t", "95% CIs clustered by text: Student t with n_texts - 1 df, or a bootstrap over texts")
    ci_halfwidth: float | None = setting(
        None, "add texts until every headline 95% CI is this narrow")
    max_texts: int = setting(200, "the cap when ci_halfwidth is set")
    control_tolerance: float = setting(1.25, "control's removal norm within [1/t, t] x the top-1's")
    keep_dead: bool = setting(False, "keep never-firing latents in the candidate lists")
    r_values: list[float] = setting(
        [-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0], "rescale factors r of the sweep")
    r_graphs: int = setting(4, "flow graphs in the r sweep (0: none)")
    r_texts: int = setting(8, "texts per graph in the r sweep")

    def __post_init__(self) -> None:
        if self.target_choice == "all":  # every active feature: no cap
            self.max_features = None

    def check(self) -> None:
        if self.target_choice not in TARGET_CHOICES:
            raise ValidateError(f"target_choice must be one of {', '.join(TARGET_CHOICES)}, "
                                f"not {self.target_choice!r}")
        if self.max_features is not None and self.max_features < 1:
            raise ValidateError("max_features must be at least 1 (or None for every feature)")
        if self.texts < 1 or self.tokens_per_text < 1 or self.batch_rows < 1:
            raise ValidateError("texts, tokens_per_text and batch_rows must be at least 1")
        if self.split not in ("heldout", "train", "all"):
            raise ValidateError("split must be heldout, train or all")
        if self.interval not in ("t", "bootstrap"):
            raise ValidateError("interval must be t or bootstrap")
        if self.ci_halfwidth is not None and not 0 < self.ci_halfwidth < 0.5:
            raise ValidateError("ci_halfwidth is a half-width of a rate, in (0, 0.5)")
        if not self.control_tolerance >= 1:
            raise ValidateError("control_tolerance is a ratio, at least 1")


def paper_layers(n_layers: int, paper: tuple[int, ...] = PAPER_LAYERS,
                 depth: int = PAPER_DEPTH) -> list[int]:
    """The paper's layers (6, 12, 18 of Gemma 2 2B's 26) at the same relative depth of a model
    with n_layers: round(L * n_layers / 26), kept in [1, n_layers - 1] (a target needs R_{L-1}).
    18 layers: 4, 8, 12."""
    return sorted({min(max(1, math.floor(L * n_layers / depth + 0.5)), max(1, n_layers - 1))
                   for L in paper})


def default_layers(n_layers: int) -> list[int]:
    return paper_layers(n_layers)


def rank_bin_width(sae) -> int:
    """Rank bins of k/4 for an SAE with k (TopK, BatchTopK, GroupMax), else RANK_BIN."""
    k = getattr(sae, "k", None)
    return max(1, int(k) // RANK_BINS) if k else RANK_BIN


def rank_bin(rank: int, width: int = RANK_BIN) -> str:
    """'0-7', '8-15', '16-23', '24-31', then '32-inf' (bins of `width`, RANK_BINS of them)."""
    top = RANK_BINS * width
    if rank >= top:
        return f"{top}-inf"
    a = (int(rank) // width) * width
    return f"{a}-{a + width - 1}"


def bin_start(label: str) -> float:
    """The first number of a bin label ('8-15' -> 8), for sorting bins; inf when none."""
    m = re.search(r"-?\d+(\.\d+)?", label)
    return float(m.group()) if m else math.inf

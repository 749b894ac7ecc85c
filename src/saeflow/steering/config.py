"""The settings of steering: sampling (`SamplingConfig`) and the steering sweep (`SweepConfig`
and its profiles). Kept free of torch and pandas so that the CLI can build its options from
these classes without loading them; the field comments are the options' help."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from saeflow.configs import Tokens, setting
from saeflow.errors import GenerationError, SweepError

MAX_NEW_TOKENS = 512
MAX_SAMPLES = 64

DEFAULT_PROMPT = "I think"


@dataclass
class SamplingConfig:
    max_new_tokens: Tokens = setting(40, "tokens generated per sample")
    n: int = setting(1, "samples per prompt")
    temperature: float = setting(1.0, "0: greedy")
    top_p: float = setting(1.0, "nucleus sampling mass (1: off)")
    seed: int = setting(0, "sampling seed (the default and steered runs share it)")

    def check(self, force: bool = False) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise GenerationError("n and max_new_tokens must be at least 1")
        if not force and self.n > MAX_SAMPLES:
            raise GenerationError(f"n = {self.n} is beyond the limit of {MAX_SAMPLES} samples "
                                  f"per request (use --force to lift it)")
        if not force and self.max_new_tokens > MAX_NEW_TOKENS:
            raise GenerationError(f"max_new_tokens = {self.max_new_tokens} is beyond the limit of "
                                  f"{MAX_NEW_TOKENS} (use --force to lift it)")
        if not self.temperature >= 0:
            raise GenerationError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise GenerationError("top_p must be in (0, 1]")


# `saeflow steer` compares default and steered text side by side: a few samples each, with
# nucleus sampling so that the comparison is not one lucky draw.
STEER_SAMPLING = SamplingConfig(n=4, top_p=0.9)


SWEEP_DIR = "sweep"

# What the sweep steers, per theme (the `mode` column of its tables): the seeds alone, the
# graph's features at one layer, at every layer up to it, or that at single-layer's norm.
SWEEP_GRAPH_MODES = ("seed", "single", "cumulative", "cumulative_norm")
OBJECTIVES = ("activation", "deactivation")
PAPER_PROMPT = "I think that the biggest problem of contemporary theoretical physics is "


@dataclass
class SweepConfig:
    themes: list[str] = setting(
        ["religion", "mathematics", "arts", "biology"], "themes searched in the feature index, "
        "e.g. religion,mathematics,arts,biology")
    modes: list[str] = setting(
        ["seed", "single", "cumulative", "cumulative_norm"], "steering modes: seed, single, "
        "cumulative, cumulative_norm")
    strengths: list[float] = setting(
        [0.25, 0.5, 1.0, 2.0, 4.0], "typical activations (add), or r (rescale), e.g. 0,-1,-2,-4")
    max_layers: int = setting(3, "graph layers tried per theme (evenly spaced over the graph)")
    prompt: str = setting("I think ", "the prompt every sample continues")
    n: int = setting(32, "samples per setting and sampling seed (one batch)")
    max_new_tokens: Tokens = setting(36, "tokens generated per sample")
    seeds: list[int] = setting([0], "sampling seeds")
    temperature: float = setting(1.0, "sampling temperature (0: greedy)")
    top_p: float = setting(0.9, "nucleus sampling mass")
    kind: Literal["add", "rescale"] = setting(
        "add", "add (activation) or rescale (r x the current activation)")
    objective: str = setting("activation", "which score ranks settings: activation | deactivation")
    seeds_per_theme: int = setting(1, "seed features per theme (the paper: 10), graphs joined")
    t_res: float = setting(0.5, "")
    classifier_docs: int | None = setting(
        4000, "wiki summaries for the topic classifier (0 or None: all)")
    seed_features: dict[str, str | list[str]] = setting(
        {}, "theme -> feature id, or a list of ids (no search)")
    name: str = setting("", '"" writes RUN/sweep; a profile name writes RUN/sweep-<name>')

    def __post_init__(self) -> None:
        if self.classifier_docs == 0:  # 0 on the command line: every summary
            self.classifier_docs = None

    def check(self) -> None:
        bad = [m for m in self.modes if m not in SWEEP_GRAPH_MODES]
        if bad:
            raise SweepError(f"unknown modes {bad}; use {', '.join(SWEEP_GRAPH_MODES)}")
        if self.objective not in OBJECTIVES:
            raise SweepError(f"objective must be one of {', '.join(OBJECTIVES)}")
        if self.kind not in ("add", "rescale"):
            raise SweepError("kind must be add or rescale")
        if "cumulative_norm" in self.modes and self.kind != "add":
            raise SweepError("cumulative_norm matches injected norms, which only additive plans "
                             "have; leave it out for rescale")
        if self.seeds_per_theme < 1 or self.n < 1 or not self.strengths:
            raise SweepError("seeds_per_theme and n must be at least 1, and strengths non-empty")

    @property
    def op(self) -> str:
        """The edit every plan of the sweep makes: add or rescale (the `kind` option)."""
        return self.kind

    @property
    def score(self) -> str:
        return f"{self.objective}_score"

    @property
    def out_dir(self) -> str:
        return SWEEP_DIR if not self.name else f"{SWEEP_DIR}-{self.name}"

    def sampling(self, seed: int) -> SamplingConfig:
        """The sampling of every generation of the sweep, with sampling seed `seed`."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, n=self.n,
                              temperature=self.temperature, top_p=self.top_p, seed=seed)


# The paper's steering settings (flow paper section 6; shared/reference/feature-flow.md).
_PAPER_DEACT = dict(themes=["physics"], modes=["single", "cumulative"], kind="rescale",
                    objective="deactivation", seeds_per_theme=10, prompt=PAPER_PROMPT,
                    max_new_tokens=96, top_p=0.7, temperature=1.27)
def _profile(**kw) -> SweepConfig:
    return SweepConfig(**kw)


SWEEP_PROFILES = {
    "ours": _profile(),
    "paper": _profile(**_PAPER_DEACT, name="paper",
                      strengths=[0.0, -1.0, -2.0, -4.0, -8.0, -16.0, -32.0, -64.0]),
    "paper-activation": _profile(name="paper-activation", seeds_per_theme=10,
                                 themes=["religion", "biology", "arts", "mathematics"]),
    # Small enough for `make demo` (see docs/benchmarks.md for the times).
    "demo": _profile(themes=["religion"], strengths=[0.5, 2.0], max_layers=2, n=8,
                     modes=["seed", "single", "cumulative", "cumulative_norm"]),
    "paper-demo": _profile(**{**_PAPER_DEACT, "seeds_per_theme": 10}, name="paper",
                           strengths=[0.0, -4.0, -16.0], max_layers=2, n=8),
}


def sweep_profile(name: str, **overrides) -> SweepConfig:
    if name not in SWEEP_PROFILES:
        raise SweepError(f"unknown sweep profile {name!r}; known: {', '.join(SWEEP_PROFILES)}")
    return replace(SWEEP_PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})

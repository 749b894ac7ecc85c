"""The settings of `saeflow run` and its profiles: the stages' own configs, nested.

`PipelineConfig` holds one config per stage (`cfg.index` is the IndexConfig the index stage
builds with, `cfg.validate` the ValidateConfig, ...), and a stage's settings digest is its
config's identity (`stage_identity`). The flat names of the settings (`eval_tokens`,
`index_tokens`, ...) remain as a view: `saeflow run` takes its overrides by them,
RUN/pipeline.json records them, and `PipelineConfig.from_flat` builds a config from them."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from saeflow.checks import at_least
from saeflow.configs import CorpusSpec, Tokens, setting
from saeflow.errors import PipelineError, SaeflowError
from saeflow.evolution.config import StatsConfig
from saeflow.features.config import IndexConfig
from saeflow.lm.corpus_spec import DEFAULT_SPEC
from saeflow.steering.config import SweepConfig, sweep_profile
from saeflow.steering.validate_config import ValidateConfig


@dataclass
class EvalConfig:
    """Eval: FVU, L0 and dead latents over held-out text, then the ΔCE / KL splice. The class
    defaults are `saeflow pack eval`'s (evaluate_pack's); the pipeline's are in PipelineConfig."""
    tokens: Tokens = setting(8192, "held-out tokens for FVU and L0")
    dead_tokens: Tokens = setting(50_000, "held-out tokens over which dead and dense latents "
                                  "are counted (at least --tokens)")
    # bootstrap intervals over rows (over documents in `saeflow run`)
    ce_tokens: Tokens = setting(1024, "held-out tokens for ΔCE/KL (costly)")
    # each spliced position costs a full forward per token
    ce_positions: list[str] | None = setting(None, "positions whose SAEs are spliced for "
                                             "ΔCE/KL, comma list (default: all)")
    corpus: CorpusSpec = setting(DEFAULT_SPEC, "held-out text sources with shares")
    # the shape of the pipeline's shared pass (`saeflow pack eval` reads in evaluate_pack's)
    batch_size: int = setting(32, "contexts per model forward of the pass")
    ctx_len: int = setting(128, "tokens per context of the pass")

    def identity(self) -> dict:
        """What eval's outputs depend on ("version" bumps when their meaning changes)."""
        return {"tokens": self.tokens, "ce_tokens": self.ce_tokens,
                "ce_positions": self.ce_positions, "dead_tokens": self.dead_tokens,
                "corpus": self.corpus, "pass": [self.batch_size, self.ctx_len], "version": 2}


def _pipeline_eval() -> EvalConfig:
    """The residual stream's ΔCE is the headline: only resid_post is spliced."""
    return EvalConfig(tokens=4096, ce_tokens=4096, ce_positions=["resid_post"])


@dataclass
class FlowStageConfig:
    """The flow stage: the firing pass that flags dead latents, then the data-free flow."""
    firing_tokens: Tokens = setting(16_384, "the firing pass that flags dead and rare latents "
                                    "for the flow")
    keep_dead: bool = setting(False, "keep never-firing latents in the flow")

    def identity(self) -> dict:
        """What the flow's outputs depend on ("version" bumps when their meaning changes)."""
        return {"firing_tokens": self.firing_tokens, "keep_dead": self.keep_dead, "version": 2}


def _demo_sweep() -> SweepConfig:
    return sweep_profile("demo", themes=["religion", "biology"], strengths=[0.5, 2.0], seeds=[0],
                         n=4, max_layers=2, classifier_docs=2000)


def _paper_sweep() -> SweepConfig:
    return sweep_profile("paper-demo", strengths=[0.0, -8.0], n=8, max_layers=1,
                         classifier_docs=2000)


@dataclass
class SweepStageConfig:
    """The sweep stage: our steering sweep (`ours`), then the paper's deactivation experiment
    (`paper`), both judged by one topic classifier (trained on `ours.classifier_docs`)."""
    ours: SweepConfig = setting(help="the steering sweep (activation by adding)",
                                default_factory=_demo_sweep)
    paper: SweepConfig = setting(help="the paper's deactivation by rescale, small",
                                 default_factory=_paper_sweep)

    def __post_init__(self) -> None:
        if self.ours.classifier_docs != self.paper.classifier_docs:
            raise PipelineError("the two sweeps share one topic classifier: give them the same "
                                "classifier_docs")

    def identity(self) -> dict:
        """What the sweeps' outputs depend on ("version" bumps when their meaning changes)."""
        o, p = self.ours, self.paper
        return {"themes": o.themes, "strengths": o.strengths, "seeds": o.seeds, "n": o.n,
                "max_layers": o.max_layers, "paper": [p.strengths, p.n, p.max_layers],
                "classifier_docs": o.classifier_docs, "version": 2}


def _pass_config(cls: type) -> Any:
    """The index's or the statistics' config on the held-out text of eval's pass."""
    return cls(tokens=40_000, split="heldout", batch_size=32, ctx_len=128)


def _validate() -> ValidateConfig:
    return ValidateConfig(max_texts=60, r_graphs=2, r_texts=4)


@dataclass
class PipelineConfig:
    model: str = setting("embedded", "'embedded', an HF folder, a hub id, or a .gguf file")
    pack: str = setting("embedded", "embedded / embedded-quick (trained once into the cache), a "
                        "pack folder (SAELens, Gemma Scope, Gemma Scope 2, sparsify, saeflow) or "
                        "a hub release name (downloaded once)")
    device: str | None = setting(None, "cuda, mps or cpu (default: automatic)")
    flow: FlowStageConfig = setting(help="the flow stage", default_factory=FlowStageConfig)
    # eval, the index and the statistics read the same held-out text in the same batches, so
    # one pass of the model (and one encoding by every SAE) feeds all three
    eval: EvalConfig = setting(help="the eval stage", default_factory=_pipeline_eval)
    index: IndexConfig = setting(help="the index stage",
                                 default_factory=lambda: _pass_config(IndexConfig))
    stats: StatsConfig = setting(help="the statistics stage",
                                 default_factory=lambda: _pass_config(StatsConfig))
    validate: ValidateConfig = setting(help="the validate stage", default_factory=_validate)
    sweep: SweepStageConfig = setting(help="the sweep stage", default_factory=SweepStageConfig)

    def __post_init__(self) -> None:
        """The rules of the settings alone: bad values fail here, before any stage runs."""
        passes = (self.eval, self.index, self.stats)
        if len({(c.corpus) for c in (*passes, self.validate)}) > 1:
            raise PipelineError("eval, the index, the statistics and validate read one corpus: "
                                "give them the same corpus")
        if len({(c.batch_size, c.ctx_len) for c in passes}) > 1:
            raise PipelineError("eval, the index and the statistics share one pass: give them "
                                "the same batch_size and ctx_len")
        check_flat(self.flat())

    @property
    def corpus(self) -> str:
        return self.eval.corpus

    def check(self) -> None:
        """The embedded packs are trained on the embedded model: refuse another model with them."""
        if self.pack.startswith("embedded") and self.model not in ("embedded", "gemma-3-270m"):
            raise PipelineError(f"give --pack for {self.model}: the embedded pack belongs to the "
                                f"embedded model")

    def flat(self) -> dict:
        """The settings by their flat names, in FLAT's order (RUN/pipeline.json's "config")."""
        return {name: _get(self, paths[0]) for name, paths in FLAT.items()}

    @classmethod
    def from_flat(cls, base: PipelineConfig | None = None, **flat: Any) -> PipelineConfig:
        """`base` (default: the defaults) with settings given by their flat names."""
        unknown = sorted(set(flat) - set(FLAT))
        if unknown:
            raise PipelineError(f"unknown pipeline settings: {', '.join(unknown)}")
        base = base or cls()
        check_flat({**base.flat(), **flat})
        changes: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            for path in FLAT[name]:
                stage, _, key = path.rpartition(".")
                changes.setdefault(stage, {})[key] = value
        try:
            return _replaced(base, "", changes)
        except PipelineError:
            raise
        except SaeflowError as e:  # a stage config's own rule, named by its flat setting
            raise PipelineError(str(e)) from None


# The flat names: name -> the fields that hold it (every one gets the value; the first is read).
FLAT: dict[str, tuple[str, ...]] = {
    "model": ("model",), "pack": ("pack",),
    "corpus": ("eval.corpus", "index.corpus", "stats.corpus", "validate.corpus"),
    "eval_tokens": ("eval.tokens",), "ce_tokens": ("eval.ce_tokens",),
    "ce_positions": ("eval.ce_positions",), "dead_tokens": ("eval.dead_tokens",),
    "index_tokens": ("index.tokens",), "stats_tokens": ("stats.tokens",),
    "pass_batch_size": ("eval.batch_size", "index.batch_size", "stats.batch_size"),
    "pass_ctx_len": ("eval.ctx_len", "index.ctx_len", "stats.ctx_len"),
    "validate_texts": ("validate.texts",), "validate_tokens_per_text": ("validate.tokens_per_text",),
    "validate_ci": ("validate.ci_halfwidth",), "validate_max_texts": ("validate.max_texts",),
    "validate_r_graphs": ("validate.r_graphs",),
    "sweep_themes": ("sweep.ours.themes",), "sweep_strengths": ("sweep.ours.strengths",),
    "sweep_seeds": ("sweep.ours.seeds",), "sweep_n": ("sweep.ours.n",),
    "sweep_max_layers": ("sweep.ours.max_layers",),
    "paper_strengths": ("sweep.paper.strengths",), "paper_n": ("sweep.paper.n",),
    "paper_max_layers": ("sweep.paper.max_layers",),
    "classifier_docs": ("sweep.ours.classifier_docs", "sweep.paper.classifier_docs"),
    "firing_tokens": ("flow.firing_tokens",), "keep_dead": ("flow.keep_dead",),
    "device": ("device",),
}
# the help of a flat name that says more than its first field's help (`saeflow run` options)
FLAT_HELP = {"corpus": "text sources with shares, e.g. wiki=0.8,python=0.2 or a text file",
             "index_tokens": "tokens of the feature index pass",
             "stats_tokens": "tokens of the co-activation statistics pass"}


def _get(obj: Any, path: str) -> Any:
    for key in path.split("."):
        obj = getattr(obj, key)
    return obj


def _replaced(obj: Any, prefix: str, changes: dict[str, dict[str, Any]]) -> Any:
    """`obj` with `changes` ({dotted config path: {field: value}}) made, inner configs first."""
    own = dict(changes.get(prefix, {}))
    for f in dataclasses.fields(obj):
        path = f"{prefix}.{f.name}" if prefix else f.name
        if any(p == path or p.startswith(path + ".") for p in changes):
            own[f.name] = _replaced(getattr(obj, f.name), path, changes)
    return dataclasses.replace(obj, **own) if own else obj


def check_flat(flat: dict) -> None:
    """The pipeline's rules on its flat settings (the names `saeflow run` takes)."""
    view = _View(flat)
    at_least(view, 1, "eval_tokens", "ce_tokens", "dead_tokens", "index_tokens",
             "stats_tokens", "firing_tokens", "validate_texts", "validate_tokens_per_text",
             "validate_max_texts", "sweep_n", "sweep_max_layers", "paper_n",
             "paper_max_layers", "classifier_docs", error=PipelineError)
    at_least(view, 0, "validate_r_graphs", error=PipelineError)
    ci = flat["validate_ci"]
    if ci is not None and not 0 < ci < 1:
        raise PipelineError(f"validate_ci must be in (0, 1), not {ci!r}")
    for name in ("sweep_strengths", "paper_strengths"):
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in flat[name]):
            raise PipelineError(f"{name} must be finite numbers, not {flat[name]!r}")


class _View:
    def __init__(self, flat: dict) -> None:
        self.__dict__.update(flat)


def stage_identity(cfg: PipelineConfig, stage: str) -> dict:
    """What a stage's outputs depend on (a change reruns it): the model, the pack and the
    identity of the stage's config ("version" bumps when the outputs change meaning)."""
    return {"model": cfg.model, "pack": cfg.pack, **_STAGE_IDENTITY[stage](cfg)}


def _pass_identity(c: Any, version: int) -> dict:
    """The index's or the statistics' identity as a stage."""
    return {"tokens": c.tokens, "corpus": c.corpus, "pass": [c.batch_size, c.ctx_len],
            "version": version}


def _validate_identity(c: ValidateConfig) -> dict:
    return {"texts": c.texts, "r_graphs": c.r_graphs, "tokens_per_text": c.tokens_per_text,
            "ci": c.ci_halfwidth, "max_texts": c.max_texts, "corpus": c.corpus, "version": 3}


_STAGE_IDENTITY = {
    "pack": lambda cfg: {}, "report": lambda cfg: {},
    "flow": lambda cfg: cfg.flow.identity(), "eval": lambda cfg: cfg.eval.identity(),
    "index": lambda cfg: _pass_identity(cfg.index, 2),
    "stats": lambda cfg: _pass_identity(cfg.stats, 3),
    "validate": lambda cfg: _validate_identity(cfg.validate),
    "sweep": lambda cfg: cfg.sweep.identity(),
}


# QUICK trades statistical power for time, never correctness: every stage still runs for real
# (its budget on 2 CPU cores: docs/benchmarks.md).
PROFILES = {
    "default": PipelineConfig(),
    "quick": PipelineConfig.from_flat(
        pack="embedded-quick", eval_tokens=512, ce_tokens=128, dead_tokens=4_096,
        index_tokens=8_000, stats_tokens=8_000, validate_texts=2, validate_tokens_per_text=4,
        validate_ci=None, validate_r_graphs=1, sweep_themes=["religion"], sweep_strengths=[2.0],
        sweep_n=4, sweep_max_layers=1, paper_strengths=[0.0, -8.0], paper_n=4,
        paper_max_layers=1, firing_tokens=8_192, classifier_docs=800),
}

"""The settings of `saeflow run` and its profiles (kept apart from the stages so that the CLI can
build its options without importing every stage)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from saeflow.checks import at_least
from saeflow.errors import CorpusError, PipelineError
from saeflow.lm.corpora import DEFAULT_SPEC, check_corpus_spec


@dataclass
class PipelineConfig:
    model: str = "embedded"  # 'embedded', an HF folder, a hub id, or a .gguf file
    # embedded / embedded-quick (trained once into the cache), a pack folder (SAELens, Gemma
    # Scope, Gemma Scope 2, sparsify, saeflow) or a hub release name (downloaded once)
    pack: str = "embedded"
    corpus: str = DEFAULT_SPEC  # text sources with shares, e.g. wiki=0.8,python=0.2 or a text file
    eval_tokens: int = 4096
    ce_tokens: int = 4096  # held-out tokens of the ΔCE / KL splice (bootstrap intervals over rows)
    # positions whose SAEs are spliced for ΔCE (each costs a full forward per token; the
    # residual stream's ΔCE is the headline): comma list, or empty for all
    ce_positions: list[str] = field(default_factory=lambda: ["resid_post"])
    dead_tokens: int = 50_000  # held-out tokens over which dead latents are counted
    index_tokens: int = 40_000  # tokens of the feature index pass
    stats_tokens: int = 40_000  # tokens of the co-activation statistics pass
    # Eval, the index and the statistics read the same held-out text in the same batches, so
    # one pass of the model (and one encoding by every SAE) feeds all three.
    pass_batch_size: int = 32
    pass_ctx_len: int = 128
    # The deactivation experiment (section 5.2): held-out texts x token positions, at the
    # paper's layers scaled to the depth; the paper used 35 x 5. 95% CIs are clustered by text
    # with a t quantile, so few texts give wide intervals.
    validate_texts: int = 30
    validate_tokens_per_text: int = 5
    # `saeflow validate --ci 0.05` adds texts until each headline rate is known to +-5 points;
    # the demo keeps a fixed sample.
    validate_ci: float | None = None
    validate_max_texts: int = 60
    validate_r_graphs: int = 2
    sweep_themes: list[str] = field(default_factory=lambda: ["religion", "biology"])
    sweep_strengths: list[float] = field(default_factory=lambda: [0.5, 2.0])
    sweep_seeds: list[int] = field(default_factory=lambda: [0])
    sweep_n: int = 4
    sweep_max_layers: int = 2
    # The paper's deactivation experiment (sweep profile paper-demo): r values, samples, layers.
    paper_strengths: list[float] = field(default_factory=lambda: [0.0, -8.0])
    paper_n: int = 8
    paper_max_layers: int = 1
    classifier_docs: int = 2000
    firing_tokens: int = 16_384  # the firing pass that flags dead and rare latents for the flow
    keep_dead: bool = False
    device: str | None = None  # cuda, mps or cpu (default: automatic)

    def __post_init__(self) -> None:
        """The rules of the settings alone: bad values fail here, before any stage runs."""
        at_least(self, 1, "eval_tokens", "ce_tokens", "dead_tokens", "index_tokens",
                 "stats_tokens", "firing_tokens", "validate_texts", "validate_tokens_per_text",
                 "validate_max_texts", "sweep_n", "sweep_max_layers", "paper_n",
                 "paper_max_layers", "classifier_docs", error=PipelineError)
        at_least(self, 0, "validate_r_graphs", error=PipelineError)
        if self.validate_ci is not None and not 0 < self.validate_ci < 1:
            raise PipelineError(f"validate_ci must be in (0, 1), not {self.validate_ci!r}")
        for name in ("sweep_strengths", "paper_strengths"):
            if not all(isinstance(v, (int, float)) and math.isfinite(v)
                       for v in getattr(self, name)):
                raise PipelineError(f"{name} must be finite numbers, not {getattr(self, name)!r}")
        try:
            check_corpus_spec(self.corpus)
        except CorpusError as e:
            raise PipelineError(str(e)) from None

    def check(self) -> None:
        """The embedded packs are trained on the embedded model: refuse another model with them."""
        if self.pack.startswith("embedded") and self.model not in ("embedded", "gemma-3-270m"):
            raise PipelineError(f"give --pack for {self.model}: the embedded pack belongs to the "
                                f"embedded model")

    def index_config(self):
        from saeflow.features.index import IndexConfig

        return IndexConfig(tokens=self.index_tokens, corpus=self.corpus, split="heldout",
                           batch_size=self.pass_batch_size, ctx_len=self.pass_ctx_len)

    def stats_config(self):
        from saeflow.evolution.stats import StatsConfig

        return StatsConfig(tokens=self.stats_tokens, corpus=self.corpus, split="heldout",
                           batch_size=self.pass_batch_size, ctx_len=self.pass_ctx_len)

    def stage_settings(self, stage: str) -> dict:
        """What a stage's outputs depend on (a change reruns it)."""
        common = {"model": self.model, "pack": self.pack}
        # "version" bumps when a stage's outputs change meaning (flow 2: t_res, the rotation
        # null, the no_massive geometry; stats 2: co-firing counts)
        extra = {"pack": {}, "flow": {"firing_tokens": self.firing_tokens,
                                      "keep_dead": self.keep_dead, "version": 2}, "report": {},
                 "eval": {"tokens": self.eval_tokens, "ce_tokens": self.ce_tokens,
                          "ce_positions": self.ce_positions,
                          "dead_tokens": self.dead_tokens, "corpus": self.corpus,
                          "pass": [self.pass_batch_size, self.pass_ctx_len], "version": 2},
                 "index": {"tokens": self.index_tokens, "corpus": self.corpus,
                           "pass": [self.pass_batch_size, self.pass_ctx_len], "version": 2},
                 "stats": {"tokens": self.stats_tokens, "corpus": self.corpus, "version": 3,
                           "pass": [self.pass_batch_size, self.pass_ctx_len]},
                 "validate": {"texts": self.validate_texts, "r_graphs": self.validate_r_graphs,
                              "tokens_per_text": self.validate_tokens_per_text,
                              "ci": self.validate_ci, "max_texts": self.validate_max_texts,
                              "corpus": self.corpus, "version": 3},
                 "sweep": {"themes": self.sweep_themes, "strengths": self.sweep_strengths,
                           "seeds": self.sweep_seeds, "n": self.sweep_n,
                           "max_layers": self.sweep_max_layers,
                           "paper": [self.paper_strengths, self.paper_n, self.paper_max_layers],
                           "classifier_docs": self.classifier_docs, "version": 2}}[stage]
        assert isinstance(extra, dict)  # every stage's settings are a dict
        return {**common, **extra}


# Budgets measured on 2 CPU cores (docs/benchmarks.md); a GPU is much faster. QUICK trades
# statistical power for time, never correctness: every stage still runs for real.
PROFILES = {
    "default": PipelineConfig(),
    "quick": PipelineConfig(pack="embedded-quick", eval_tokens=512, ce_tokens=128, dead_tokens=4_096,
                            index_tokens=8_000, stats_tokens=8_000, validate_texts=2,
                            validate_tokens_per_text=4, validate_ci=None, validate_r_graphs=1,
                            sweep_themes=["religion"], sweep_strengths=[2.0], sweep_n=4, sweep_max_layers=1,
                            paper_strengths=[0.0, -8.0], paper_n=4, paper_max_layers=1,
                            firing_tokens=8_192, classifier_docs=800),
}

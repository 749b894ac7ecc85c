"""The settings of a pass of the model over a corpus (`CorpusPassConfig`, which the index and
statistics configs extend) and the pass as the scan runs it (`ScanSpec`). Light to import (no
torch): the CLI reads the config classes to build its options."""
from __future__ import annotations

from dataclasses import dataclass

from saeflow.checks import at_least, dtype_choice
from saeflow.configs import CorpusSpec, Tokens, setting
from saeflow.errors import ConfigError
from saeflow.lm.corpus_spec import DEFAULT_SPEC, check_corpus_spec


@dataclass
class CorpusPassConfig:
    """The settings every pass of the model over a corpus shares (index, statistics)."""
    tokens: Tokens = setting(200_000, "tokens to read (e.g. 200k, 2M)")
    corpus: CorpusSpec = setting(
        DEFAULT_SPEC, "sources with text shares: wiki, python, PATH, hf:NAME")
    seed: int = setting(0, "seed of the corpus order")
    batch_size: int = setting(32, "contexts per model forward")
    ctx_len: int = setting(128, "tokens per context")
    encoder_dtype: str = setting(
        "auto", "SAE encoder matmul: auto (bfloat16 where the device has native bf16, else "
        "float32), float32, bfloat16")
    split: str = setting(
        "train", "corpus documents: train, or heldout (the ~5% that SAE training never reads)")

    def identity(self) -> dict:
        """What the pass's results depend on: the settings, with "auto" dtypes resolved (the
        same settings on a machine that resolves another dtype give other codes)."""
        from dataclasses import asdict

        d = asdict(self)
        d.pop("checkpoint_every_s", None)
        return d

    def spec(self, checkpoint_every_s: float = 120.0) -> "ScanSpec":
        """The pass these settings describe, checkpointed every `checkpoint_every_s` seconds."""
        return ScanSpec(tokens=self.tokens, corpus=self.corpus, seed=self.seed,
                        batch_size=self.batch_size, ctx_len=self.ctx_len,
                        encoder_dtype=self.encoder_dtype, split=self.split,
                        checkpoint_every_s=checkpoint_every_s)

    def __post_init__(self) -> None:
        """The rules of a pass's settings: bad values fail here, before a model loads."""
        at_least(self, 1, "tokens", "batch_size")
        at_least(self, 2, "ctx_len")  # BOS and at least one token of text
        at_least(self, 0, "seed")
        check_corpus_spec(self.corpus)
        dtype_choice(self, "encoder_dtype")
        split = getattr(self, "split", "train")
        if split not in ("train", "heldout"):
            raise ConfigError(f"split must be train or heldout, not {split!r}")


@dataclass
class ScanSpec:
    """One pass as the scan runs it: a CorpusPassConfig's settings, how often to checkpoint,
    and whether the corpus must hold all the tokens asked."""

    tokens: int
    corpus: str
    seed: int
    batch_size: int
    ctx_len: int
    encoder_dtype: str = "auto"
    checkpoint_every_s: float = 120.0
    split: str = "train"
    # False: `tokens` is a cap (read what the corpus has, up to it), not a requirement
    require_tokens: bool = True

    def batches(self, tokenizer, max_tokens: int | None = None):
        """The pass's token batches (the same on any machine: the order is the seed's)."""
        from saeflow.lm.corpora import Corpus

        corpus = Corpus.from_spec(self.corpus, seed=self.seed)
        return corpus.token_batches(tokenizer, self.batch_size, self.ctx_len,
                                    max_tokens=self.tokens if max_tokens is None else max_tokens,
                                    split=self.split)

"""The training configuration: what a family's SAEs are trained on and how. Imports neither
torch nor numpy, so the CLI can read it (field comments are the options' help) cheaply."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from saeflow.checks import at_least, dtype_choice, finite, flag, fraction
from saeflow.configs import CorpusSpec, Layers, Tokens, setting
from saeflow.errors import ConfigError
from saeflow.lm.corpus_spec import DEFAULT_SPEC, check_corpus_spec
from saeflow.lm.hookpoints import check_position

if TYPE_CHECKING:
    from saeflow.lm.model import LoadedModel


@dataclass
class TrainConfig:
    positions: list[str] = setting(["resid_post", "mlp_out", "attn_out"], "comma list")
    layers: Layers | None = setting(None, "all, 0-5, or 1,3,7")
    width: int = setting(4096, "latents per SAE")
    k: int = setting(32, "active latents per token (TopK) or per token on average (BatchTopK)")
    architecture: Literal["topk", "batchtopk"] = setting("topk", "training activation")
    tokens: Tokens = setting(300_000, "training tokens (e.g. 300k, 2M)")
    batch_size: int = setting(1024, "tokens per SAE step")
    lr: float = setting(
        4e-3, "Adam learning rate (the embedded recipe; docs/decisions.md, issue 15)")
    warmup_frac: float = setting(0.05, "linear warm-up over this fraction of steps")
    decay_frac: float = setting(0.2, "linear decay to 0 over the last fraction of steps")
    seed: int = setting(0, "seed of the corpus order and the initialisation")
    ctx_len: int = setting(128, "tokens per context")
    model_batch: int = setting(16, "rows per model forward")
    corpus: CorpusSpec = setting(
        DEFAULT_SPEC, "sources with text shares: wiki, python, PATH, hf:NAME")
    chunk_tokens: Tokens = setting(
        8192, "tokens shuffled together; checkpoints fall between chunks")
    aux_k: int | None = setting(None, "dead latents in the AuxK loss (default: d_in // 2)")
    aux_coef: float = setting(1 / 32, "weight of the AuxK loss")
    dead_tokens: Tokens | None = setting(None, "latent dead after this many tokens without firing")
    aux_activation: Literal["relu", "linear"] = setting(
        "linear", "AuxK on the dead latents' top pre-activations: \"relu\" (Gao et al.) gives no "
        'gradient to a latent whose pre-activations are all negative; "linear" keeps their sign, '
        "so it does.")
    resample_dead: bool = setting(
        False, "Between chunks, before the lr decay: re-initialise dead latents towards inputs "
        "the SAE reconstructs worst (encoder column 0.2 x the mean live norm, bias 0, Adam state "
        "reset).")
    input_norm: Literal["scalar", "dim"] = setting(
        "dim", '"scalar": one factor s with E||s x||^2 = d_in; "dim": each input dimension '
        "divided by its standard deviation (Gemma's massive residual dimensions no longer "
        "dominate the loss). Both are folded exactly into the saved weights.")
    dim_cap: float = setting(
        10.0, 'with input_norm "dim": 0 standardises every dimension; c > 0 divides each '
        "dimension by min(its sd, c x the median sd), so the massive ones keep sd / (c x median) "
        "> 1 and their share of a saved (raw-space) decoder row is amplified at most c times, "
        "not sd / median.")
    model_dtype: str = setting("auto", "dtype of the capture forward: auto | float32 | bfloat16")
    encoder_dtype: str = setting("auto", "dtype of the encoder matmul: auto | float32 | bfloat16")
    checkpoint_every_s: float = setting(180.0, "seconds between checkpoints (a killed run resumes)")
    engine: Literal["auto", "sparse", "stacked"] = setting(
        "auto", 'How the SAE updates run, not what they compute: "sparse" steps each SAE alone '
        'with sparse products (fastest on a CPU); "stacked" steps all SAEs of one width as one '
        'batched dense problem (bmm; fastest on a GPU); "auto" picks by device.')

    def __post_init__(self) -> None:
        """The rules that need no model: bad values fail here, before anything loads."""
        at_least(self, 1, "width", "k", "tokens", "batch_size", "model_batch", "chunk_tokens",
                 "aux_k", "dead_tokens")
        at_least(self, 2, "ctx_len")  # BOS and at least one token of text
        at_least(self, 0, "seed", "checkpoint_every_s")
        finite(self, "lr", positive=True)
        finite(self, "aux_coef", "dim_cap")
        at_least(self, 0, "aux_coef", "dim_cap")
        fraction(self, "warmup_frac", "decay_frac")
        if self.warmup_frac + self.decay_frac > 1:
            raise ConfigError(f"--warmup-frac + --decay-frac must be at most 1, not "
                              f"{self.warmup_frac} + {self.decay_frac}")
        if self.k >= self.width:
            raise ConfigError(f"--k must be in 1..width-1 (k={self.k}, width={self.width}); "
                              f"a TopK SAE with k >= width is not sparse")
        for name, allowed in (("architecture", ("topk", "batchtopk")),
                              ("engine", ("auto", "sparse", "stacked")),
                              ("input_norm", ("scalar", "dim")),
                              ("aux_activation", ("relu", "linear"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{flag(name)} must be {' or '.join(allowed)}, not "
                                  f"{getattr(self, name)!r}")
        if not self.positions:
            raise ConfigError("no positions to train; give --positions, e.g. resid_post")
        for p in self.positions:
            check_position(p)
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ConfigError(f"--layers must be all or layers 0 and up, not {self.layers!r}")
        if self.tokens < self.batch_size:
            raise ConfigError(f"--tokens {self.tokens} is less than one batch ({self.batch_size})")
        if self.chunk_tokens < self.batch_size:
            raise ConfigError(f"--chunk-tokens {self.chunk_tokens} must be at least --batch-size "
                              f"{self.batch_size}")
        if self.dead_tokens is not None and self.dead_tokens < self.batch_size:
            raise ConfigError(f"--dead-tokens {self.dead_tokens} is less than one batch "
                              f"({self.batch_size}): every latent would count as dead")
        check_corpus_spec(self.corpus)
        dtype_choice(self, "model_dtype", "encoder_dtype")

    def validate(self, model: LoadedModel) -> None:
        """The rules that need the model: its positions and layers."""
        for p in self.positions:
            if p not in model.arch.sites:
                raise ConfigError(f"the {model.arch.family} architecture has no position {p!r}")
        for L in self.layers or []:
            model.check_layer(L)

    def identity(self) -> dict:
        """The fields that define the result (not how often it checkpoints)."""
        d = asdict(self)
        d.pop("checkpoint_every_s")
        d.pop("engine")
        for name, legacy in _LEGACY.items():  # packs trained before these fields keep their identity
            if d.get(name) == legacy:
                d.pop(name)
        return d


# Fields added after packs were first trained, with the value that reproduces the older recipe.
_LEGACY = {"input_norm": "scalar", "dim_cap": 0.0, "aux_activation": "relu",
           "resample_dead": False}

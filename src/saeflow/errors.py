"""Every error saeflow raises on purpose. All derive from `SaeflowError`, so the CLI can turn
them into one line and let a real bug show its traceback; each also keeps the builtin base it
had before (ValueError, RuntimeError, ...) so callers' existing `except` clauses still work."""
from __future__ import annotations


class SaeflowError(Exception):
    """Base of every error saeflow raises for bad input or a failed job."""


class UnknownPositionError(SaeflowError, ValueError):
    """A hook position saeflow does not know (the message lists the known ones)."""


class UnsupportedArchitectureError(SaeflowError, ValueError):
    """A model family whose hook points saeflow cannot place."""


class SAEShapeError(SaeflowError, ValueError):
    """SAE weights whose shapes disagree with each other or with the model."""


class SAEFormatError(SaeflowError, ValueError):
    """A file or config that cannot be read as the format it claims to be."""


class PackError(SaeflowError, ValueError):
    """A pack folder that is missing, incomplete, or does not fit the model."""


class HubError(SaeflowError, RuntimeError):
    """A download from a model/SAE hub that failed or is not available offline."""


class ScanError(SaeflowError, ValueError):
    """A corpus pass (index, stats) that cannot run as asked."""


class TrainingError(SaeflowError, RuntimeError):
    """SAE training that cannot start or continue (e.g. a resume of another config)."""


class MatchError(SaeflowError, ValueError):
    """Decoder directions that cannot be matched (shapes, files, methods)."""


class FlowError(SaeflowError, ValueError):
    """A flow run, trace or feature id that cannot be computed or read as asked."""


class FeatureIndexError(SaeflowError, ValueError):
    """A feature index that is missing, of another pack, or asked for an unknown feature."""


class MissingResultError(SaeflowError, ValueError):
    """A result of a RUN that is not computed yet (no flow, index or statistics there): run the
    stage that writes it. A result that is there but unreadable raises its stage's own error.
    (A ValueError, as the errors it replaces were; callers catch it by name.)"""


class UnreadableTableError(SaeflowError, RuntimeError):
    """A table of a RUN (parquet) is truncated or corrupt: rerun the stage that wrote it."""


class ExplainError(SaeflowError, RuntimeError):
    """An explanation request that failed (endpoint unreachable or a bad answer)."""


class StatsError(SaeflowError, ValueError):
    """Co-activation statistics that are missing, of another pack, or asked wrongly."""


class PlanError(SaeflowError, ValueError):
    """A plan that cannot be applied as asked; the message says what to change."""


class GenerationError(SaeflowError, ValueError):
    """A request that cannot run as asked; nothing was generated."""


class ValidateError(SaeflowError, ValueError):
    """A validation experiment that cannot run as asked."""


class EvalError(SaeflowError, RuntimeError):
    """A steering evaluation that could not score (a scorer model missing, say)."""


class SweepError(SaeflowError, ValueError):
    """A steering sweep that cannot run as asked."""


class PipelineError(SaeflowError, ValueError):
    """A pipeline that cannot run as asked."""


class ConfigError(SaeflowError, ValueError):
    """Settings that cannot be used as given (a width, a layer range, a token count...)."""


class UsageError(SaeflowError, ValueError):
    """A command given an impossible combination of options."""


class ModelError(SaeflowError, ValueError):
    """A model, device or dtype that cannot be loaded or used as asked."""


class CorpusError(SaeflowError, ValueError):
    """Text sources that cannot be read, or that give too few tokens."""


class HookError(SaeflowError, ValueError):
    """A hook point that is malformed, or an edit that returned the wrong shape."""


class HookNotFiredError(SaeflowError, RuntimeError):
    """A forward pass ended before reaching every requested hook point."""


class MissingSAEError(SaeflowError, KeyError):
    """A pack asked for an SAE at a layer and position it does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AppError(SaeflowError, RuntimeError):
    """The web app cannot start or serve as asked (a missing asset, no model for steering)."""


class MissingDependencyError(SaeflowError, ImportError):
    """An optional package that this feature needs is not installed (the message names it)."""


class TokenizerError(SaeflowError, RuntimeError):
    """A tokenizer that splits text unlike the model's own (e.g. a wrong GGUF conversion)."""


class ScaleError(SaeflowError, RuntimeError):
    """A distributed run that cannot start or continue (Ray unreachable, versions that differ,
    a shard that failed every try); the merged state is kept, so the same command resumes."""

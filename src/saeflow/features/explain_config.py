"""The settings of LLM feature explanations (`saeflow explain`). Light to import: the command
line reads this class to build its options, without the index's readers."""
from __future__ import annotations

from dataclasses import dataclass

from saeflow.configs import Tokens, setting
from saeflow.errors import ExplainError
from saeflow.llm import LLMEndpoint


@dataclass
class ExplainerConfig(LLMEndpoint):
    n_examples: int = setting(8, "top contexts shown per feature")
    max_tokens: Tokens = setting(48, "the reply's length cap")
    temperature: float = setting(0.0, "sampling temperature of the reply")
    save_every: int = setting(16, "features between atomic rewrites of the table")

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.n_examples <= 64:
            raise ExplainError("n_examples must be between 1 and 64")

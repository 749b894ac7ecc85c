"""The pipeline's settings: nested stage configs, the flat view `saeflow run` and
RUN/pipeline.json use, and digests that stay what earlier runs recorded (a changed digest
would rerun every stage of an existing RUN)."""
import pytest

from saeflow.errors import PipelineError
from saeflow.pipeline.config import FLAT, PROFILES, PipelineConfig, stage_identity
from saeflow.pipeline.stages import STAGES, stage_digest

# the digests the flat PipelineConfig gave (its stage_settings), before the configs nested
DIGESTS = {
    "default": {"pack": "0ea96407eab5", "flow": "a2a9fada485e", "eval": "477cae1b1966",
                "index": "0baa764ecd01", "stats": "0d7faba06276", "validate": "23b51f19110d",
                "sweep": "16481c4e84ea", "report": "0ea96407eab5"},
    "quick": {"pack": "ce52a2b2cc12", "flow": "dd3ee775f8b7", "eval": "d610d04f28a9",
              "index": "8d9aea8d79a3", "stats": "41ddaddc0125", "validate": "c61830ca2e29",
              "sweep": "9a4cff48b93d", "report": "ce52a2b2cc12"},
}


@pytest.mark.parametrize("profile", ["default", "quick"])
def test_stage_digests_are_those_earlier_runs_recorded(profile):
    cfg = PROFILES[profile]
    assert {s: stage_digest(cfg, s) for s in STAGES} == DIGESTS[profile]


def test_the_stages_get_their_own_configs():
    cfg = PROFILES["quick"]
    assert cfg.index.tokens == 8_000 and cfg.index.split == "heldout"
    assert cfg.validate.r_texts == 4 and cfg.validate.texts == 2
    assert cfg.sweep.ours.themes == ["religion"] and cfg.sweep.paper.n == 4
    assert stage_identity(cfg, "index")["tokens"] == cfg.index.tokens
    assert list(cfg.flat()) == list(FLAT)  # RUN/pipeline.json's "config", in its order
    assert cfg.flat()["index_tokens"] == 8_000 and cfg.flat()["pack"] == "embedded-quick"


def test_flat_overrides_reach_every_stage_and_keep_their_rules():
    cfg = PipelineConfig.from_flat(PROFILES["quick"], corpus="python", pass_ctx_len=96)
    assert {c.corpus for c in (cfg.eval, cfg.index, cfg.stats, cfg.validate)} == {"python"}
    assert (cfg.eval.ctx_len, cfg.index.ctx_len, cfg.stats.ctx_len) == (96, 96, 96)
    assert cfg.validate.ctx_len == 64  # validate's texts are its own, not the pass's
    assert cfg.eval.tokens == 512  # the rest of the profile stays
    with pytest.raises(PipelineError, match="--index-tokens must be at least 1"):
        PipelineConfig.from_flat(index_tokens=0)
    with pytest.raises(PipelineError, match="unknown pipeline settings: nope"):
        PipelineConfig.from_flat(nope=1)
    with pytest.raises(PipelineError, match="one corpus"):
        PipelineConfig(index=PROFILES["default"].index.__class__(corpus="python"))

"""The time-left estimates `saeflow run` prints: the pack's GPU rate, and the pace of the run."""
from saeflow.pipeline.config import PipelineConfig
from saeflow.pipeline.stages import (
    GPU_PACK_TOK_S,
    RATES,
    _Pace,
    estimate_seconds,
    pack_advice,
)
from saeflow.saes.recipes import PROFILES


def test_pack_estimate_uses_the_gpu_rate_on_a_gpu():
    cfg = PipelineConfig.from_flat(pack="embedded-gpu")
    tokens = PROFILES["gpu"].tokens
    assert estimate_seconds(cfg, "pack", cached_pack=False) == tokens * RATES["pack"]
    on_gpu = estimate_seconds(cfg, "pack", cached_pack=False, gpu=True)
    assert on_gpu == tokens / GPU_PACK_TOK_S
    assert on_gpu < 20 * 60 < tokens * RATES["pack"]  # minutes on a GPU, hours on 2 cores


def test_pace_scales_the_estimates_by_the_stages_done():
    pace = _Pace()
    assert pace("index", 100.0) == 100.0  # nothing done yet: the CPU rates
    pace.add("pack", 1000.0, 10.0)  # the pack never paces the others
    pace.add("report", 2.0, 50.0)  # nor a stage too short to say anything
    assert pace("index", 100.0) == 100.0
    pace.add("flow", 60.0, 6.0)
    assert pace("index", 100.0) == 10.0  # this machine ran 10x faster than the CPU rates
    assert pace("pack", 300.0) == 300.0


def test_pace_is_off_on_a_cpu():
    pace = _Pace(enabled=False)
    pace.add("flow", 60.0, 6.0)
    assert pace("index", 100.0) == 100.0


def test_a_gpu_pack_on_a_cpu_says_so_and_what_to_use_instead():
    gpu_pack = PipelineConfig.from_flat(pack="embedded-gpu")
    msg = pack_advice(gpu_pack, cached_pack=False, gpu=False)
    assert msg and "--device cuda" in msg and "--pack embedded" in msg and "980 min" in msg
    assert pack_advice(gpu_pack, cached_pack=False, gpu=True) is None
    assert pack_advice(gpu_pack, cached_pack=True, gpu=False) is None
    assert pack_advice(PipelineConfig.from_flat(pack="embedded"), False, False) is None

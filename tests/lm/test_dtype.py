"""`encoder_dtype: auto` is resolved by the device's capability, never by a timing (issue 30):
the same training on a busy and on an idle machine writes identical bytes, and a resume across
dtypes is refused."""
import itertools
import time

import pytest
import torch

import saeflow.lm.model as lm_model
from saeflow.errors import TrainingError
from saeflow.lm.model import bf16_is_faster, dtype_name, resolve_encoder_dtype
from saeflow.saes.train import TrainConfig, pack_identity, train_family


def tiny_cfg(**kw):
    base = dict(positions=["resid_post"], layers=[0], width=32, k=4, tokens=2048,
                batch_size=128, ctx_len=32, model_batch=8, chunk_tokens=1024, corpus="python",
                model_dtype="float32", encoder_dtype="auto", checkpoint_every_s=1e9)
    base.update(kw)
    return TrainConfig(**base)


def _clock(busy: bool):
    """A perf_counter under which any timed bf16 matmul looks 10x slower (busy) or 10x faster
    (idle) than fp32: the two ways the old timing could fall."""
    ticks = itertools.count()
    step = (lambda i: 10.0 if i % 4 < 2 else 1.0) if busy else (lambda i: 1.0 if i % 4 < 2 else 10.0)
    total = [0.0]

    def perf_counter():
        total[0] += step(next(ticks))
        return total[0]
    return perf_counter


@pytest.mark.parametrize("busy", [True, False])
def test_auto_ignores_the_clock(monkeypatch, busy):
    want = torch.bfloat16 if lm_model.cpu_has_native_bf16() else torch.float32
    monkeypatch.setattr(time, "perf_counter", _clock(busy))
    assert resolve_encoder_dtype("auto", torch.device("cpu")) == want
    assert resolve_encoder_dtype("float32", "cpu") == torch.float32
    assert resolve_encoder_dtype("bf16", "cpu") == torch.bfloat16


def test_the_rule_by_capability(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(lm_model, "cpu_has_native_bf16", lambda: True)
    assert resolve_encoder_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(lm_model, "cpu_has_native_bf16", lambda: False)
    assert resolve_encoder_dtype("auto", cpu) == torch.float32
    assert not bf16_is_faster(torch.device("mps"))
    for cap, want in (((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), torch.float32)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        assert resolve_encoder_dtype("auto", torch.device("cuda")) == want


def _pack_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix == ".safetensors"}


def test_busy_and_idle_train_the_same_bytes(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["gemma3"]
    packs = {}
    for busy in (True, False):
        with monkeypatch.context() as m:
            m.setattr(time, "perf_counter", _clock(busy))
            m.setattr(lm_model, "cpu_has_native_bf16", lambda: True)  # bf16 in both runs
            packs[busy] = train_family(model, tiny_cfg(), tmp_path / f"busy{busy}",
                                       progress=False).pack
    assert _pack_bytes(packs[True].root) == _pack_bytes(packs[False].root)
    ident = packs[True].provenance["train_config"]
    assert ident["encoder_dtype"] == "bfloat16" and ident["model_dtype"] == "float32"
    assert packs[True].provenance["encoder_dtype"] == "bfloat16"


def test_resume_across_dtypes_is_refused(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["gemma3"]
    out = tmp_path / "pack"
    monkeypatch.setattr(lm_model, "cpu_has_native_bf16", lambda: True)
    with pytest.raises(KeyboardInterrupt):
        train_family(model, tiny_cfg(), out, progress=False, stop_after_chunks=1)
    monkeypatch.setattr(lm_model, "cpu_has_native_bf16", lambda: False)  # another machine
    with pytest.raises(TrainingError, match="encoder_dtype bfloat16.*--encoder-dtype bfloat16"):
        train_family(model, tiny_cfg(), out, progress=False)
    # Saying the dtype resumes it, to the same bytes as an unbroken run.
    resumed = train_family(model, tiny_cfg(encoder_dtype="bfloat16"), out, progress=False).pack
    whole = train_family(model, tiny_cfg(encoder_dtype="bfloat16"), tmp_path / "whole",
                         progress=False).pack
    assert _pack_bytes(resumed.root) == _pack_bytes(whole.root)


def test_packs_from_before_keep_their_identity():
    prov = {"train_config": {"model": "m", "encoder_dtype": "auto", "model_dtype": "auto"},
            "encoder_dtype": "bfloat16", "capture_dtype": "float32"}
    assert pack_identity(prov) == {"model": "m", "encoder_dtype": "bfloat16",
                                   "model_dtype": "float32"}
    assert pack_identity({}) is None
    assert dtype_name(torch.bfloat16) == "bfloat16"

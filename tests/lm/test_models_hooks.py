"""Models of every supported family: anatomy, hook capture equal to a manual forward, edits."""
import json

import numpy as np
import pytest
import torch
from fixtures import FAMILIES, make_tokenizer

from saeflow import HookPoint, Hooks, capture, load_model
from saeflow.errors import UnsupportedArchitectureError

GEMMA = ("gemma2", "gemma3")


def _n_hooks(m):
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.hf.modules())


def _ids(model, n=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.vocab_size, (n, t), generator=g).to(model.device)


@pytest.mark.parametrize("family", FAMILIES)
def test_anatomy(tiny_models, family):
    m = tiny_models[family]
    a = m.anatomy()
    assert a["family"] == family
    assert a["n_layers"] == 3 and a["d_model"] == 32 and a["vocab_size"] == 320
    assert len(a["layers"]) == 3
    for layer in a["layers"]:
        assert set(layer["hook_points"]) == {"resid_pre", "resid_post", "attn_out", "mlp_out",
                                             "attn_z", "mlp_raw", "attn_raw"}
        for pos, hp in layer["hook_points"].items():
            m.module(hp["hf_module"])  # every path resolves to a real module
            if pos in ("mlp_raw", "attn_raw") and family in GEMMA:
                assert hp["tl_name"] is None  # TransformerLens has no hook before the post-norm
            else:
                assert hp["tl_name"].startswith(f"blocks.{layer['layer']}.")
    assert a["layers"][0]["hook_points"]["attn_z"]["width"] == m.n_heads * m.d_head
    json.dumps(a)


def _manual_pieces(m, family, L, resid_pre, attn_z):
    """Recompute attn_out and mlp_out of layer L by hand from resid_pre and attn_z."""
    layer = m.layer_module(L)
    if family in GEMMA:
        attn_out = layer.post_attention_layernorm(layer.self_attn.o_proj(attn_z))
        mid = resid_pre + attn_out
        mlp_out = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(mid)))
    elif family == "gpt2":
        attn_out = layer.attn.c_proj(attn_z)
        mid = resid_pre + attn_out
        mlp_out = layer.mlp(layer.ln_2(mid))
    else:
        attn_out = layer.self_attn.o_proj(attn_z)
        mid = resid_pre + attn_out
        mlp_out = layer.mlp(layer.post_attention_layernorm(mid))
    return attn_out, mlp_out


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_manual_forward(tiny_models, family):
    m = tiny_models[family]
    ids = _ids(m)
    points = [HookPoint(p, L) for L in range(m.n_layers)
              for p in ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn_z")]
    acts = capture(m, ids, points, stop_early=False)
    with torch.no_grad():
        out = m.hf(input_ids=ids, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        for L in range(m.n_layers):
            pre = acts[HookPoint("resid_pre", L)]
            post = acts[HookPoint("resid_post", L)]
            torch.testing.assert_close(pre, hs[L], rtol=1e-5, atol=1e-5)
            if L + 1 < m.n_layers:  # the last hidden state is after the final norm
                torch.testing.assert_close(post, hs[L + 1], rtol=1e-5, atol=1e-5)
            a, mo = acts[HookPoint("attn_out", L)], acts[HookPoint("mlp_out", L)]
            torch.testing.assert_close(post, pre + a + mo, rtol=1e-5, atol=1e-5)
            ref_a, ref_m = _manual_pieces(m, family, L, pre, acts[HookPoint("attn_z", L)])
            torch.testing.assert_close(a, ref_a, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mo, ref_m, rtol=1e-5, atol=1e-5)
            assert acts[HookPoint("attn_z", L)].shape[-1] == m.n_heads * m.d_head


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2"])
def test_stop_early_skips_later_layers_and_matches(tiny_models, family):
    m = tiny_models[family]
    ids = _ids(m)
    n_before = _n_hooks(m)
    calls = []
    h = m.layer_module(2).register_forward_hook(lambda *a: calls.append(1))
    try:
        early = capture(m, ids, [HookPoint("mlp_out", 0), HookPoint("resid_post", 1)])
    finally:
        h.remove()
    assert calls == []  # layer 2 never ran
    full = capture(m, ids, [HookPoint("mlp_out", 0), HookPoint("resid_post", 1)], stop_early=False)
    for p in early:
        torch.testing.assert_close(early[p], full[p])
    assert _n_hooks(m) == n_before


@pytest.mark.parametrize("family", ["gemma2", "qwen3", "gpt2"])
def test_edits_add_and_replace(tiny_models, family):
    m = tiny_models[family]
    ids = _ids(m)
    with torch.no_grad():
        base = m.hf(input_ids=ids).logits
    delta = torch.randn(m.d_model).to(m.device)
    p = HookPoint("resid_post", 0)
    with torch.no_grad(), Hooks(m, capture=[p], edits={p: lambda a: a + delta}) as h:
        edited = m.hf(input_ids=ids).logits
    clean = capture(m, ids, [p])[p]
    torch.testing.assert_close(h.activations[p], clean + delta)  # capture sees the edit
    assert not torch.allclose(base, edited)
    # replacing attn_z (an input hook) with zeros makes attn_out equal o_proj's bias (or 0)
    z = HookPoint("attn_z", 1)
    a = HookPoint("attn_out", 1)
    with torch.no_grad(), Hooks(m, capture=[a], edits={z: lambda t: torch.zeros_like(t)}) as h2:
        m.hf(input_ids=ids)
    if family == "gpt2":
        expect = m.layer_module(1).attn.c_proj.bias.expand_as(h2.activations[a])
    else:
        expect = torch.zeros_like(h2.activations[a])
    torch.testing.assert_close(h2.activations[a], expect, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        after = m.hf(input_ids=ids).logits
    torch.testing.assert_close(after, base)  # hooks gone


def test_hooks_removed_on_exception(tiny_models):
    m = tiny_models["llama"]
    p = HookPoint("mlp_out", 1)

    def boom(a):
        raise RuntimeError("boom")

    n_before = _n_hooks(m)
    with pytest.raises(RuntimeError, match="boom"):
        with Hooks(m, edits={p: boom}):
            m.hf(input_ids=_ids(m))
    assert _n_hooks(m) == n_before


def test_layer_out_of_range_and_unknown_position(tiny_models):
    m = tiny_models["llama"]
    with pytest.raises(ValueError, match="layers 0..2"):
        capture(m, _ids(m), [HookPoint("resid_post", 7)])
    with pytest.raises(ValueError, match="unknown position 'resid_mid'"):
        HookPoint("resid_mid", 1)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "llama", "gpt2"])
def test_attn_z_to_residual_matches_module_output_direction(tiny_models, family):
    m = tiny_models[family]
    L = 1
    z = torch.randn(5, m.n_heads * m.d_head).to(m.device)
    mapped = m.attn_z_to_residual(z, L)
    layer = m.layer_module(L)
    with torch.no_grad():
        if family in GEMMA:
            ref = layer.post_attention_layernorm(layer.self_attn.o_proj(z))
        elif family == "gpt2":
            ref = layer.attn.c_proj(z) - layer.attn.c_proj.bias
        else:
            ref = layer.self_attn.o_proj(z)
    cos = torch.nn.functional.cosine_similarity(mapped, ref, dim=-1)
    torch.testing.assert_close(cos, torch.ones(5, device=m.device), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        m.attn_z_to_residual(torch.randn(2, 7), L)


def test_unsupported_family_names_supported_ones(tmp_path):
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(UnsupportedArchitectureError, match="gemma2.*gemma3.*llama.*qwen2.*qwen3.*gpt2"):
        load_model(str(tmp_path / "m"), device="cpu")


def test_bad_model_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"), device="cpu")


def test_gemma_tokenizer_without_bos_is_fixed_at_load(tmp_path):
    """A Gemma model whose tokenizer lost its BOS (transformers 5.17's GGUF conversion) gets it
    back: without BOS at position 0 Gemma 3 reads garbage (CE 12.9 nats instead of 2.8)."""
    from fixtures import make_model_dir, make_tokenizer

    from saeflow import load_model
    from saeflow.lm.model import ensure_bos, tokenizer_adds_bos

    d = make_model_dir("gemma3", tmp_path / "g3")
    make_tokenizer(add_bos=False).save_pretrained(d)
    m = load_model(str(d), device="cpu", progress=False)
    assert tokenizer_adds_bos(m.tokenizer)
    assert m.tokenizer("a b").input_ids[0] == m.tokenizer.bos_token_id
    tok = make_tokenizer(add_bos=False)  # survives a save and reload
    ensure_bos(tok)
    tok.save_pretrained(tmp_path / "t")
    from transformers import AutoTokenizer

    assert tokenizer_adds_bos(AutoTokenizer.from_pretrained(tmp_path / "t"))
    # a family that does not need BOS is left as it is
    g2 = make_model_dir("gpt2", tmp_path / "gpt2")
    assert not tokenizer_adds_bos(load_model(str(g2), device="cpu", progress=False).tokenizer)


def test_gguf_add_bos_flag_is_read(tmp_path):
    import gguf

    from saeflow.lm.model import gguf_adds_bos

    for flag in (True, False, None):
        path = tmp_path / f"m{flag}.gguf"
        w = gguf.GGUFWriter(str(path), "gemma3")
        if flag is not None:
            w.add_add_bos_token(flag)
        w.add_tensor("x", np.zeros(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert gguf_adds_bos(path) is bool(flag)


def test_embedded_tokenizer_check_refuses_a_wrong_conversion():
    """transformers <= 5.17 converts the embedded GGUF's tokenizer with other splits; the
    embedded model refuses such a tokenizer instead of reading garbage."""
    from saeflow.lm.model import EMBEDDED_TOKEN_CHECK, check_embedded_tokenizer

    with pytest.raises(RuntimeError, match=r"transformers>=5\.18"):
        check_embedded_tokenizer(make_tokenizer())

    class Right:  # a tokenizer that splits the pinned sentence as Gemma 3's does
        def __call__(self, text):
            assert text == EMBEDDED_TOKEN_CHECK[0]
            return {"input_ids": list(EMBEDDED_TOKEN_CHECK[1])}
    check_embedded_tokenizer(Right())


def test_a_device_torch_cannot_use_is_refused_with_the_fix(tiny_model_dirs):
    from saeflow.flow.config import FlowConfig
    from saeflow.lm.model import resolve_device

    assert resolve_device("cpu").type == "cpu" and resolve_device(None) is not None
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            load_model(str(tiny_model_dirs["llama"]), device="cuda")
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            FlowConfig(device="cuda").resolved_device()

"""SAE math against a reference written here, and round trips of every supported format."""
import json

import pytest
import torch
from fixtures import (
    random_weights,
    ref_decode,
    ref_encode,
    write_gemmascope,
    write_gemmascope2,
    write_saelens,
    write_sparsify,
)

from saeflow import SAE, convert_pack, load_pack, random_sae
from saeflow.errors import PackError, SAEFormatError

X = torch.randn(20, 16, generator=torch.Generator().manual_seed(1))


def _check_against_ref(sae: SAE, w, arch, k=None, apply_b_dec=False, atol=1e-5):
    z = sae.encode(X)
    ref = ref_encode(X, w["W_enc"], w["b_enc"], w["b_dec"], arch, w.get("threshold"), k, apply_b_dec)
    torch.testing.assert_close(z.double(), ref, rtol=1e-4, atol=atol)
    torch.testing.assert_close(sae.decode(z).double(), ref_decode(ref, w["W_dec"], w["b_dec"]),
                               rtol=1e-4, atol=atol)


@pytest.mark.parametrize("arch,k", [("jumprelu", None), ("topk", 5), ("relu", None)])
def test_sae_matches_reference(arch, k):
    w = random_weights()
    sae = SAE(**{n: w[n] for n in ("W_enc", "W_dec", "b_enc", "b_dec")}, architecture=arch,
              threshold=w["threshold"] if arch == "jumprelu" else None, k=k,
              apply_b_dec_to_input=arch != "jumprelu")
    _check_against_ref(sae, w, arch, k, apply_b_dec=arch != "jumprelu")
    if arch == "topk":
        assert ((sae.encode(X) > 0).sum(-1) <= k).all()


def test_batchtopk_inference_modes():
    w = random_weights()
    base = {n: w[n] for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
    as_jump = SAE(**base, architecture="batchtopk", threshold=w["threshold"], k=5)
    as_topk = SAE(**base, architecture="batchtopk", k=5, batchtopk_inference="topk")
    _check_against_ref(as_jump, w, "jumprelu")
    _check_against_ref(as_topk, w, "topk", k=5)
    with pytest.raises(ValueError, match="exported threshold"):
        SAE(**base, architecture="batchtopk", k=5)


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "topk"])
def test_fold_keeps_output(arch):
    sae = random_sae(16, 48, arch, k=6, seed=3)
    if arch == "topk":  # unit decoder rows: folding is exact
        pass
    sae = sae._replace(input_scale=2.5)
    folded = sae.fold()
    torch.testing.assert_close(folded(X), sae(X), rtol=1e-4, atol=1e-5)
    assert folded.input_scale == 1.0
    if sae.activation == "jumprelu":
        assert torch.all(folded.threshold == 1)
    else:
        torch.testing.assert_close(folded.decoder_norms(), torch.ones(48))
    torch.testing.assert_close(sae.unit_directions().norm(dim=-1), torch.ones(48))


def test_fold_refuses_topk_with_unequal_norms():
    sae = random_sae(16, 48, "topk", k=4)
    sae = sae._replace(W_dec=sae.W_dec * torch.linspace(0.5, 2, 48)[:, None])
    with pytest.raises(ValueError, match="unequal decoder norms"):
        sae.fold()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype, tmp_path):
    w = random_weights(dtype=dtype)
    write_saelens(tmp_path / "s", w, "jumprelu")
    pack = load_pack(tmp_path)
    assert pack.entries[("resid_post", 1)].dtype == str(dtype).removeprefix("torch.")
    sae = pack.sae("resid_post", 1)
    assert sae.dtype == dtype
    w32 = {k: v.float() for k, v in w.items()}
    _check_against_ref(sae.to(dtype=torch.float32), w32, "jumprelu")
    assert sae.encode(X).dtype == dtype


def test_shape_errors():
    w = random_weights()
    with pytest.raises(ValueError, match="W_dec has shape"):
        SAE(w["W_enc"], w["W_dec"][:, :5], w["b_enc"], w["b_dec"])
    sae = random_sae(16, 48)
    with pytest.raises(ValueError, match="input has width 7 but this SAE has d_in 16"):
        sae.encode(torch.randn(3, 7))


# --- formats ------------------------------------------------------------------------------------
def _pack_roundtrip(src, tmp_path, **kw):
    convert_pack(load_pack(src, **kw), tmp_path / "converted")
    assert (tmp_path / "converted" / "pack.json").is_file()
    return load_pack(tmp_path / "converted")


@pytest.mark.parametrize("arch,k,flat,hook,pos", [
    ("jumprelu", None, False, "blocks.3.hook_resid_post", "resid_post"),
    ("topk", 5, False, "model.layers.3.post_feedforward_layernorm.output", "mlp_out"),
    ("relu", None, False, "blocks.3.hook_attn_out", "attn_out"),
    ("relu", None, True, "blocks.3.hook_resid_pre", "resid_pre"),
    ("topk", 4, True, "blocks.3.attn.hook_z", "attn_z"),
])
def test_saelens_roundtrip(tmp_path, arch, k, flat, hook, pos):
    w = random_weights()
    write_saelens(tmp_path / "src" / "x", w, arch, hook=hook, k=k, flat=flat)
    pack = load_pack(tmp_path / "src")
    info = pack.entries[(pos, 3)]
    assert (info.format, info.architecture, info.d_in, info.d_sae) == ("saelens", arch, 16, 48)
    apply = (arch != "jumprelu")
    _check_against_ref(pack.sae(pos, 3), w, arch, k, apply)
    again = _pack_roundtrip(tmp_path / "src", tmp_path)
    _check_against_ref(again.sae(pos, 3), w, arch, k, apply)
    cfg = json.loads((again.root / pos / "layer_3" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == hook if hook.startswith("blocks") else True


def test_gemmascope_npz_roundtrip_and_variants(tmp_path):
    root = tmp_path / "google--gemma-scope-2b-pt-mlp"
    ws = {}
    for L in (0, 1, 2):
        ws[L] = random_weights(seed=L)
        write_gemmascope(root, L, ws[L], l0=82)
        write_gemmascope(root, L, random_weights(seed=100 + L), l0=20)  # another variant
        write_gemmascope(root, L, random_weights(seed=200 + L), width="65k", l0=90)
    pack = load_pack(root)
    assert pack.positions == ["mlp_out"] and pack.layers() == [0, 1, 2]
    assert all("average_l0_82" == pack.entries[("mlp_out", L)].path.name for L in range(3))
    assert len(pack.choices) == 3
    for L in range(3):
        _check_against_ref(pack.sae("mlp_out", L), ws[L], "jumprelu")
    pick = load_pack(root, l0="20")
    assert pick.entries[("mlp_out", 0)].l0 == "20"
    again = _pack_roundtrip(root, tmp_path)
    _check_against_ref(again.sae("mlp_out", 2), ws[2], "jumprelu")


def test_gemmascope_npz_needs_position_when_path_does_not_say(tmp_path):
    write_gemmascope(tmp_path / "plain", 4, random_weights())
    with pytest.raises(PackError, match="--position"):
        load_pack(tmp_path / "plain")
    assert load_pack(tmp_path / "plain", position="resid_post").layers() == [4]


def test_gemmascope2_roundtrip(tmp_path):
    root = tmp_path / "gs2"
    w_res, w_mlp, w_att = random_weights(seed=1), random_weights(seed=2), random_weights(seed=3)
    write_gemmascope2(root, "resid_post_all", 5, w_res, "model.layers.5.output")
    write_gemmascope2(root, "mlp_out_all", 5, w_mlp,
                      "model.layers.5.post_feedforward_layernorm.output")
    write_gemmascope2(root, "attn_out_all", 5, w_att, "model.layers.5.self_attn.o_proj.input")
    pack = load_pack(root)
    assert set(pack.entries) == {("resid_post", 5), ("mlp_out", 5), ("attn_z", 5)}
    _check_against_ref(pack.sae("resid_post", 5), w_res, "jumprelu")
    _check_against_ref(pack.sae("attn_z", 5), w_att, "jumprelu")
    again = _pack_roundtrip(root, tmp_path)
    _check_against_ref(again.sae("mlp_out", 5), w_mlp, "jumprelu")


def test_sparsify_roundtrip(tmp_path):
    run = tmp_path / "run"
    w6, w6m = random_weights(seed=6), random_weights(seed=7)
    write_sparsify(run, "layers.6", w6, k=5)
    write_sparsify(run, "layers.6.mlp", w6m, k=5)
    # The HF name layers.6.mlp is the raw MLP output: mlp_raw unless the family says that is
    # the same site as mlp_out (no post-norm).
    pack = load_pack(run)
    assert set(pack.entries) == {("resid_post", 6), ("mlp_raw", 6)}
    assert set(load_pack(run, family="gemma3").entries) == {("resid_post", 6), ("mlp_raw", 6)}
    assert set(load_pack(run, family="llama").entries) == {("resid_post", 6), ("mlp_out", 6)}
    _check_against_ref(pack.sae("resid_post", 6), w6, "topk", 5, apply_b_dec=True)
    again = _pack_roundtrip(run, tmp_path)
    _check_against_ref(again.sae("mlp_raw", 6), w6m, "topk", 5, apply_b_dec=True)
    cfg = json.loads((again.root / "mlp_raw" / "layer_6" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "layers.6.mlp"
    assert cfg["metadata"]["saeflow"]["converted_from"] == "layers.6.mlp"


def test_missing_slots_reported(tmp_path):
    for L in (0, 1, 3):
        write_saelens(tmp_path / "p" / f"r{L}", random_weights(seed=L), "relu",
                      hook=f"blocks.{L}.hook_resid_post")
    write_saelens(tmp_path / "p" / "m0", random_weights(), "relu", hook="blocks.0.hook_mlp_out")
    pack = load_pack(tmp_path / "p")
    assert pack.missing() == [("resid_post", 2), ("mlp_out", 1), ("mlp_out", 2), ("mlp_out", 3)]
    assert ("resid_post", 4) in pack.missing(n_layers=5)


def test_saeflow_pack_is_atomic_and_verifiable(tmp_path):
    write_saelens(tmp_path / "src" / "a", random_weights(), "relu")
    src = load_pack(tmp_path / "src")

    class Boom(Exception):
        pass

    def failing():
        yield from src.iter_saes()
        raise Boom()

    from saeflow import save_pack

    with pytest.raises(Boom):
        save_pack(failing(), tmp_path / "out", model_name="m", d_model=16, n_layers=2)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp left
    pack = convert_pack(src, tmp_path / "out")
    assert pack.verify() == []
    with pytest.raises(FileExistsError):
        convert_pack(src, tmp_path / "out")
    f = tmp_path / "out" / "resid_post" / "layer_1" / "sae_weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    assert load_pack(tmp_path / "out").verify() != []


# --- clear errors ---------------------------------------------------------------------------------
def test_truncated_safetensors(tmp_path):
    write_saelens(tmp_path / "s", random_weights(), "relu")
    f = tmp_path / "s" / "sae_weights.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(SAEFormatError, match="truncated"):
        load_pack(tmp_path)
    f.write_bytes(b"\x05\x00")
    with pytest.raises(SAEFormatError, match="truncated or corrupt"):
        load_pack(tmp_path)


def test_missing_cfg_key(tmp_path):
    write_saelens(tmp_path / "s", random_weights(), "relu", drop_key="d_in")
    with pytest.raises(SAEFormatError, match="missing the key 'd_in'"):
        load_pack(tmp_path)


def test_unknown_hook_name_and_position(tmp_path):
    write_saelens(tmp_path / "s", random_weights(), "relu", hook="blocks.1.hook_resid_mid")
    with pytest.raises(PackError, match="cannot map hook name"):  # refused, in one line
        load_pack(tmp_path)
    with pytest.raises(ValueError, match="unknown position"):
        load_pack(tmp_path, position="middle")


def test_pack_d_in_mismatch_with_model(tmp_path, tiny_models):
    write_saelens(tmp_path / "s", random_weights(d_in=16), "relu", hook="blocks.1.hook_resid_post")
    pack = load_pack(tmp_path)
    with pytest.raises(PackError, match=r"SAE d_in 16 does not match model d_model 32 at "
                                        r"model\.layers\.1"):
        pack.check_model(tiny_models["llama"])
    write_saelens(tmp_path / "t", random_weights(d_in=32), "relu", hook="blocks.9.hook_resid_post")
    with pytest.raises(PackError, match="layers 0..2"):
        load_pack(tmp_path / "t").check_model(tiny_models["llama"])


def test_unknown_slot_lookup(tmp_path):
    write_saelens(tmp_path / "s", random_weights(), "relu")
    with pytest.raises(KeyError, match="no SAE at mlp_out layer 1"):
        load_pack(tmp_path).sae("mlp_out", 1)


def test_npz_corrupt(tmp_path):
    folder = write_gemmascope(tmp_path / "x-res", 0, random_weights())
    (folder / "params.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(SAEFormatError, match="corrupt"):
        load_pack(tmp_path / "x-res")


def test_hook_name_parsing():
    from saeflow.lm.hookpoints import parse_hook_name, parse_layers

    assert parse_hook_name("blocks.12.hook_resid_post") == ("resid_post", 12)
    assert parse_hook_name("model.layers.5.post_feedforward_layernorm.output") == ("mlp_out", 5)
    assert parse_hook_name("model.layers.5.self_attn.o_proj.input") == ("attn_z", 5)
    assert parse_hook_name("model.layers.10.output") == ("resid_post", 10)
    assert parse_hook_name("layers.6.mlp") == ("mlp_raw", 6)
    assert parse_hook_name("layers.6.mlp", "gemma3") == ("mlp_raw", 6)
    assert parse_hook_name("model.layers.6.self_attn", "gemma2") == ("attn_raw", 6)
    assert parse_hook_name("layers.6.mlp", "llama") == ("mlp_out", 6)
    assert parse_hook_name("layers.6.self_attn", "qwen3") == ("attn_out", 6)
    assert parse_hook_name("transformer.h.3") == ("resid_post", 3)
    assert parse_hook_name("model.layers.2.post_attention_layernorm", "gemma3") == ("attn_out", 2)
    with pytest.raises(ValueError):
        parse_hook_name("model.layers.2.post_attention_layernorm", "llama")
    assert parse_layers("0-2,5", 6) == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("0-30", 26)

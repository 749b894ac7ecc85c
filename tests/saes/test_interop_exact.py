"""Interop, round two: the cases that used to give silent wrong answers, each made by the real
library's own code (SAELens 6.54.12, sparsify 1.3.3) and compared on the same inputs, or
refused in one line: pre-6.0 SAELens TopK configs, BatchTopK training checkpoints, sparsify
hookpoints whose site depends on the model family, and bf16 with rescale_acts_by_decoder_norm."""
import json
from types import SimpleNamespace

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="pip install -e '.[test]' installs sae-lens")
sparsify = pytest.importorskip("sparsify", reason="pip install -e '.[test]' installs eai-sparsify")

from saeflow import convert_pack, load_pack  # noqa: E402
from saeflow.errors import PackError  # noqa: E402
from saeflow.saes.recipes import open_pack  # noqa: E402

D_IN, D_SAE = 16, 64
HOOK = "blocks.1.hook_resid_post"


def _x(n=512, seed=0):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))  # [n, d_in]


def _meta():
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(hook_name=HOOK, model_name="tiny")


def _agree(ref, ours, x, tol=1e-5):
    with torch.no_grad():
        z_ref, z = ref.encode(x), ours.encode(x)  # [n, d_sae]
    assert torch.equal(z > 0, z_ref > 0), "active sets differ"
    torch.testing.assert_close(z, z_ref, rtol=tol, atol=tol)
    return z


# --- pre-6.0 SAELens TopK -------------------------------------------------------------------
def _pre6_topk_folder(tmp_path, k=8):
    """A TopK SAE made by SAELens, its cfg rewritten the way SAELens < 6 wrote TopK: a flat
    config, architecture "standard", activation_fn_str "topk" with k in activation_fn_kwargs
    (the layout SAELens 6's handle_pre_6_0_config reads)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(1)
    sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=k, metadata=_meta()))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 + 0.1 * torch.randn(D_SAE))  # ReLU alone would keep many latents
    folder = tmp_path / "pre6" / "sae"
    sae.save_model(folder)
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
        "device": "cpu", "hook_point": HOOK, "hook_point_layer": 1, "model_name": "tiny",
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": k},
        "apply_b_dec_to_input": True, "normalize_activations": "none"}))
    return folder


def test_pre_6_saelens_topk_loads_as_topk(tmp_path):
    from sae_lens import SAE

    folder = _pre6_topk_folder(tmp_path)
    ref = SAE.load_from_disk(folder)
    assert type(ref).__name__ == "TopKSAE"  # SAELens 6 reads it as TopK
    pack = load_pack(tmp_path / "pre6")
    assert pack.entries[("resid_post", 1)].architecture == "topk"
    z = _agree(ref, pack.sae("resid_post", 1), _x())
    assert float((z > 0).sum(-1).float().mean()) == 8.0  # L0 = k (it was 48.6 as ReLU)
    back = convert_pack(pack, tmp_path / "out")  # and it is written as TopK
    _agree(ref, SAE.load_from_disk(back.entries[("resid_post", 1)].path), _x())


def test_pre_6_topk_without_k_is_refused(tmp_path):
    folder = _pre6_topk_folder(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["activation_fn_kwargs"] = {}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(PackError, match="pre-6.0 TopK config without activation_fn_kwargs.k"):
        load_pack(tmp_path / "pre6")


# --- SAELens BatchTopK training checkpoints ---------------------------------------------------
def _batchtopk(k, rescale=True, seed=3):
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    torch.manual_seed(seed)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=k, metadata=_meta(), rescale_acts_by_decoder_norm=rescale))
    with torch.no_grad():
        sae.b_enc.copy_(0.05 * torch.randn(D_SAE))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN))
        sae.W_dec.mul_(torch.linspace(0.3, 3.0, D_SAE)[:, None])  # unequal decoder norms
        for _ in range(30):  # the running threshold, as training moves it
            sae.update_topk_threshold(sae.encode(_x(64, seed=9)))
    return sae


@pytest.mark.parametrize("k,rescale", [(6, True), (6.5, True), (6.5, False)])
def test_batchtopk_training_checkpoint_runs_at_its_threshold(tmp_path, k, rescale):
    from sae_lens import SAE

    train = _batchtopk(k, rescale)
    assert float(train.topk_threshold) > 0
    train.save_model(tmp_path / "ckpt" / "sae")  # the training checkpoint (topk_threshold)
    train.save_inference_model(tmp_path / "inference")  # SAELens's own inference export
    ref = SAE.load_from_disk(tmp_path / "inference")
    pack = load_pack(tmp_path / "ckpt")
    assert pack.verify() == []  # an fp32 checkpoint with a float64 scalar is a valid file
    ours = pack.sae("resid_post", 1)
    assert ours.activation == "jumprelu"
    _agree(ref, ours, _x())


def test_fractional_k_without_threshold_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _batchtopk(6.5).save_model(tmp_path / "ckpt" / "sae")
    f = tmp_path / "ckpt" / "sae" / "sae_weights.safetensors"
    t = load_file(f)
    del t["topk_threshold"]
    save_file(t, f)
    with pytest.raises(PackError, match=r"k=6.5 is fractional"):
        load_pack(tmp_path / "ckpt")


# --- hookpoints whose site depends on the model family ----------------------------------------
def _sparsify_at(run, hookpoint):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(4)
    SparseCoder(D_IN, SparseCoderConfig(k=8, num_latents=D_SAE)).save_to_disk(run / hookpoint)
    return run


def test_post_attention_layernorm_is_placed_by_the_family_or_refused(tmp_path):
    from saeflow.cli.main import main

    run = _sparsify_at(tmp_path / "run", "layers.1.post_attention_layernorm")
    # Unknown family: it is Gemma's attention output or Llama's pre-MLP norm; no guess.
    with pytest.raises(PackError, match="cannot tell which without the model"):
        load_pack(run)
    assert main(["pack", "convert", str(run), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    # A Llama: the norm before the MLP, a site saeflow has no position for.
    with pytest.raises(PackError, match="norm before the MLP in the llama family"):
        load_pack(run, family="llama")
    llama = SimpleNamespace(arch=SimpleNamespace(family="llama"))  # what --model gives
    with pytest.raises(PackError, match="llama family"):
        open_pack(str(run), model=llama)  # the steer / validate path
    # Gemma: the attention output after the post-norm.
    assert list(load_pack(run, family="gemma3").entries) == [("attn_out", 1)]
    gemma = SimpleNamespace(arch=SimpleNamespace(family="gemma3"))
    assert list(open_pack(str(run), model=gemma).entries) == [("attn_out", 1)]
    # The run's config.json names the model: Gemma 1 does not decide it, Gemma 2 does.
    (run / "config.json").write_text(json.dumps({"model": "google/gemma-2b"}))
    with pytest.raises(PackError, match="cannot tell which"):
        load_pack(run)
    (run / "config.json").write_text(json.dumps({"model": "google/gemma-2-2b"}))
    assert list(load_pack(run).entries) == [("attn_out", 1)]


def test_inspect_lists_an_unplaceable_sae_as_refused(tmp_path, capsys):
    from saeflow.cli.main import main

    run = _sparsify_at(tmp_path / "run", "layers.1.post_attention_layernorm")
    assert main(["pack", "inspect", str(run)]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "post_attention_layernorm" in out
    assert main(["pack", "inspect", str(run), "--family", "gemma3"]) == 0


# --- bf16 with rescale_acts_by_decoder_norm ---------------------------------------------------
def test_bf16_decoder_norm_fold_is_computed_in_fp32(tmp_path):
    """SAELens in bf16 multiplies bf16 pre-activations by bf16 norms; saeflow folds the norms
    into W_enc in fp32 and casts once. Against SAELens in fp32 (the reference numbers), saeflow
    in bf16 keeps the active set on at least as many tokens as SAELens's own bf16 run."""
    from sae_lens import SAE, TopKSAE, TopKSAEConfig

    torch.manual_seed(5)
    sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, metadata=_meta(),
                                rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.2, 4.0, D_SAE)[:, None])
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE))
    sae.save_model(tmp_path / "f32" / "sae")
    sae.to(torch.bfloat16)
    sae.cfg.dtype = "bfloat16"
    sae.save_model(tmp_path / "bf16" / "sae")
    x = _x(4000, seed=6)
    ref32 = SAE.load_from_disk(tmp_path / "f32" / "sae")
    ref16 = SAE.load_from_disk(tmp_path / "bf16" / "sae")
    ours = load_pack(tmp_path / "bf16").sae("resid_post", 1)
    assert ours.dtype == torch.bfloat16
    # The fold itself: bf16 weights, widened, scaled in fp32, cast once.
    w = ref16.W_enc.float() * ref16.W_dec.float().norm(dim=-1)
    assert torch.equal(ours.W_enc, w.to(torch.bfloat16))
    with torch.no_grad():
        act32 = ref32.encode(x) > 0
        same_ours = (ours.encode(x.bfloat16()) > 0).eq(act32).all(-1).float().mean()
        same_sl = (ref16.encode(x.bfloat16()) > 0).eq(act32).all(-1).float().mean()
    assert float(same_ours) >= float(same_sl) - 0.01, (float(same_ours), float(same_sl))

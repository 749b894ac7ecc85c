"""saeflow against the real packages: SAELens (both directions, and HookedSAETransformer's
add_sae) and EleutherAI sparsify (SparseCoder files and a real Trainer run), compared on the
same inputs. The packages come with the test extra (`make install`)."""
import logging

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="pip install -e '.[test]' installs sae-lens")
sparsify = pytest.importorskip("sparsify", reason="pip install -e '.[test]' installs eai-sparsify")

from saeflow import HookPoint, Hooks, convert_pack, load_pack, random_sae, save_pack  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
D_IN, D_SAE = 16, 64


def _x(n=64, d=D_IN, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))  # [n, d]


def _brief_train(module, x, steps=40):
    """A few Adam steps on reconstruction: weights move off their initialisation."""
    params = [p for p in module.parameters() if p.requires_grad and p.dtype.is_floating_point]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = (module(x) - x).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()


# --- SAELens -> saeflow ---------------------------------------------------------------------
def _saelens_sae(arch: str, seed: int, hook="blocks.1.hook_resid_post"):
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=hook, model_name="tiny")
    if arch == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta,
                                            apply_b_dec_to_input=False))
        with torch.no_grad():
            sae.threshold.copy_(0.05 + 0.3 * torch.rand(D_SAE))
    else:
        sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6, metadata=meta,
                                    rescale_acts_by_decoder_norm=arch == "topk_rescale"))
    with torch.no_grad():  # random biases and, for rescale, very unequal decoder norms
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN))
        if arch == "topk_rescale":
            sae.W_dec.mul_(torch.linspace(0.2, 4.0, D_SAE)[:, None])
    return sae


def _compare_saelens(ref, ours, x):
    with torch.no_grad():
        z_ref = ref.encode(x)  # [n, d_sae]
        z = ours.encode(x)
        torch.testing.assert_close(z, z_ref, **TOL)
        assert torch.equal(z > 0, z_ref > 0), "active sets differ"
        torch.testing.assert_close(ours.decode(z), ref.decode(z_ref), **TOL)
    return float((z - z_ref).abs().max())


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "topk_rescale", "batchtopk"])
@pytest.mark.parametrize("trained", [False, True])
def test_saelens_to_saeflow_and_back(tmp_path, arch, trained):
    from sae_lens import SAE

    x = _x()
    if arch == "batchtopk":  # a training SAE, saved as SAELens saves it for inference
        from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        from sae_lens.saes.sae import SAEMetadata

        torch.manual_seed(3)
        train = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=6, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post",
                                                               model_name="tiny")))
        with torch.no_grad():
            train.b_dec.copy_(0.1 * torch.randn(D_IN))
            train.update_topk_threshold(torch.rand(8, D_SAE) + 0.2)
        if trained:
            _brief_train(train, x)
        train.save_inference_model(tmp_path / "src" / "sae")
    else:
        sae = _saelens_sae(arch, seed=7)
        if trained:
            _brief_train(sae, x)
        sae.save_model(tmp_path / "src" / "sae")
    ref = SAE.load_from_disk(tmp_path / "src" / "sae")
    pack = load_pack(tmp_path / "src")
    assert list(pack.entries) == [("resid_post", 1)]
    _compare_saelens(ref, pack.sae("resid_post", 1), x)
    # ... and back: saeflow's folder loads in SAELens with the same numbers and metadata.
    convert_pack(pack, tmp_path / "out")
    back = SAE.load_from_disk(tmp_path / "out" / "resid_post" / "layer_1")
    _compare_saelens(ref, back, x)
    assert back.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert back.cfg.metadata.model_name == "tiny"
    assert back.cfg.metadata.saeflow["converted_from"] == "sae"


# --- saeflow -> SAELens ---------------------------------------------------------------------
@pytest.mark.parametrize("arch,inference,scale", [
    ("relu", None, 1.0), ("jumprelu", None, 1.0), ("topk", None, 1.0), ("relu", None, 2.5),
    ("batchtopk", "jumprelu", 1.0), ("batchtopk", "topk", 1.0)])
def test_saeflow_pack_loads_in_saelens(tmp_path, arch, inference, scale):
    from sae_lens import SAE

    sae = random_sae(D_IN, D_SAE, arch, k=6, seed=5)._replace(input_scale=scale)
    if inference:
        sae = sae._replace(batchtopk_inference=inference)
    save_pack([("mlp_out", 2, sae)], tmp_path / "pack", model_name="tiny-model", d_model=D_IN,
              n_layers=3)
    theirs = SAE.load_from_disk(tmp_path / "pack" / "mlp_out" / "layer_2")
    x = _x(seed=1)
    with torch.no_grad():
        z_ref = theirs.encode(x)
        # input_scale is folded into the weights exactly: same activations, same output.
        torch.testing.assert_close(sae.encode(x), z_ref, **TOL)
        torch.testing.assert_close(sae(x), theirs(x), **TOL)
    meta = theirs.cfg.metadata
    assert (meta.hook_name, meta.model_name) == ("blocks.2.hook_mlp_out", "tiny-model")
    assert meta.saeflow["position"] == "mlp_out" and meta.saeflow["saeflow_version"]


def test_saelens_loads_a_trained_sae_with_its_dim_scale_record(tmp_path):
    """The trainer's per-dimension scale, written as a list under metadata.saeflow, is only a
    record: SAELens loads the folder, applies nothing more and computes what saeflow does."""
    from sae_lens import SAE

    from saeflow.saes.train import _dim_scale, _dim_scale_metadata, _fold_dim_scale

    x = _x(256, seed=2) * torch.linspace(0.1, 30.0, D_IN)
    v = _dim_scale(x, 10.0)
    raw = random_sae(D_IN, D_SAE, "topk", k=6, seed=7)  # as the trainer holds it (scaled space)
    W_enc, W_dec, b_dec = _fold_dim_scale(raw.W_enc, raw.W_dec, raw.b_dec, v)
    sae = raw._replace(W_enc=W_enc.contiguous(), W_dec=W_dec, b_dec=b_dec,
                       metadata=_dim_scale_metadata(v, 10.0))
    save_pack([("resid_post", 1, sae)], tmp_path / "pack", model_name="tiny-model",
              d_model=D_IN, n_layers=3)
    folder = tmp_path / "pack" / "resid_post" / "layer_1"
    theirs = SAE.load_from_disk(folder)
    ours = load_pack(tmp_path / "pack").sae("resid_post", 1)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), **TOL)
        torch.testing.assert_close(theirs(x), ours(x), **TOL)
        # ... and both equal the trainer's forward in its scaled space, mapped back
        torch.testing.assert_close(ours(x), raw(x * v) / v, rtol=1e-4, atol=1e-4)
    rec = theirs.cfg.metadata.saeflow
    assert torch.equal(torch.tensor(rec["dim_scale"], dtype=torch.float32), v)
    assert "do not apply" in rec["dim_scale_note"]


def _tiny_tl_model():
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=D_IN, n_ctx=16, d_head=4, n_heads=4,
                                  d_vocab=50, act_fn="gelu", normalization_type="LN", seed=0)
    return HookedSAETransformer(cfg)


def test_add_sae_on_a_transformerlens_model(tmp_path, caplog):
    """HookedSAETransformer.add_sae attaches saeflow's SAEs (resid and hook_z) and computes
    what saeflow computes. hook_z SAEs take [..., n_heads, d_head] in SAELens; saeflow takes
    the flattened [..., n_heads * d_head]."""
    from sae_lens import SAE

    model = _tiny_tl_model()
    ours = {"resid_post": random_sae(D_IN, D_SAE, "jumprelu", seed=1),
            "attn_z": random_sae(D_IN, D_SAE, "topk", k=5, seed=2)}
    save_pack([(p, 1, s) for p, s in ours.items()], tmp_path / "pack", model_name="tiny-tl",
              d_model=D_IN, n_layers=2)
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    _, clean = model.run_with_cache(tokens)
    with caplog.at_level(logging.WARNING):
        for p in ours:
            model.add_sae(SAE.load_from_disk(tmp_path / "pack" / p / "layer_1"))
    assert "No hook found" not in caplog.text
    assert set(model.acts_to_saes) == {"blocks.1.hook_resid_post", "blocks.1.attn.hook_z"}
    _, cache = model.run_with_cache(tokens)
    z = clean["blocks.1.attn.hook_z"]  # [batch, pos, n_heads, d_head]
    torch.testing.assert_close(cache["blocks.1.attn.hook_z.hook_sae_acts_post"],
                               ours["attn_z"].encode(z.flatten(-2)), **TOL)
    # The residual SAE sees the stream after the attn_z SAE's reconstruction.
    torch.testing.assert_close(cache["blocks.1.hook_resid_post.hook_sae_acts_post"],
                               ours["resid_post"].encode(cache["blocks.1.hook_resid_post.hook_sae_input"]),
                               **TOL)


# --- sparsify -> saeflow --------------------------------------------------------------------
def _compare_sparsify(coder, ours, x):
    with torch.no_grad():
        out = coder.encode(x)
        dense = torch.zeros(x.shape[0], coder.num_latents).scatter_(-1, out.top_indices,
                                                                     out.top_acts)
        z = ours.encode(x)
        torch.testing.assert_close(z, dense, **TOL)
        torch.testing.assert_close(ours.decode(z), coder.decode(out.top_acts, out.top_indices),
                                   **TOL)
    return float((z - dense).abs().max())


@pytest.mark.parametrize("activation", ["topk", "groupmax"])
@pytest.mark.parametrize("trained", [False, True])
def test_sparsify_coder_reads_exactly(tmp_path, activation, trained):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(4)
    coder = SparseCoder(D_IN, SparseCoderConfig(activation=activation, k=8, num_latents=D_SAE))
    with torch.no_grad():
        coder.encoder.bias.copy_(0.1 * torch.randn(D_SAE))
        coder.b_dec.copy_(0.1 * torch.randn(D_IN))
    x = _x(seed=2)
    if trained:
        _brief_train(lambda_module(coder), x)
    coder.save_to_disk(tmp_path / "run" / "layers.1")
    pack = load_pack(tmp_path / "run")
    info = pack.entries[("resid_post", 1)]
    assert info.architecture == activation
    _compare_sparsify(coder, pack.sae("resid_post", 1), x)


def lambda_module(coder):
    """sparsify's forward returns a tuple; train on its reconstruction."""
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.coder = coder

        def forward(self, x):
            return self.coder(x).sae_out
    return Wrap()


def _sparsify_run(model, tmp_path, name, ids, **kw):
    from datasets import Dataset
    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    ds = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    cfg = TrainConfig(SparseCoderConfig(k=4, num_latents=D_SAE), batch_size=8,
                      hookpoints=["layers.1", "layers.1.mlp"], save_every=2, log_to_wandb=False,
                      save_dir=str(tmp_path), run_name=name, lr=1e-3, **kw)
    Trainer(cfg, ds, model.hf).fit()
    model.hf.requires_grad_(False)
    return tmp_path / name


def test_sparsify_trainer_runs_on_a_tiny_gemma(tmp_path, tiny_models):
    """Real sparsify Trainer runs on the tiny random Gemma 3 (two seeds; save_best), read back
    with the model's family: layers.1.mlp is the raw MLP output (mlp_raw), and saeflow encodes
    what saeflow's hooks capture there exactly as sparsify does. (sparsify itself cannot
    combine several seeds with save_best: its best-loss table is keyed by hookpoint.)"""
    from sparsify import SparseCoder

    model = tiny_models["gemma3"]
    ids = torch.randint(3, 300, (32, 16), generator=torch.Generator().manual_seed(0))
    run = _sparsify_run(model, tmp_path, "seeds", ids, init_seeds=[0, 1])
    assert (run / "layers.1.mlp" / "seed1" / "sae.safetensors").is_file()
    pack = load_pack(run, family=model.arch.family, seed=1)
    assert set(pack.entries) == {("resid_post", 1), ("mlp_raw", 1)}
    assert any("layers.1.mlp/seed1 (seed 1)" in c for c in pack.choices)
    pack.check_model(model)
    pts = [HookPoint("resid_post", 1), HookPoint("mlp_raw", 1)]
    with torch.no_grad(), Hooks(model, capture=pts) as h:
        model.hf(input_ids=ids[:4].to(model.device))
    for pt, hook in zip(pts, ("layers.1", "layers.1.mlp")):
        coder = SparseCoder.load_from_disk(run / hook / "seed1")
        x = h.activations[pt].reshape(-1, model.d_model).cpu()  # [tokens, d_model]
        _compare_sparsify(coder, pack.sae(pt.position, pt.layer), x)

    run_b = _sparsify_run(model, tmp_path, "one-seed", ids, save_best=True)
    final = load_pack(run_b, family=model.arch.family)
    best = load_pack(run_b, family=model.arch.family, best=True)
    assert final.entries[("mlp_raw", 1)].path == run_b / "layers.1.mlp"
    assert best.entries[("mlp_raw", 1)].path == run_b / "best" / "layers.1.mlp" / "layers.1.mlp"
    assert any("chose layers.1.mlp (final)" in c for c in final.choices)
    coder = SparseCoder.load_from_disk(run_b / "best" / "layers.1.mlp" / "layers.1.mlp")
    _compare_sparsify(coder, best.sae("mlp_raw", 1), h.activations[pts[1]].reshape(-1, 32).cpu())

"""Training a family on a tiny model: quality, exact resume, faults; evaluation vs a reference."""
import json
import math
from dataclasses import replace

import pytest
import torch
from fixtures import random_weights, reference_splice_logprobs, write_saelens

from saeflow import HookPoint, capture, load_pack
from saeflow.errors import ConfigError, TrainingError
from saeflow.lm.corpora import Corpus
from saeflow.saes.evaluate import evaluate_pack
from saeflow.saes.train import SAETrainer, StackedTrainer, TrainConfig, train_family
from saeflow.saes.train.kernels import GatherPre, csr_rows
from saeflow.saes.train.recipe import moments


def tiny_cfg(**kw):
    base = dict(positions=["resid_post", "mlp_out"], layers=[0, 1], width=64, k=4, tokens=6144,
                batch_size=128, lr=3e-3, ctx_len=32, model_batch=8, chunk_tokens=1024,
                corpus="wiki", model_dtype="float32", encoder_dtype="float32",
                checkpoint_every_s=1e9)
    base.update(kw)
    return TrainConfig(**base)


def test_sparse_backward_matches_dense_autograd():
    torch.manual_seed(0)
    B, d, n, k = 16, 8, 32, 3
    x = torch.randn(B, d)
    W = torch.randn(d, n, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    bd = torch.randn(d, requires_grad=True)
    # reference: dense autograd through the same selection
    pre = (x - bd) @ W + b
    idx = pre.detach().topk(k, dim=1).indices
    vals_ref = pre.gather(1, idx)
    w = torch.randn(B, k)
    (vals_ref * w).sum().backward()
    ref = [W.grad.clone(), b.grad.clone(), bd.grad.clone()]
    for t in (W, b, bd):
        t.grad = None
    rows = torch.arange(B).repeat_interleave(k)
    cols = idx.reshape(-1)
    with torch.no_grad():
        xc = x - bd
        pre2 = xc @ W + b
    vals = GatherPre.apply(pre2[rows, cols], xc, W, b, bd, cols, csr_rows(rows, B))
    (vals * w.reshape(-1)).sum().backward()
    for got, want in zip([W.grad, b.grad, bd.grad], ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _sparse_data(seed: int = 0):
    """A sampler of batches [n, 16]: 4-sparse positive combinations of 64 fixed unit
    directions, plus an offset (what an SAE with 64+ latents and k >= 4 can learn exactly)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)

    def batch(n):
        z = torch.zeros(n, 64)
        idx = torch.rand(n, 64, generator=g).topk(4, dim=1).indices
        z.scatter_(1, idx, 1 + torch.rand(n, 4, generator=g))
        return z @ D + 0.5
    return batch


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_trainer_learns_on_synthetic_sparse_data(arch):
    """Data made of 4-sparse combinations of 64 directions: FVU must fall far below 1."""
    batch = _sparse_data()
    cfg = tiny_cfg(architecture=arch, tokens=128 * 400, width=96)
    t = SAETrainer(16, cfg, 400, torch.device("cpu"), 0, torch.float32)
    t.init_from(batch(1024))
    for _ in range(400):
        m = t.step(batch(128))
    assert m["fvu"] < 0.3  # from 1.0 at the start
    sae = t.export({})
    x = batch(512)
    err = (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert err < 0.35
    assert sae.input_scale == t.input_scale
    if arch == "batchtopk":
        assert sae.threshold is not None and sae.activation == "jumprelu"
        assert 2 <= (sae.encode(x) > 0).sum(1).float().mean() <= 8


def test_train_family_pack_and_eval(tiny_models, tmp_path):
    m = tiny_models["gemma3"]
    train_family(m, tiny_cfg(), tmp_path / "pack", progress=False)
    pack = load_pack(tmp_path / "pack")
    assert sorted(pack.entries) == [("mlp_out", 0), ("mlp_out", 1), ("resid_post", 0),
                                    ("resid_post", 1)]
    prov = pack.provenance
    assert prov["tokens"] == 6144 and prov["seed"] == 0 and prov["wall_seconds"] > 0
    assert prov["corpus"]["sources"][0]["name"] == "wiki" and prov["saeflow_version"]
    assert not (tmp_path / "pack.ckpt").exists()
    sae = pack.sae("resid_post", 1)
    assert sae.architecture == "topk" and sae.k == 4 and sae.d_sae == 64
    cfg = json.loads((tmp_path / "pack" / "resid_post" / "layer_1" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk"
    assert prov["train_config"]["input_norm"] == "dim" and prov["train_config"]["dim_cap"] == 10.0
    ev = evaluate_pack(pack, m, tokens=2048, ce_tokens=256, corpus="wiki", batch=4, ctx_len=32,
                       progress=False)
    for r in ev["saes"]:
        assert r["fvu"] < 0.6, r  # a random tiny model; trained for 48 steps
        assert 3.0 <= r["l0"] <= 4.0
    # same command again: reuses the finished pack
    again = train_family(m, tiny_cfg(), tmp_path / "pack", progress=False)
    assert again.pack.provenance["wall_seconds"] == prov["wall_seconds"]


def test_resume_equals_uninterrupted(tiny_models, tmp_path):
    m = tiny_models["llama"]
    cfg = tiny_cfg(tokens=4096)
    full = train_family(m, cfg, tmp_path / "full", progress=False).pack
    with pytest.raises(KeyboardInterrupt):
        train_family(m, cfg, tmp_path / "part", progress=False, stop_after_chunks=2)
    assert (tmp_path / "part.ckpt" / "state.pt").is_file() and not (tmp_path / "part").exists()
    resumed = train_family(m, cfg, tmp_path / "part", progress=False).pack
    for slot in full.entries:
        a, b = full.sae(*slot), resumed.sae(*slot)
        for name, t in a.tensors().items():
            torch.testing.assert_close(b.tensors()[name], t, rtol=1e-6, atol=1e-6)


def test_bad_input_writes_nothing(tiny_models, tmp_path):
    m = tiny_models["llama"]
    out = tmp_path / "p"
    for kw, msg in [(dict(k=64), "k must be"), (dict(width=0), "width must be at least 1"),
                    (dict(layers=[7]), "layers 0..2"), (dict(positions=["resid_mid"]),
                                                        "unknown position"),
                    (dict(dead_tokens=10), "less than one batch"),
                    (dict(aux_activation="tanh"), "relu or linear")]:
        with pytest.raises(ValueError, match=msg):
            train_family(m, tiny_cfg(**kw), out, progress=False)
    (tmp_path / "small.txt").write_text("only a few words here")
    with pytest.raises(ValueError, match="has only .* training tokens"):
        train_family(m, tiny_cfg(corpus=str(tmp_path / "small.txt")), out, progress=False)
    assert not out.exists() and not (tmp_path / "p.ckpt").exists()
    write_saelens(tmp_path / "other" / "x", random_weights(d_in=32), "relu")
    from saeflow import convert_pack

    convert_pack(load_pack(tmp_path / "other"), out)
    with pytest.raises(FileExistsError, match="different pack"):
        train_family(m, tiny_cfg(), out, progress=False)


@pytest.mark.parametrize("engine", ["sparse", "stacked"])
def test_nan_is_reported_with_the_sae_and_checkpoint_kept(tiny_models, tmp_path, monkeypatch,
                                                          engine):
    m = tiny_models["llama"]
    cls = SAETrainer if engine == "sparse" else StackedTrainer
    real_step = cls.step
    calls = {"n": 0}
    per_chunk = 8 * (4 if engine == "sparse" else 1)  # 8 steps; 4 SAEs alone, or one stack

    def poisoned(self, x):
        calls["n"] += 1
        if calls["n"] > 2 * per_chunk:  # after two chunks
            x = x * float("nan")
        return real_step(self, x)
    monkeypatch.setattr(cls, "step", poisoned)
    with pytest.raises(TrainingError, match=r"in the SAE at resid_post layer 0 .*checkpoint"):
        train_family(m, tiny_cfg(checkpoint_every_s=0, engine=engine), tmp_path / "p",
                     progress=False)
    assert (tmp_path / "p.ckpt" / "state.pt").is_file() and not (tmp_path / "p").exists()


def test_eval_matches_reference_computation(tiny_models, tmp_path):
    """FVU, L0, dead/dense fractions, ΔCE and KL recomputed here by hand."""
    m = tiny_models["qwen2"]
    write_saelens(tmp_path / "s" / "a", random_weights(d_in=32, d_sae=48, seed=1), "relu",
                  hook="blocks.1.hook_resid_post")
    pack = load_pack(tmp_path / "s")
    ev = evaluate_pack(pack, m, tokens=300, ce_tokens=200, corpus="wiki", batch=2, ctx_len=32,
                       progress=False, dead_tokens=0)
    row = ev["saes"][0]
    sae = pack.sae("resid_post", 1)
    corpus = Corpus.from_spec("wiki", seed=0)
    xs, n_ce, ce_clean, ce_spl, kl = [], 0, 0.0, 0.0, 0.0
    p = HookPoint("resid_post", 1)
    for b in corpus.token_batches(m.tokenizer, 2, 32, split="heldout"):
        mask = b.content_mask()
        xs.append(capture(m, b.input_ids, [p], attention_mask=b.attention_mask)[p].cpu()[mask])
        if sum(len(x) for x in xs) >= 300:
            break
    x = torch.cat(xs).double()
    z = sae.encode(x.float()).double()
    xhat = sae.decode(z.float()).double()
    fvu = ((xhat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert row["fvu"] == pytest.approx(float(fvu), rel=1e-4)
    assert row["l0"] == pytest.approx(float((z > 0).sum(1).double().mean()), rel=1e-6)
    freq = (z > 0).double().mean(0)
    assert row["dead_fraction"] == pytest.approx(float((freq == 0).double().mean()))
    assert row["dense_fraction"] == pytest.approx(float((freq > 0.1).double().mean()))
    for b in corpus.token_batches(m.tokenizer, 2, 32, split="heldout"):
        sae_dev = pack.sae("resid_post", 1, device=m.device)
        lc, ls, tgt = reference_splice_logprobs(m, b, p, sae_dev)
        ce_clean += float(-lc.gather(1, tgt[:, None]).sum())
        ce_spl += float(-ls.gather(1, tgt[:, None]).sum())
        kl += float((lc.exp() * (lc - ls)).sum())
        n_ce += len(tgt)
        if n_ce >= 200:
            break
    assert ev["clean_ce"] == pytest.approx(ce_clean / n_ce, rel=1e-4)
    assert row["delta_ce"] == pytest.approx((ce_spl - ce_clean) / n_ce, rel=1e-3, abs=1e-5)
    assert row["kl"] == pytest.approx(kl / n_ce, rel=1e-3, abs=1e-6)
    assert math.isfinite(row["delta_ce"]) and row["kl"] >= 0
    lo, hi = row["delta_ce_ci"]
    assert lo <= row["delta_ce"] <= hi and row["kl_ci"][0] <= row["kl"] <= row["kl_ci"][1]
    # FVU without the massive dimensions, recomputed by hand
    var_d = ((x - x.mean(0)) ** 2).sum(0)
    keep = torch.ones(x.shape[1], dtype=torch.bool)
    keep[row["massive_dims"]] = False
    want = float(((xhat - x) ** 2).sum(0)[keep].sum() / var_d[keep].sum())
    assert row["fvu_rest"] == pytest.approx(want, rel=1e-4)
    # dead / dense fractions go on counting past the FVU tokens, to dead_tokens
    ev2 = evaluate_pack(pack, m, tokens=300, ce_tokens=200, corpus="wiki", batch=2, ctx_len=32,
                        progress=False, dead_tokens=900)
    row2 = ev2["saes"][0]
    assert ev2["tokens"] == ev["tokens"] and ev2["dead_tokens"] >= 900
    assert row2["fvu"] == row["fvu"] and row2["dead_tokens"] == ev2["dead_tokens"]
    xs = []
    for b in corpus.token_batches(m.tokenizer, 2, 32, split="heldout"):
        xs.append(capture(m, b.input_ids, [p], attention_mask=b.attention_mask)[p].cpu()[b.content_mask()])
        if sum(len(x) for x in xs) >= 900:
            break
    z = sae.encode(torch.cat(xs))
    assert len(z) == ev2["dead_tokens"]
    assert row2["dead_fraction"] == pytest.approx(float(((z > 0).sum(0) == 0).double().mean()))
    assert row2["dead_fraction"] <= row["dead_fraction"]
    # splicing only some positions: the others get no ΔCE; a position the pack lacks is refused
    with pytest.raises(ConfigError, match="no SAE of the pack is at"):
        evaluate_pack(pack, m, tokens=300, ce_tokens=200, corpus="wiki", batch=2, ctx_len=32,
                      progress=False, dead_tokens=0, ce_positions=["attn_out"])
    ev3 = evaluate_pack(pack, m, tokens=300, ce_tokens=200, corpus="wiki", batch=2, ctx_len=32,
                        progress=False, dead_tokens=0, ce_positions=["resid_post"])
    assert ev3["saes"][0]["delta_ce"] == pytest.approx(row["delta_ce"])


def test_massive_dimensions_and_bootstrap_interval():
    import numpy as np

    from saeflow.saes.evaluate import bootstrap_ratio_ci, massive_dims

    var = torch.ones(640)
    var[[3, 17]] = 500.0  # two dimensions carry most of the variance, as in Gemma's residual
    var[40] = 2000.0  # and one is an outlier far beyond the median
    assert massive_dims(var) == [3, 17, 40] and massive_dims(torch.ones(8)) == []
    g = np.random.default_rng(0)
    n = np.full(400, 100.0)
    num = g.normal(0.3, 0.5, 400) * 100  # rows whose mean per-token value is ~0.3
    lo, hi = bootstrap_ratio_ci(num, n)
    assert lo < num.sum() / n.sum() < hi and hi - lo < 0.2 and lo > 0.2
    assert bootstrap_ratio_ci(num, n) == (lo, hi)  # seeded


def test_failed_training_leaves_model_dtype_alone(tiny_models, tmp_path, monkeypatch):
    m = tiny_models["gemma2"]
    before = m.dtype

    def boom(self, x):
        raise TrainingError("loss is nan")
    monkeypatch.setattr(SAETrainer, "step", boom)
    with pytest.raises(TrainingError):
        train_family(m, tiny_cfg(model_dtype="bfloat16", engine="sparse"), tmp_path / "p",
                     progress=False)
    assert m.dtype == before


@pytest.mark.parametrize("arch,norm,aux,aux_k", [("topk", "dim", "relu", 8),
                                                 ("topk", "scalar", "relu", 8),
                                                 ("batchtopk", "dim", "relu", 8),
                                                 ("batchtopk", "scalar", "relu", 8),
                                                 ("topk", "dim", "linear", 8),
                                                 ("topk", "dim", "linear", 256)])
def test_stacked_engine_equals_the_sparse_trainer(arch, norm, aux, aux_k):
    """The batched GPU engine computes the same steps as the per-SAE sparse one (fp32, CPU):
    same init per seed, same losses (AuxK included), same Adam, same dead-latent bookkeeping.
    aux_k 8: the top 8 dead latents of each row; 256 (the width): every dead latent."""
    cfg = TrainConfig(width=256, k=2, architecture=arch, tokens=4096, batch_size=64, lr=1e-3,
                      dead_tokens=64, aux_k=aux_k, input_norm=norm,  # AuxK is exercised
                      aux_activation=aux)
    seeds = [3, 11]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 512, 16, generator=g) * torch.tensor([1.0, 3.0])[:, None, None] + 0.5
    singles = [SAETrainer(16, cfg, 8, torch.device("cpu"), s, torch.float32) for s in seeds]
    stacked = StackedTrainer(16, cfg, 8, torch.device("cpu"), seeds, torch.float32)
    for i, t in enumerate(singles):
        t.init_from(x[i])
    stacked.init_from(x)
    aux_seen = False
    # fp32 rounding (CSR vs dense sums) is amplified by BatchTopK's batch-wide selection: ~1e-3
    # after 4 steps on this tiny, fast-moving problem; TopK stays within ~1e-6 for 8 steps.
    for b0 in range(0, 512 if arch == "topk" else 256, 64):
        for i, t in enumerate(singles):
            t.step(x[i, b0:b0 + 64])
        stacked.step(x[:, b0:b0 + 64])
        for i, m in enumerate(stacked.metrics()):
            for key in ("fvu", "l0", "dead", "loss", "aux"):
                assert m[key] == pytest.approx(singles[i].last[key], rel=1e-3, abs=1e-5), key
            aux_seen |= m["aux"] > 0
    assert aux_seen
    for i, t in enumerate(singles):
        a, b = t.export({}), stacked.export(i, {})
        for name, ta in a.tensors().items():
            torch.testing.assert_close(b.tensors()[name], ta, atol=1e-3, rtol=1e-3)
        assert torch.equal(stacked.since_fired[i], t.since_fired)
    # a checkpoint of either engine resumes in the other
    other = StackedTrainer(16, cfg, 8, torch.device("cpu"), seeds, torch.float32)
    other.load_state_dicts([t.state_dict() for t in singles])
    back = SAETrainer(16, cfg, 8, torch.device("cpu"), seeds[1], torch.float32)
    back.load_state_dict(stacked.state_dict(1))
    names = ("W_enc", "W_dec", "b_enc", "b_dec")  # SAETrainer holds W_enc as its transpose
    for eng in (other, back):
        for name in names:
            ref = (getattr(stacked, name)[1] if eng is back
                   else torch.stack([getattr(t, name) for t in singles]))
            assert torch.equal(getattr(eng, name).detach(), ref.detach())
    assert back.step_i == stacked.step_i and back.input_scale == stacked.input_scales[1]


def test_train_family_stacked_engine_writes_the_same_pack(tiny_models, tmp_path):
    m = tiny_models["gemma3"]  # attn_z would be wider; resid and mlp share one stack
    cfg = tiny_cfg(tokens=2048, positions=["resid_post", "mlp_out"], encoder_dtype="float32",
                   model_dtype="float32")
    a = train_family(m, replace(cfg, engine="sparse"), tmp_path / "a", progress=False).pack
    b = train_family(m, replace(cfg, engine="stacked"), tmp_path / "b", progress=False).pack
    assert b.provenance["engine"] == "stacked" and a.provenance["engine"] == "sparse"
    for slot in a.entries:
        for name, t in a.sae(*slot).tensors().items():
            torch.testing.assert_close(b.sae(*slot).tensors()[name], t, atol=1e-4, rtol=1e-3)


def test_training_in_bf16_leaves_the_callers_weights_exact(tiny_models, tmp_path):
    m = tiny_models["gemma3"]
    before = {k: v.clone() for k, v in m.hf.state_dict().items()}
    # non-persistent buffers (embed_scale, rotary inv_freq) are outside the state dict
    buffers = {k: v.clone() for k, v in m.hf.named_buffers()}
    assert set(buffers) - set(before), "the tiny Gemma 3 has buffers outside its state dict"
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)).to(m.device)
    with torch.no_grad():
        logits = m.hf(input_ids=ids).logits
    train_family(m, tiny_cfg(tokens=1024, model_dtype="bfloat16", layers=[0]), tmp_path / "p",
                 progress=False)
    after = m.hf.state_dict()
    assert m.dtype == torch.float32
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(buffers[k], v) for k, v in m.hf.named_buffers())
    with torch.no_grad():
        assert torch.equal(m.hf(input_ids=ids).logits, logits)


def _massive_data(n, g, d=16, n_dirs=64):
    """4-sparse combinations of unit directions, plus one 'massive' dimension (x100) as in
    Gemma's residual stream."""
    D = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=torch.Generator().manual_seed(1)), dim=1)
    z = torch.zeros(n, n_dirs)
    idx = torch.rand(n, n_dirs, generator=g).topk(4, dim=1).indices
    z.scatter_(1, idx, 1 + torch.rand(n, 4, generator=g))
    x = z @ D + 0.5
    x[:, 3] = x[:, 3] * 100 + 40
    return x


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_per_dimension_standardisation_folds_exactly(arch, tmp_path):
    """input_norm='dim': the exported SAE (scales folded into W_enc, W_dec, b_dec) encodes and
    decodes raw inputs exactly as the trainer does in its standardised space, before and after
    saving and loading the pack."""
    from saeflow.saes.packs import save_pack

    g = torch.Generator().manual_seed(0)
    cfg = tiny_cfg(architecture=arch, width=96, input_norm="dim")
    t = SAETrainer(16, cfg, 60, torch.device("cpu"), 0, torch.float32)
    t.init_from(_massive_data(1024, g))
    # the massive dimension is divided by dim_cap x the median sd, not by its own sd
    assert t.dim_scale is not None and t.dim_scale[3] < 0.2 * t.dim_scale.median()
    for _ in range(60):
        t.step(_massive_data(128, g))
    x = _massive_data(256, g)
    with torch.no_grad():  # the trainer's own forward, in its standardised space
        xs = x * t.input_scale * t.dim_scale
        pre = (xs - t.b_dec) @ t.W_enc + t.b_enc
    sae = t.export({})
    assert sae.metadata["input_norm"] == "dim (folded)"
    if arch == "topk":
        vals, idx = pre.topk(cfg.k, dim=1)
        z_ref = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
    else:
        z_ref = pre.relu() * (pre > sae.threshold)
    recon_ref = ((z_ref @ t.W_dec + t.b_dec) / (t.input_scale * t.dim_scale)).detach()
    save_pack([("resid_post", 0, sae)], tmp_path / "p", model_name="m", d_model=16, n_layers=1)
    loaded = load_pack(tmp_path / "p").sae("resid_post", 0)
    for s in (sae, loaded):
        z = s.encode(x)
        assert torch.equal(z > 0, z_ref > 0)
        torch.testing.assert_close(z, z_ref.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.decode(z), recon_ref, rtol=1e-4, atol=1e-3)


def test_exported_threshold_reproduces_batchtopk_sparsity_on_held_out_data():
    """BatchTopK keeps batch*k pre-activations per batch; the exported JumpReLU threshold must
    give about k active latents per token on data the trainer never saw, and select what
    BatchTopK selects on such a batch."""
    batch = _sparse_data()
    cfg = tiny_cfg(architecture="batchtopk", width=96, k=4, input_norm="dim")
    t = SAETrainer(16, cfg, 400, torch.device("cpu"), 0, torch.float32)
    t.init_from(batch(1024))
    for _ in range(400):
        t.step(batch(128))
    sae = t.export({})
    x = batch(4096)  # held out
    jump = sae.encode(x) > 0
    assert jump.sum(1).float().mean() == pytest.approx(cfg.k, rel=0.15)
    pre = sae.pre_acts(x)
    vals, pos = pre.reshape(-1).topk(x.shape[0] * cfg.k)
    btk = torch.zeros(pre.numel(), dtype=torch.bool)
    btk[pos[vals > 0]] = True
    agree = (btk.reshape(pre.shape) == jump).float().mean()
    assert agree > 0.99


def test_identity_of_the_older_recipe_is_unchanged():
    """Packs trained before input_norm existed (one scalar scale) keep their identity, so an
    existing pack is still found and reused; the new recipe is a different identity."""
    old = TrainConfig(input_norm="scalar", dim_cap=0.0).identity()
    assert "input_norm" not in old and "dim_cap" not in old
    new = TrainConfig().identity()
    assert new["input_norm"] == "dim" and new["dim_cap"] == 10.0


def _starved_trainer(cfg, seed=0):
    """A trainer on synthetic data whose latents 0..63 have all-negative pre-activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 16, generator=g)
    t = SAETrainer(16, cfg, 2048 // cfg.batch_size, torch.device("cpu"), seed, torch.float32)
    t.init_from(x[:512])
    with torch.no_grad():
        t.b_enc[:64] = -8.0
    return t, x


@pytest.mark.parametrize("aux,revived", [("relu", False), ("linear", True)])
def test_linear_auxk_revives_latents_whose_preactivations_are_all_negative(aux, revived):
    """With a relu'd AuxK a latent whose pre-activations are all negative gets no gradient and
    stays dead (what left 30-40% of the embedded attn_out latents dead); with the sign kept,
    AuxK pulls it back."""
    cfg = TrainConfig(width=128, k=4, tokens=2048, batch_size=64, lr=5e-2, dead_tokens=128,
                      aux_k=32, aux_coef=1.0, aux_activation=aux)
    t, x = _starved_trainer(cfg)
    with torch.no_grad():
        assert float(((x * t.dim_scale - t.b_dec) @ t.W_enc + t.b_enc)[:, :64].max()) < 0
    for _ in range(2):
        for b0 in range(0, 2048, 64):
            t.step(x[b0:b0 + 64])
    with torch.no_grad():
        pre = (x * t.dim_scale - t.b_dec) @ t.W_enc + t.b_enc  # [N, 128]
    positive = (pre[:, :64] > 0).any(0)  # [64]: can fire again
    assert bool(positive.any()) is revived
    if revived:
        assert float(positive.float().mean()) > 0.5


def test_resampling_revives_dead_latents_identically_in_both_engines():
    cfg = TrainConfig(width=128, k=4, tokens=2048, batch_size=64, lr=1e-3, dead_tokens=64,
                      resample_dead=True)
    t, x = _starved_trainer(cfg)
    for b0 in range(0, 128, 64):
        t.step(x[b0:b0 + 64])
    st = StackedTrainer(16, cfg, t.steps_total, torch.device("cpu"), [0], torch.float32)
    st.load_state_dicts([t.state_dict()])
    dead_before = t.since_fired > t.dead_tokens
    assert int(dead_before.sum()) >= 64
    n = t.resample(x[:512])
    assert n == int(dead_before.sum()) == st.resample(x[None, :512])
    assert not (t.since_fired > t.dead_tokens).any()
    W_dec = t.W_dec.detach()
    torch.testing.assert_close(W_dec[dead_before].norm(dim=1), torch.ones(n))
    assert torch.equal(t.b_enc.detach()[dead_before], torch.zeros(n))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):  # SAETrainer holds W_enc transposed
        torch.testing.assert_close(getattr(st, name).detach()[0], getattr(t, name).detach(),
                                   atol=1e-5, rtol=1e-5)
    ma, mb = moments(t), moments(st, 0)  # Adam moments of the resampled latents are reset
    for name in ma:
        for va, vb in zip(ma[name], mb[name], strict=True):
            torch.testing.assert_close(vb, va, atol=1e-6, rtol=1e-5)
    # no resampling once the lr decays
    t.step_i = t.steps_total - 1
    with torch.no_grad():
        t.since_fired[:] = 10**6
    assert t.resample(x[:512]) == 0

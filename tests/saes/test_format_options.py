"""Every option saeflow reads is exact or refused: TopK decoder-norm rescale, groupmax,
legacy normalisation flags, transcoders, sparsify seeds / best, raw MLP and attention sites,
verify against tensor headers, one dtype on write."""
import json
import subprocess
import sys

import pytest
import torch
from fixtures import random_weights, ref_encode, write_saelens, write_sparsify

from saeflow import HookPoint, Hooks, convert_pack, load_pack
from saeflow.errors import PackError

X = torch.randn(30, 16, generator=torch.Generator().manual_seed(2))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "saeflow.cli.main", *map(str, args)],
                          capture_output=True, text=True)


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_topk_rescale_by_decoder_norm_is_exact(tmp_path):
    w = random_weights()
    w["W_dec"] = w["W_dec"] * torch.linspace(0.3, 3.0, 48)[:, None]  # unequal decoder norms
    folder = write_saelens(tmp_path / "src" / "a", w, "topk", k=5)
    _edit_cfg(folder, rescale_acts_by_decoder_norm=True)
    sae = load_pack(tmp_path / "src").sae("resid_post", 1)
    # Reference, written from the definition: select on pre * ||W_dec||, decode acts / ||W_dec||.
    n = w["W_dec"].double().norm(dim=-1)
    pre = (X.double() - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()
    scaled = pre * n
    ref = torch.zeros_like(scaled)
    vals, idx = scaled.topk(5, dim=-1)
    ref.scatter_(-1, idx, vals.clamp(min=0))
    recon = (ref / n) @ w["W_dec"].double() + w["b_dec"].double()
    torch.testing.assert_close(sae.encode(X).double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(X)).double(), recon, rtol=1e-4, atol=1e-5)
    assert ((sae.encode(X) > 0) == (ref > 0)).all()  # the same active sets
    # The converted folder carries it too (folded into the weights, flag off).
    again = convert_pack(load_pack(tmp_path / "src"), tmp_path / "out")
    torch.testing.assert_close(again.sae("resid_post", 1).encode(X).double(), ref, rtol=1e-4,
                               atol=1e-5)
    cfg = json.loads((tmp_path / "out" / "resid_post" / "layer_1" / "cfg.json").read_text())
    assert cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["metadata"]["saeflow"]["rescale_acts_by_decoder_norm"] == "folded"
    assert "rescale_acts_by_decoder_norm" in " ".join(
        load_pack(tmp_path / "src").describe()["saes"][0]["options"])


def test_sparsify_groupmax(tmp_path):
    w = random_weights()
    folder = write_sparsify(tmp_path / "run", "layers.2", w, k=6)
    _edit_cfg(folder, activation="groupmax")
    pack = load_pack(tmp_path / "run")
    assert pack.entries[("resid_post", 2)].architecture == "groupmax"
    z = pack.sae("resid_post", 2).encode(X)  # [30, 48]
    pre = ((X.double() - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()).relu()
    groups = pre.unflatten(-1, (6, 8))
    ref = torch.zeros_like(groups)
    v, i = groups.max(-1, keepdim=True)
    ref = ref.scatter(-1, i, v).flatten(-2)
    torch.testing.assert_close(z.double(), ref, rtol=1e-4, atol=1e-5)
    assert ((z > 0).sum(-1) <= 6).all()
    with pytest.raises(PackError, match="GroupMax SAE .* no SAELens form"):
        convert_pack(pack, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_legacy_normalize_activations_flag(tmp_path):
    w = random_weights()
    folder = write_saelens(tmp_path / "a", w, "relu", flat=True)
    _edit_cfg(folder, normalize_activations=True)
    sae = load_pack(tmp_path).sae("resid_post", 1)  # SAELens: expected_average_only_in
    ref = ref_encode(X, w["W_enc"], w["b_enc"], w["b_dec"], "relu", apply_b_dec=True)
    torch.testing.assert_close(sae.encode(X).double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change,why", [
    ({"normalize_activations": "layer_norm"}, "layer_norm"),
    ({"architecture": "transcoder", "d_out": 16}, "transcoder"),
    ({"architecture": "gated"}, "gated"),
    ({"metadata": {"hook_name": "blocks.1.attn.hook_z", "hook_head_index": 3}}, "single attention head"),
])
def test_refused_saelens_options_are_flagged_in_inspect(tmp_path, change, why):
    write_saelens(tmp_path / "p" / "ok", random_weights(), "relu", hook="blocks.0.hook_resid_post")
    folder = write_saelens(tmp_path / "p" / "bad", random_weights(seed=1), "relu")
    _edit_cfg(folder, **change)
    with pytest.raises(PackError, match=why):
        load_pack(tmp_path / "p")
    listed = load_pack(tmp_path / "p", strict=False)
    assert list(listed.entries) == [("resid_post", 0)]
    assert why in listed.describe()["refused"][0]["why"]
    r = _cli("pack", "inspect", tmp_path / "p")
    assert r.returncode == 1 and "REFUSED: bad:" in r.stdout and why in r.stdout


def test_sparsify_transcoder_refused(tmp_path):
    folder = write_sparsify(tmp_path / "run", "layers.1.mlp", random_weights(), k=4)
    _edit_cfg(folder, transcode=True)
    with pytest.raises(PackError, match="transcoder"):
        load_pack(tmp_path / "run")


def test_sparsify_seeds_and_best(tmp_path):
    run = tmp_path / "run"
    ws = {s: random_weights(seed=10 + s) for s in (0, 1)}
    for s, w in ws.items():
        write_sparsify(run / "layers.1", f"seed{s}", w, k=4)
    wb = random_weights(seed=99)
    write_sparsify(run / "best" / "layers.1", "seed0", wb, k=4)
    (run / "config.json").write_text(json.dumps({"model": "tiny-llama-like"}))
    pack = load_pack(run)
    assert pack.entries[("resid_post", 1)].path == run / "layers.1" / "seed0"
    assert "chose layers.1/seed0 (seed 0)" in pack.choices[0] and "--seed" in pack.choices[0]
    one = load_pack(run, seed=1)
    ref = ref_encode(X, ws[1]["W_enc"], ws[1]["b_enc"], ws[1]["b_dec"], "topk", k=4,
                     apply_b_dec=True)
    torch.testing.assert_close(one.sae("resid_post", 1).encode(X).double(), ref, rtol=1e-4,
                               atol=1e-5)
    best = load_pack(run, best=True)
    assert best.entries[("resid_post", 1)].path == run / "best" / "layers.1" / "seed0"
    assert "best" in best.choices[0]
    with pytest.raises(PackError, match=r"seed=7.*available"):
        load_pack(run, seed=7)
    r = _cli("pack", "inspect", run, "--seed", "1")
    assert r.returncode == 0 and "chose layers.1/seed1 (seed 1)" in r.stdout


def test_sparsify_family_from_run_config(tmp_path):
    run = tmp_path / "run"
    write_sparsify(run, "layers.1.mlp", random_weights(), k=4)
    (run / "config.json").write_text(json.dumps({"model": "google/gemma-3-270m"}))
    assert list(load_pack(run).entries) == [("mlp_raw", 1)]
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M"}))
    assert list(load_pack(run).entries) == [("mlp_out", 1)]


def test_verify_checks_cfg_against_headers(tmp_path):
    write_saelens(tmp_path / "src" / "a", random_weights(), "relu")
    convert_pack(load_pack(tmp_path / "src"), tmp_path / "out")
    assert load_pack(tmp_path / "out").verify() == []
    cfg_file = tmp_path / "out" / "resid_post" / "layer_1" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["d_in"] = 17
    cfg_file.write_text(json.dumps(cfg))
    probs = load_pack(tmp_path / "out").verify()
    assert any("W_enc has shape (16, 48), the config implies (17, 48)" in p for p in probs)
    assert any("d_in=17 but pack.json says 16" in p for p in probs)
    r = _cli("pack", "inspect", tmp_path / "out", "--verify")
    assert r.returncode == 1 and "verify: FAILED" in r.stdout
    # A foreign folder, too: its cfg names a dtype its tensors do not have.
    folder = write_saelens(tmp_path / "f" / "a", random_weights(), "relu")
    _edit_cfg(folder, dtype="float16")
    assert any("dtype 'float16' but the tensors are float32" in p
               for p in load_pack(tmp_path / "f", strict=False).verify())
    with pytest.raises(PackError, match="cfg contradicts the weights"):
        load_pack(tmp_path / "f")


def test_convert_writes_one_dtype(tmp_path):
    from safetensors import safe_open

    w = random_weights()
    w = {k: (v.double() if k.startswith("W") else v) for k, v in w.items()}
    folder = write_saelens(tmp_path / "src" / "a", w, "jumprelu")
    _edit_cfg(folder, dtype="float64")
    out = convert_pack(load_pack(tmp_path / "src"), tmp_path / "out")
    f = tmp_path / "out" / "resid_post" / "layer_1" / "sae_weights.safetensors"
    with safe_open(str(f), "pt") as st:
        dtypes = {st.get_tensor(k).dtype for k in st.keys()}
    assert dtypes == {torch.float64}
    assert json.loads((f.parent / "cfg.json").read_text())["dtype"] == "float64"
    assert out.verify() == []


def test_written_cfg_has_saelens_6_metadata(tmp_path):
    write_saelens(tmp_path / "src" / "a", random_weights(), "relu", hook="blocks.1.hook_mlp_out")
    convert_pack(load_pack(tmp_path / "src"), tmp_path / "out", model_name="tiny")
    cfg = json.loads((tmp_path / "out" / "mlp_out" / "layer_1" / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["sae_lens_version"].startswith("6.")
    assert (meta["hook_name"], meta["model_name"]) == ("blocks.1.hook_mlp_out", "tiny")
    assert meta["saeflow"]["saeflow_version"] and meta["saeflow"]["converted_from"] == "a"


def test_raw_sites_read_and_written_by_hooks(tiny_models):
    """Gemma: mlp_raw is the MLP module's output, mlp_out the post-norm output; elsewhere the
    same site."""
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    g = tiny_models["gemma3"]
    pts = [HookPoint(p, 1) for p in ("mlp_raw", "mlp_out", "attn_raw", "attn_out")]
    seen = {}
    handles = [g.module("model.layers.1.mlp").register_forward_hook(
                   lambda m, a, o: seen.__setitem__("mlp", o.detach())),
               g.module("model.layers.1.self_attn").register_forward_hook(
                   lambda m, a, o: seen.__setitem__("attn", o[0].detach()))]
    try:
        with torch.no_grad(), Hooks(g, capture=pts) as h:
            g.hf(input_ids=ids.to(g.device))
    finally:
        for hd in handles:
            hd.remove()
    torch.testing.assert_close(h.activations[pts[0]], seen["mlp"])
    torch.testing.assert_close(h.activations[pts[2]], seen["attn"])
    assert not torch.allclose(h.activations[pts[0]], h.activations[pts[1]])
    # Writing: zeroing mlp_raw zeroes mlp_out after the norm.
    zero = {HookPoint("mlp_raw", 1): lambda a: torch.zeros_like(a)}
    with torch.no_grad(), Hooks(g, capture=[HookPoint("mlp_out", 1)], edits=zero) as h2:
        g.hf(input_ids=ids.to(g.device))
    assert h2.activations[HookPoint("mlp_out", 1)].abs().max() < 1e-6
    ll = tiny_models["llama"]
    with torch.no_grad(), Hooks(ll, capture=[HookPoint("mlp_raw", 1), HookPoint("mlp_out", 1)]) as h3:
        ll.hf(input_ids=ids.to(ll.device))
    torch.testing.assert_close(h3.activations[HookPoint("mlp_raw", 1)],
                               h3.activations[HookPoint("mlp_out", 1)])
    assert g.arch.tl_name("mlp_raw", 1) is None and ll.arch.tl_name("mlp_raw", 1) == \
        "blocks.1.hook_mlp_out"


def test_flow_maps_raw_sites_through_the_post_norm(tiny_models, tmp_path):
    from saeflow import random_sae, save_pack
    from saeflow.errors import FlowError
    from saeflow.flow.compute import run_flow

    g = tiny_models["gemma3"]
    saes = [(p, L, random_sae(32, 24, "relu", seed=L * 7 + i)) for L in range(3)
            for i, p in enumerate(("resid_post", "mlp_raw", "attn_raw"))]
    pack = save_pack(saes, tmp_path / "pack", model_name="tiny", d_model=32, n_layers=3)
    with pytest.raises(FlowError, match="pass --model"):
        run_flow(pack, tmp_path / "run0", progress=False)
    run = run_flow(pack, tmp_path / "run", model=g, progress=False)
    m = json.loads((tmp_path / "run" / "flow.json").read_text())
    assert m["predecessor_slots"]["1"] == {"res": "0/resid_post", "mlp": "1/mlp_raw",
                                           "attn": "1/attn_raw"}
    assert run.layers

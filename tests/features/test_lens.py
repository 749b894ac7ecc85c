"""The logit lens on demand (features/lens.py): a feature page's lens equals the tiled lens of
its direction, the vocabulary moments behind search are exact, and search by a logit token
finds the features that promote it."""
import pytest
import torch

from saeflow.features.index import IndexConfig, build_index
from saeflow.features.labels import logit_lens, unembed_directions
from saeflow.features.lens import LogitLens
from saeflow.features.tables import open_index, open_index_with_lens
from saeflow.saes.packs import save_pack
from saeflow.saes.sae import random_sae


@pytest.fixture(scope="module")
def lens_setup(tiny_models, tmp_path_factory):
    model = tiny_models["gemma3"]
    d = model.d_model
    saes = [("resid_post", 1, random_sae(d, 24, "relu", seed=11)),
            ("attn_z", 2, random_sae(model.width("attn_z"), 16, "relu", seed=12))]
    root = tmp_path_factory.mktemp("lens")
    pack = save_pack(saes, root / "pack", model_name="tiny", d_model=d, n_layers=3)
    return model, pack, root


def test_feature_lens_equals_the_tiled_lens(lens_setup):
    model, pack, _ = lens_setup
    lens = LogitLens(pack, model, n=5)
    for slot in pack.entries:
        dirs = lens.directions(slot)
        top_i, top_v, bot_i, _ = logit_lens(model, dirs, n=5)
        whole = lens.slot(slot)
        for f in (0, 3, dirs.shape[0] - 1):
            row = lens.feature(slot, f)
            assert [t["id"] for t in row["logit_top"]] == top_i[f].tolist()
            assert [t["id"] for t in row["logit_bottom"]] == bot_i[f].tolist()
            assert _ids(row) == _ids(whole[f])
            assert [t["logit"] for t in row["logit_top"]] == pytest.approx(
                [t["logit"] for t in whole[f]["logit_top"]], rel=1e-5)
    with pytest.raises(IndexError):
        lens.feature(("resid_post", 1), 24)


def test_vocabulary_moments_are_exact(lens_setup):
    model, pack, _ = lens_setup
    lens = LogitLens(pack, model)
    dirs = lens.directions(("resid_post", 1))
    W_U = model.hf.get_output_embeddings().weight.detach().float().cpu()
    logits = unembed_directions(model, dirs, W_U).cpu()  # [F, V] brute force
    mu, C = lens._vocab_moments()
    assert torch.allclose(dirs @ mu, logits.mean(1), rtol=1e-4, atol=1e-5)
    var = ((dirs @ C) * dirs).sum(1)
    assert torch.allclose(var, logits.var(1), rtol=1e-3, atol=1e-6)


def test_search_by_a_logit_token(lens_setup):
    model, pack, root = lens_setup
    cfg = IndexConfig(tokens=400, batch_size=4, ctx_len=32, n_top=3, n_samples=2,
                      encoder_dtype="float32", corpus="wiki")
    build_index(pack, model, root / "run", cfg, progress=False)
    plain = open_index(root / "run")
    assert plain.feature(1, "resid_post", 2)["logit_top"] is None  # not in the tables
    idx = open_index_with_lens(root / "run", model)
    row = idx.feature(1, "resid_post", 2)
    token = next(t["token"].strip() for t in row["logit_top"] if t["token"].strip())
    hits = idx.search(token, limit=50)
    found = [h for h in hits if h["id"] == "1/resid_post/2"]
    assert found and "logit_rank" in found[0] and found[0]["score"] >= 2
    exported = idx.slot_features(1, "resid_post")
    assert _ids(exported[2]) == _ids(row)


def _ids(row):
    return [t["id"] for t in row["logit_top"]], [t["id"] for t in row["logit_bottom"]]

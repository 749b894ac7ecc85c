"""Hub fetching against a local directory laid out like the hub."""
import json

import pytest
from fixtures import random_weights, write_gemmascope, write_gemmascope2, write_saelens

from saeflow.errors import HubError
from saeflow.saes.hub import fetch


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    gs = root / "google" / "gemma-scope-2b-pt-res"
    for L in range(3):
        for l0 in (20, 95, 150):
            write_gemmascope(gs, L, random_weights(seed=L * 10 + l0 % 7), l0=l0)
        write_gemmascope(gs, L, random_weights(seed=99), width="65k", l0=100)
    gs2 = root / "google" / "gemma-scope-2-270m-pt"
    for L in range(2):
        write_gemmascope2(gs2, "resid_post_all", L, random_weights(seed=L), f"model.layers.{L}.output")
        write_gemmascope2(gs2, "mlp_out_all", L, random_weights(seed=L + 5),
                          f"model.layers.{L}.post_feedforward_layernorm.output")
        write_gemmascope2(gs2, "resid_post_all", L, random_weights(seed=L), f"model.layers.{L}.output",
                          l0="big")
    raw = root / "someone" / "my-saes"
    write_saelens(raw / "blocks.0.hook_resid_post", random_weights(), "relu",
                  hook="blocks.0.hook_resid_post")
    (raw / "README.md").write_text("not an SAE")
    return root


def test_fetch_gemmascope_canonical(mirror, tmp_path):
    pack = fetch("gemma-scope-2b-pt-res-canonical", out=tmp_path / "p", layers="0-2",
                 mirror=str(mirror))
    assert pack.model_name == "gemma-2-2b" and pack.n_layers == 26
    assert sorted(pack.entries) == [("resid_post", L) for L in range(3)]
    assert pack.provenance["files"][0] == "layer_0/width_16k/average_l0_95/params.npz"
    cfg = json.loads((pack.root / "resid_post" / "layer_1" / "cfg.json").read_text())
    assert cfg["metadata"]["neuronpedia_id"] == "gemma-2-2b/1-gemmascope-res-16k"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    with pytest.raises(HubError, match="no layer 5"):
        fetch("gemma-scope-2b-pt-res-canonical", out=tmp_path / "q", layers="5", mirror=str(mirror))
    assert not (tmp_path / "q").exists()


def test_fetch_gemmascope2_and_raw_repo(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFLOW_HUB_MIRROR", str(mirror))
    pack = fetch("gemma-scope-2-270m-pt", out=tmp_path / "g", positions="resid_post,mlp_out")
    assert set(pack.entries) == {
        ("resid_post", 0), ("resid_post", 1), ("mlp_out", 0), ("mlp_out", 1)}
    big = fetch("gemma-scope-2-270m-pt-res", out=tmp_path / "b", l0="big", layers="1")
    assert list(big.entries) == [("resid_post", 1)]
    raw = fetch("someone/my-saes", out=tmp_path / "r")
    assert list(raw.entries) == [("resid_post", 0)]
    with pytest.raises(HubError, match="unknown release"):
        fetch("not-a-release", out=tmp_path / "x")


def test_fetch_saelens_release_through_its_directory(mirror, tmp_path):
    """A SAELens release resolved through a directory shaped like sae_lens's lookup table."""
    from types import SimpleNamespace

    repo = mirror / "jbloom" / "GPT2-Small-SAEs-Reformatted"
    for L in range(3):
        write_saelens(repo / f"blocks.{L}.hook_resid_pre", random_weights(d_in=16, seed=L), "relu",
                      hook=f"blocks.{L}.hook_resid_pre", model_name="gpt2-small")
    directory = {"gpt2-small-res-jb": SimpleNamespace(
        repo_id="jbloom/GPT2-Small-SAEs-Reformatted", model="gpt2-small",
        saes_map={f"blocks.{L}.hook_resid_pre": f"blocks.{L}.hook_resid_pre" for L in range(3)})}
    pack = fetch("gpt2-small-res-jb", out=tmp_path / "a", mirror=str(mirror), layers="1-2",
                 directory=directory)
    assert sorted(pack.entries) == [("resid_pre", 1), ("resid_pre", 2)]
    assert pack.model_name == "gpt2-small"
    one = fetch("gpt2-small-res-jb", out=tmp_path / "b", mirror=str(mirror),
                ids=["blocks.0.hook_resid_pre"], directory=directory)
    assert list(one.entries) == [("resid_pre", 0)]
    with pytest.raises(HubError, match="no SAE id"):
        fetch("gpt2-small-res-jb", out=tmp_path / "c", mirror=str(mirror), ids=["nope"],
              directory=directory)

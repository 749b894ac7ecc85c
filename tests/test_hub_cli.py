"""Hub fetching against a local directory laid out like the hub, and the CLI end to end."""
import json
import subprocess
import sys

import pytest
from fixtures import random_weights, write_gemmascope, write_gemmascope2, write_saelens

from saeflow.cli.main import main
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


def test_cli_info_and_pack_commands(tiny_model_dirs, tmp_path, capsys):
    assert main(["info", "--model", str(tiny_model_dirs["gemma3"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_layers"] == 3 and info["family"] == "gemma3"
    assert info["layers"][2]["hook_points"]["mlp_out"]["hf_name"] == \
        "model.layers.2.post_feedforward_layernorm.output"
    src = tmp_path / "src"
    for L in (0, 2):
        write_saelens(src / f"l{L}", random_weights(d_in=32), "relu", hook=f"blocks.{L}.hook_resid_post")
    assert main(["pack", "inspect", str(src), "--model", str(tiny_model_dirs["llama"])]) == 0
    out = capsys.readouterr().out
    assert "incomplete: 1 slot(s) missing" in out and "resid_post: layers 1" in out
    assert main(["pack", "convert", str(src), str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert main(["pack", "inspect", str(tmp_path / "out"), "--json", "--verify"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["source_format"] == "saeflow" and d["n_saes"] == 2 and d["verify_problems"] == []


def test_cli_errors_are_clear(tmp_path, tiny_model_dirs, capsys):
    write_saelens(tmp_path / "s", random_weights(d_in=16), "relu", hook="blocks.0.hook_resid_post")
    assert main(["pack", "inspect", str(tmp_path / "s"), "--model", str(tiny_model_dirs["llama"])]) == 2
    assert "does not match model d_model 32" in capsys.readouterr().err
    assert main(["pack", "inspect", str(tmp_path / "nowhere")]) == 2
    assert "no SAE pack at" in capsys.readouterr().err


def test_console_script_runs(tiny_model_dirs):
    r = subprocess.run([sys.executable, "-m", "saeflow.cli.main", "info", "--model",
                        str(tiny_model_dirs["gpt2"])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "transformer.h.2.mlp.output" in r.stdout and "blocks.2.hook_mlp_out" in r.stdout


def test_cli_train_and_eval(tiny_model_dirs, tmp_path, capsys):
    model = str(tiny_model_dirs["qwen3"])
    out = tmp_path / "pack"
    args = ["train", "--model", model, "--positions", "resid_post,attn_out", "--layers", "0-1",
            "--width", "48", "--k", "4", "--tokens", "2k", "--batch-size", "128",
            "--chunk-tokens", "1024", "--corpus", "wiki", "--out", str(out)]
    assert main(args) == 0
    assert "wrote 4 SAEs" in capsys.readouterr().out
    assert main(["pack", "eval", str(out), "--model", model, "--tokens", "512", "--ce-tokens",
                 "128", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["saes"]) == 4 and all(r["fvu"] < 1.5 for r in res["saes"])
    assert main(args[:-2] + ["--k", "48", "--out", str(tmp_path / "bad")]) == 2
    assert "k must be" in capsys.readouterr().err
    assert main(["pack", "eval", str(out)]) == 2
    assert "needs --model" in capsys.readouterr().err

"""The CLI end to end: info, pack inspect/convert/eval, train, clear errors, the console script."""
import json
import subprocess
import sys

from fixtures import random_weights, write_saelens

from saeflow.cli.main import main


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

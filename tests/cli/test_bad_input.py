"""Bad input at the command line (issue 30): every case ends with exactly one line on stderr,
exit status 2, no traceback, nothing on stdout and nothing written in the output folder. The
CLI runs in-process (main(argv)); each case fails before a model loads."""
import errno
import json
import shutil

import pytest

from saeflow.cli.main import main

PLANS = {
    "tokens5": {"format": "saeflow-steering-plan", "mode": "add", "tokens": 5,
                "interventions": [{"layer": 1, "position": "resid_post", "feature": 3,
                                   "strength": 2.0}]},
    "tokens_a": {"format": "saeflow-steering-plan", "mode": "add", "tokens": ["a"],
                 "interventions": [{"layer": 1, "position": "resid_post", "feature": 3,
                                    "strength": 2.0}]},
    "layer_1e400": '{"format": "saeflow-steering-plan", "mode": "add", "interventions": '
                   '[{"layer": 1e400, "position": "resid_post", "feature": 3, "strength": 2}]}',
    "tokens_null": {"format": "saeflow-steering-plan", "mode": "add", "tokens": [None],
                    "interventions": [{"layer": 1, "position": "resid_post", "feature": 3,
                                       "strength": 2.0}]},
    "no_list": {"format": "saeflow-steering-plan", "mode": "add", "interventions": 7},
    "strength_nan": '{"format": "saeflow-steering-plan", "mode": "add", "interventions": '
                    '[{"layer": 1, "position": "resid_post", "feature": 3, "strength": NaN}]}',
    "not_a_plan": {"hello": 1},
    "not_json": "{not json",
}

TRAIN = ["train", "--out", "{out}"]
INDEX = ["index", "embedded", "--out", "{out}"]
STATS = ["stats", "embedded", "--out", "{out}"]
RUN = ["run", "--out", "{out}"]
STEER = ["steer", "--feature", "1/resid_post/3", "--json", "{out}/steer.json"]
FLOW = ["flow", "embedded", "--out", "{out}"]

CASES = {
    # corpus specs
    "train corpus wiki=abc": TRAIN + ["--corpus", "wiki=abc"],
    "train corpus wiki=nan,python=1": TRAIN + ["--corpus", "wiki=nan,python=1"],
    "train corpus negative share": TRAIN + ["--corpus", "wiki=-1"],
    "train corpus zero share": TRAIN + ["--corpus", "wiki=0,python=1"],
    "train corpus inf share": TRAIN + ["--corpus", "wiki=inf"],
    "train corpus empty": TRAIN + ["--corpus", ""],
    "train corpus commas only": TRAIN + ["--corpus", ",,"],
    "train corpus no source name": TRAIN + ["--corpus", "=0.5"],
    "train corpus unknown source": TRAIN + ["--corpus", "no-such-source"],
    "train corpus missing file": TRAIN + ["--corpus", "{inputs}/missing.txt=1"],
    # training settings
    "train layers 5-3": TRAIN + ["--layers", "5-3"],
    "train layers -1": TRAIN + ["--layers=-1"],
    "train layers letters": TRAIN + ["--layers", "a-b"],
    "train lr nan": TRAIN + ["--lr", "nan"],
    "train lr 0": TRAIN + ["--lr", "0"],
    "train lr negative": TRAIN + ["--lr=-1e-3"],
    "train lr inf": TRAIN + ["--lr", "inf"],
    "train lr text": TRAIN + ["--lr", "fast"],
    "train width 0": TRAIN + ["--width", "0"],
    "train k 0": TRAIN + ["--k", "0"],
    "train k >= width": TRAIN + ["--k", "64", "--width", "32"],
    "train tokens 0": TRAIN + ["--tokens", "0"],
    "train tokens text": TRAIN + ["--tokens", "lots"],
    "train tokens 1e400": TRAIN + ["--tokens", "1e400"],
    "train batch-size 0": TRAIN + ["--batch-size", "0"],
    "train ctx-len 0": TRAIN + ["--ctx-len", "0"],
    "train ctx-len 1": TRAIN + ["--ctx-len", "1"],
    "train warmup-frac 1.5": TRAIN + ["--warmup-frac", "1.5"],
    "train decay-frac negative": TRAIN + ["--decay-frac=-0.1"],
    "train warmup+decay > 1": TRAIN + ["--warmup-frac", "0.6", "--decay-frac", "0.6"],
    "train unknown position": TRAIN + ["--positions", "bogus"],
    "train no positions": TRAIN + ["--positions", ","],
    "train architecture choice": TRAIN + ["--architecture", "relu"],
    "train encoder dtype": TRAIN + ["--encoder-dtype", "int8"],
    "train model dtype": TRAIN + ["--model-dtype", "float64"],
    "train aux-coef nan": TRAIN + ["--aux-coef", "nan"],
    "train dim-cap negative": TRAIN + ["--dim-cap=-1"],
    "train seed negative": TRAIN + ["--seed=-1"],
    "train model_batch 0": TRAIN + ["--model-batch", "0"],
    "train chunk < batch": TRAIN + ["--chunk-tokens", "100", "--batch-size", "128"],
    "train abbreviation --mod": TRAIN + ["--mod", "embedded"],
    "train missing --out": ["train"],
    "train workers negative": TRAIN + ["--workers=-1"],
    "train ray address without workers": TRAIN + ["--ray-address", "127.0.0.1:1"],
    # corpus passes
    "index batch-size 0": INDEX + ["--batch-size", "0"],
    "index ctx-len 0": INDEX + ["--ctx-len", "0"],
    "index tokens 0": INDEX + ["--tokens", "0"],
    "index corpus wiki=abc": INDEX + ["--corpus", "wiki=abc"],
    "index encoder dtype": INDEX + ["--encoder-dtype", "float8"],
    "index seed negative": INDEX + ["--seed=-3"],
    "index retries 0": INDEX + ["--retries", "0"],
    "index shard-tokens 0": INDEX + ["--shard-tokens", "0"],
    "stats tokens 0": STATS + ["--tokens", "0"],
    "stats corpus wiki=nan,python=1": STATS + ["--corpus", "wiki=nan,python=1"],
    "stats pairs choice": STATS + ["--pairs", "bogus"],
    "stats pass-threshold nan": STATS + ["--pass-threshold", "nan"],
    "stats batch-size 0": STATS + ["--batch-size", "0"],
    # run and serve
    "serve port 99999": ["serve", "{out}", "--port", "99999"],
    "serve port 0": ["serve", "{out}", "--port", "0"],
    "serve port text": ["serve", "{out}", "--port", "http"],
    "run port 70000": RUN + ["--port", "70000"],
    "run corpus wiki=nan,python=1": RUN + ["--corpus", "wiki=nan,python=1"],
    "run corpus wiki=abc": RUN + ["--corpus", "wiki=abc"],
    "run index-tokens 0": RUN + ["--index-tokens", "0"],
    "run stats-tokens negative": RUN + ["--stats-tokens=-5"],
    "run profile choice": RUN + ["--profile", "bogus"],
    "run workers negative": RUN + ["--workers=-2"],
    # steering
    "steer plan tokens 5": ["steer", "--plan", "{inputs}/tokens5.json"],
    "steer plan tokens [a]": ["steer", "--plan", "{inputs}/tokens_a.json"],
    "steer plan tokens [null]": ["steer", "--plan", "{inputs}/tokens_null.json"],
    "steer plan layer 1e400": ["steer", "--plan", "{inputs}/layer_1e400.json"],
    "steer plan interventions 7": ["steer", "--plan", "{inputs}/no_list.json"],
    "steer plan strength NaN": ["steer", "--plan", "{inputs}/strength_nan.json"],
    "steer plan not a plan": ["steer", "--plan", "{inputs}/not_a_plan.json"],
    "steer plan not JSON": ["steer", "--plan", "{inputs}/not_json.json"],
    "steer plan missing": ["steer", "--plan", "{inputs}/missing.json"],
    "steer prompt empty": STEER + ["--prompt", ""],
    "steer prompt blank": STEER + ["--prompt", "   "],
    "steer neither plan nor feature": ["steer"],
    "steer both plan and feature": STEER + ["--plan", "{inputs}/tokens5.json"],
    "steer n 0": STEER + ["--n", "0"],
    "steer temperature nan": STEER + ["--temperature", "nan"],
    "steer top-p 2": STEER + ["--top-p", "2"],
    "steer strength inf": STEER + ["--strength", "inf"],
    "steer max-new-tokens 0": STEER + ["--max-new-tokens", "0"],
    # flow and the rest
    "flow k 0": FLOW + ["--k", "0"],
    "flow null-quantile nan": FLOW + ["--null-quantile", "nan"],
    "flow null-quantile 2": FLOW + ["--null-quantile", "2"],
    "flow method choice": FLOW + ["--method", "bogus"],
    "flow layers 3-1": FLOW + ["--layers", "3-1"],
    "flow missing pack": ["flow", "{inputs}/no-pack", "--out", "{out}"],
    "trace missing run": ["trace", "{inputs}/no-run", "1/resid_post/0"],
    "feature missing run": ["feature", "{inputs}/no-run", "1/resid_post/0"],
    "search missing run": ["search", "{inputs}/no-run", "cat"],
    "pack inspect missing": ["pack", "inspect", "{inputs}/no-pack"],
    "info dtype float64": ["info", "--dtype", "float64"],
    "info device tpu": ["info", "--device", "tpu"],
    "unknown command": ["frobnicate"],
    "no command": [],
}


@pytest.fixture
def inputs(tmp_path):
    root = tmp_path / "inputs"
    root.mkdir()
    for name, plan in PLANS.items():
        (root / f"{name}.json").write_text(plan if isinstance(plan, str) else json.dumps(plan))
    return root


def _heavy(*a, **kw):
    raise AssertionError("a bad input reached a model load or a training")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line(name, inputs, tmp_path, capsys, monkeypatch):
    import saeflow.lm.model as lm_model
    import saeflow.saes.recipes as recipes

    for module, fn in ((lm_model, "_load_hf"), (lm_model, "_embedded_gguf"),
                       (lm_model, "gguf_cache"), (recipes, "train_family")):
        monkeypatch.setattr(module, fn, _heavy)  # each case must fail before these
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    argv = [a.format(out=out, inputs=inputs) for a in CASES[name]]
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, (name, captured.err)
    assert len(lines) == 1 and lines[0].strip(), (name, captured.err)
    assert "error" in lines[0] and "Traceback" not in captured.err
    assert captured.out == ""
    assert not out.exists(), f"{name} wrote {sorted(out.rglob('*'))}"
    assert not any(cwd.iterdir())


def test_the_table_has_sixty_cases():
    assert len(CASES) >= 60


def test_no_prefix_matching(capsys):
    """--model is an option of train; --mod must not be taken for it, nor for --model-name."""
    assert main(["pack", "convert", "a", "b", "--model", "x"]) == 2
    assert "unrecognized arguments: --model x" in capsys.readouterr().err


def test_help_still_exits_zero(capsys):
    assert main(["train", "--help"]) == 0
    assert "--corpus" in capsys.readouterr().out


# --- a full disk ----------------------------------------------------------------------------
def _enospc(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def _one_line_enospc(capsys) -> str:
    """The error is one line, the last (progress bars may come before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert "no space left" in lines[0] and "Traceback" not in err
    return lines[0]


def test_full_disk_under_train(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
    out = tmp_path / "pack"
    argv = ["train", "--model", str(tiny_model_dirs["gemma3"]), "--positions", "resid_post",
            "--layers", "0", "--width", "32", "--k", "4", "--tokens", "1024", "--batch-size",
            "128", "--chunk-tokens", "1024", "--ctx-len", "32", "--corpus", "python",
            "--model-dtype", "float32", "--encoder-dtype", "float32", "--out", str(out)]
    assert main(argv) == 2
    _one_line_enospc(capsys)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .tmp copies


def test_full_disk_under_index(tiny_run, tiny_model_dirs, tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq

    _, pack, _ = tiny_run
    monkeypatch.setattr(pq, "write_table", _enospc)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", _enospc)
    out = tmp_path / "run"
    argv = ["index", str(pack.root), "--model", str(tiny_model_dirs["gemma3"]), "--out",
            str(out), "--tokens", "200", "--batch-size", "2", "--ctx-len", "32", "--corpus",
            "python", "--encoder-dtype", "float32"]
    assert main(argv) == 2
    _one_line_enospc(capsys)
    index = out / "index"
    assert not (index / "index.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_full_disk_under_the_model_cache(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    """De-quantising a GGUF into the model cache on a full disk: one line, no partial copy."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import saeflow.lm.model as lm_model
    from saeflow.store import cache_dir

    folder = tiny_model_dirs["gemma3"]
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: real_model(folder))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **kw: real_tok(folder))
    monkeypatch.setattr(lm_model, "gguf_adds_bos", lambda path: False)
    monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF not really")
    assert main(["info", "--model", str(gguf)]) == 2
    _one_line_enospc(capsys)
    assert not any(cache_dir("models").iterdir())


def test_truncated_index_under_feature_and_search(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    table = run / "index" / "features.parquet"
    table.write_bytes(table.read_bytes()[:4])
    for argv in (["feature", str(run), "0/resid_post/0"], ["search", str(run), "the"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err

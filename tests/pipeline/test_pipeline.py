"""`saeflow run` on a tiny model and random pack: every stage, the report, reuse and reruns."""
import json

import pytest

from saeflow.cli.main import main
from saeflow.errors import PipelineError
from saeflow.pipeline.config import PipelineConfig
from saeflow.pipeline.stages import run_pipeline
from saeflow.saes.packs import save_pack
from saeflow.saes.sae import random_sae


@pytest.fixture(scope="module")
def tiny_pack(tiny_model_dirs, tiny_models, tmp_path_factory):
    model = tiny_models["gemma3"]
    d = model.d_model
    saes = [(p, L, random_sae(d, 32, "relu", seed=200 + 3 * L + i))
            for L in range(model.n_layers)
            for i, p in enumerate(("resid_post", "mlp_out", "attn_out"))]
    return save_pack(saes, tmp_path_factory.mktemp("pp") / "pack", model_name="tiny",
                     d_model=d, n_layers=model.n_layers)


def _cfg(tiny_model_dirs, pack, **kw):
    base = dict(model=str(tiny_model_dirs["gemma3"]), pack=str(pack.root), eval_tokens=256,
                ce_tokens=64, index_tokens=800, stats_tokens=800, validate_texts=2,
                validate_r_graphs=1)
    return PipelineConfig.from_flat(**{**base, **kw})


def test_pipeline_runs_every_stage_then_reuses(tiny_model_dirs, tiny_pack, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dirs, tiny_pack)
    state = run_pipeline(run, cfg, skip=["sweep"], command="saeflow run (test)")
    stages = state["stages"]
    assert [s for s in stages] == ["pack", "flow", "eval", "index", "stats", "validate",
                                   "report"]
    assert all(r["status"] == "done" and r["seconds"] >= 0 for r in stages.values())
    # eval's pass fed the index and the statistics; their stages found them written (and the
    # statistics, whose identity holds the flow's key, were not computed a second time)
    assert stages["eval"]["result"]["fused_with"] == ["index", "stats"]
    written = json.loads((run / "stats" / "stats.json").read_text())["written_at"][:19]
    assert written <= stages["eval"]["finished_at"]
    for path in ("eval.json", "flow.json", "index/index.json", "stats/stats.json",
                 "validate/summary.json", "report.html", "report.md"):
        assert (run / path).is_file(), path
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html  # figures are inlined: the file stands alone
    # the default splices only resid_post for ΔCE; the scorecard measures this run against
    # the v0.1 pack's figures and the paper
    ev = json.loads((run / "eval.json").read_text())
    assert ev["ce_positions"] == ["resid_post"]
    assert all((r["delta_ce"] is None) == (r["position"] != "resid_post") for r in ev["saes"])
    from saeflow.pipeline.scorecard import measure_run, scorecard
    got = measure_run(run)
    res = [r for r in ev["saes"] if r["position"] == "resid_post"]
    assert got["dead_max/attn_out"] == max(r["dead_fraction"] for r in ev["saes"]
                                           if r["position"] == "attn_out")
    assert got["delta_ce_median/resid_post"] == pytest.approx(
        sorted(r["delta_ce"] for r in res)[len(res) // 2] if len(res) % 2 else
        sum(sorted(r["delta_ce"] for r in res)[len(res) // 2 - 1:len(res) // 2 + 1]) / 2)
    card = scorecard(run)
    assert card["v0.1 pack"].notna().sum() >= 6 and card["this run"].notna().sum() >= 6
    assert "against its targets" in html
    for section in ("SAE pack quality", "Feature classes per layer", "Example flow graphs",
                    "Pass-through", "deactivating predecessors", "How this was made"):
        assert section in html, section
    assert "No steering sweep in this run" in html
    md = (run / "report.md").read_text()
    assert "| method |" in md and "saeflow run (test)" in md
    assert f"dead = never active on {ev['dead_tokens']} held-out tokens" in md  # not the FVU count
    out = capsys.readouterr().out
    assert "[1/7] pack" in out and "all stages left: about" in out

    # a second run does nothing; a changed setting reruns only its stage
    again = run_pipeline(run, cfg, skip=["sweep"])
    assert again["stages"]["flow"]["finished_at"] == stages["flow"]["finished_at"]
    assert "reused: pack, flow, eval, index, stats, validate, report" in capsys.readouterr().out
    more = run_pipeline(run, _cfg(tiny_model_dirs, tiny_pack, index_tokens=1200),
                        skip=["sweep"])
    assert more["stages"]["index"]["finished_at"] != stages["index"]["finished_at"]
    assert more["stages"]["stats"]["finished_at"] == stages["stats"]["finished_at"]
    assert json.loads((run / "index" / "index.json").read_text())["tokens"] >= 1100


def test_pipeline_bad_stage_names_and_cli(tiny_model_dirs, tiny_pack, tmp_path, capsys):
    with pytest.raises(PipelineError, match="unknown stage 'flwo'"):
        run_pipeline(tmp_path / "r", _cfg(tiny_model_dirs, tiny_pack), only=["flwo"])
    assert main(["run", "--out", str(tmp_path / "r"), "--model", "some/model"]) == 2
    assert "give --pack" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "r"), "--model",
                 str(tiny_model_dirs["gemma3"]), "--pack", str(tiny_pack.root),
                 "--only", "pack,flow,report"]) == 0
    state = json.loads((tmp_path / "r" / "pipeline.json").read_text())
    assert list(state["stages"]) == ["pack", "flow", "report"]
    assert state["commands"][-1].startswith("saeflow run --out")
    assert "torch" in state["versions"]

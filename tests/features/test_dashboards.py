"""Feature dashboards from the tiny run's index: SAEDashboard's Neuronpedia batch format
(checked against saeflow's vendored schema of it, and SAEDashboard's own classes when that
package is installed), saeflow's own shape, the API, and the feature page's link."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCHEMA = Path(__file__).parent / "schemas" / "neuronpedia_batch.schema.json"


def test_export_matches_the_index(tiny_run, tmp_path):
    from saeflow.features.dashboards import dashboard, export_dashboards
    from saeflow.features.tables import open_index

    run, pack, model = tiny_run
    paths = export_dashboards(run, out=tmp_path / "d", slots=["1/resid_post", "2/mlp_out"],
                              format="saeflow")
    assert [p.name for p in paths] == ["1-resid_post.json", "2-mlp_out.json"]
    feats = json.loads(paths[0].read_text())
    assert len(feats) == pack.info("resid_post", 1).d_sae
    ix = open_index(run)
    live = max(range(len(feats)), key=lambda i: feats[i]["frac_nonzero"])
    row = ix.feature(1, "resid_post", live)
    d = feats[live]
    assert d == dashboard(run, 1, "resid_post", live)
    assert (d["layer"], d["index"], d["saeflowId"]) == ("1-saeflow-resid_post", live,
                                                        f"1/resid_post/{live}")
    assert d["frac_nonzero"] == pytest.approx(row["density"]) and d["frac_nonzero"] > 0
    assert d["maxActApprox"] == pytest.approx(row["max_act"])
    assert d["pos_str"] == [t["token"] for t in row["logit_top"] or []]
    assert 0 < sum(d["freq_hist_data_bar_heights"]) <= row["count"]
    assert len(d["freq_hist_data_bar_values"]) == len(d["freq_hist_data_bar_heights"])
    assert d["freq_hist_data_bar_heights"][0] > 0 < d["freq_hist_data_bar_heights"][-1]
    top = [a for a in d["activations"] if a["kind"] == "top"]
    assert len(top) == len(row["examples"]) and top
    for a in d["activations"]:  # maxValue: the window's maximum, at its token
        assert len(a["tokens"]) == len(a["values"])
        assert a["maxValue"] == max(a["values"]) == a["values"][a["maxValueTokenIndex"]]
        assert a["minValue"] == min(a["values"])
    with pytest.raises(ValueError, match="no SAE at 9/resid_post"):
        export_dashboards(run, out=tmp_path / "e", slots=["9/resid_post"])
    r = subprocess.run([sys.executable, "-m", "saeflow.cli.main", "dashboards", str(run), "--out",
                        str(tmp_path / "cli"), "--slots", "0/attn_out", "--format", "saeflow"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "cli" / "0-attn_out.json").read_text())


def test_neuronpedia_batch_format(tiny_run, tmp_path):
    import jsonschema

    from saeflow.features.dashboards import export_dashboards
    from saeflow.features.tables import open_index

    run, pack, model = tiny_run
    [path] = export_dashboards(run, out=tmp_path / "np", slots=["1/resid_post"], pack=pack,
                               model=model)
    assert path.relative_to(tmp_path / "np").as_posix() == "1-resid_post/batch-0.json"
    batch = json.loads(path.read_text())
    jsonschema.validate(batch, json.loads(SCHEMA.read_text()))
    assert (batch["layer"], batch["sae_set"], batch["sae_id_suffix"]) == (1, "saeflow-resid_post",
                                                                          None)
    assert batch["model_id"] == Path(model.name).name
    feats = batch["features"]
    assert [f["feature_index"] for f in feats] == list(range(pack.info("resid_post", 1).d_sae))
    ix = open_index(run)
    if hasattr(ix, "attach_lens"):  # an index whose logit lens is computed on demand
        ix.attach_lens(pack, model)
    f = max(feats, key=lambda f: f["frac_nonzero"])
    row = ix.feature(1, "resid_post", f["feature_index"])
    assert f["pos_str"] == [t["token"] for t in row["logit_top"]]
    assert f["n_tokens_in_prompt"] > 0 and f["n_prompts_total"] > 0 and f["dataset"]
    # Histograms: occupied bins only; the logit histogram counts the whole vocabulary.
    assert f["freq_hist_data_bar_heights"][0] > 0 < f["freq_hist_data_bar_heights"][-1]
    assert sum(f["logits_hist_data_bar_heights"]) == model.hf.get_output_embeddings().weight.shape[0]
    w = pack.sae("resid_post", 1).W_dec[f["feature_index"]]
    assert f["neuron_alignment_indices"][0] == int(w.abs().argmax())
    top = [a for a in f["activations"] if a["bin_min"] == -1]
    samples = [a for a in f["activations"] if a["bin_min"] != -1]
    assert len(top) == len(row["examples"]) and samples
    for a in top:
        assert a["bin_max"] == pytest.approx(row["max_act"]) and a["bin_contains"] == -1
    for a in samples:  # activation bounds, and the share of activations inside them
        assert 0 <= a["bin_min"] < a["bin_max"] <= row["max_act"] * 1.0001
        assert 0 <= a["bin_contains"] <= 1
        assert a["bin_min"] - 1e-2 <= a["values"][a["qualifying_token_index"]] <= a["bin_max"] + 1e-2
    r = subprocess.run([sys.executable, "-m", "saeflow.cli.main", "dashboards", str(run), "--out",
                        str(tmp_path / "cli"), "--slots", "0/attn_out", "--model-id", "tiny"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cli = json.loads((tmp_path / "cli" / "0-attn_out" / "batch-0.json").read_text())
    jsonschema.validate(cli, json.loads(SCHEMA.read_text()))
    assert cli["model_id"] == "tiny"
    try:  # SAEDashboard's own classes, where the package is installed beside saeflow
        from sae_dashboard.neuronpedia.neuronpedia_dashboard import NeuronpediaDashboardBatch
    except ImportError:
        return
    assert len(NeuronpediaDashboardBatch(**batch).features) == len(feats)


def test_dashboard_api(tiny_run):
    from fastapi.testclient import TestClient

    from saeflow.app.server import create_app

    run, pack, model = tiny_run
    c = TestClient(create_app(run, loaded_model=model, loaded_pack=pack))
    r = c.get("/api/dashboard/1/resid_post/3")
    assert r.status_code == 200
    body = r.json()
    assert body["saeflowId"] == "1/resid_post/3" and "activations" in body
    assert c.get("/api/dashboard/1/resid_post/99999").status_code == 404
    assert 'href="/api/dashboard/${esc(p.id)}"' in c.get("/static/app.js").text  # page link

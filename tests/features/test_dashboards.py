"""Feature dashboards in Neuronpedia's JSON shape, from the tiny run's index: file export,
the API, and the feature page's link."""
import json
import subprocess
import sys

import pytest


def test_export_matches_the_index(tiny_run, tmp_path):
    from saeflow.features.dashboards import dashboard, export_dashboards
    from saeflow.features.tables import open_index

    run, pack, model = tiny_run
    paths = export_dashboards(run, out=tmp_path / "d", slots=["1/resid_post", "2/mlp_out"])
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
    assert d["pos_str"] == [t["token"] for t in row["logit_top"]]
    assert 0 < sum(d["freq_hist_data_bar_heights"]) <= row["count"]
    assert len(d["freq_hist_data_bar_values"]) == len(d["freq_hist_data_bar_heights"])
    top = [a for a in d["activations"] if a["kind"] == "top"]
    assert len(top) == len(row["examples"]) and top
    a = top[0]
    assert len(a["tokens"]) == len(a["values"])
    # window activations are stored in half precision; the peak is exact
    assert a["values"][a["maxValueTokenIndex"]] == pytest.approx(a["maxValue"], rel=1e-2)
    with pytest.raises(ValueError, match="no SAE at 9/resid_post"):
        export_dashboards(run, out=tmp_path / "e", slots=["9/resid_post"])
    r = subprocess.run([sys.executable, "-m", "saeflow.cli.main", "dashboards", str(run), "--out",
                        str(tmp_path / "cli"), "--slots", "0/attn_out"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "cli" / "0-attn_out.json").read_text())


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

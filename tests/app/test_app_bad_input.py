"""Bad input at the API's edge (issue 30): every malformed request answers 4xx with a short,
clear `detail`, never a 5xx; an unreadable table answers 503; a run served from another
working directory finds its pack; a dropped stream stops generating."""
import json
import shutil
import threading
import time

import httpx
import pytest

from saeflow.steering.plans import PLAN_FORMAT

IV = {"layer": 1, "position": "resid_post", "feature": 3, "strength": 2.0}
PLAN = {"format": PLAN_FORMAT, "mode": "add", "interventions": [IV]}
STEER = {"prompt": "hello", "n": 1, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def client(tiny_run):
    from fastapi.testclient import TestClient

    from saeflow.app.server import create_app

    run, pack, model = tiny_run
    app = create_app(run, loaded_model=model, loaded_pack=pack)
    with TestClient(app, raise_server_exceptions=False) as c:  # a bug answers 500 here
        yield c


def _plan(**change) -> dict:
    return {**STEER, "plan": {**PLAN, **change}}


# (what, body as JSON text, the word the answer's detail must hold)
BAD_STEERS = [
    ("tokens a number", json.dumps(_plan(tokens=5)), "tokens"),
    ("tokens [null]", json.dumps(_plan(tokens=[None])), "tokens"),
    ("tokens ['a']", json.dumps(_plan(tokens=["a"])), "tokens"),
    ("tokens negative", json.dumps(_plan(tokens=[-1])), "tokens"),
    ("tokens huge", json.dumps(_plan(tokens=[10**30])), "tokens"),
    ("layer 1e400", json.dumps(_plan()).replace('"layer": 1', '"layer": 1e400'), "finite"),
    ("layer 3.5", json.dumps(_plan(interventions=[{**IV, "layer": 3.5}])), "layer"),
    ("layer beyond the pack", json.dumps(_plan(interventions=[{**IV, "layer": 40}])), "layer 40"),
    ("strength NaN", json.dumps(_plan()).replace('"strength": 2.0', '"strength": NaN'), "finite"),
    ("strength 1e400", json.dumps(_plan()).replace('"strength": 2.0', '"strength": 1e400'),
     "finite"),
    ("strength 1e300", json.dumps(_plan(interventions=[{**IV, "strength": 1e300}])), "strength"),
    ("strength text", json.dumps(_plan(interventions=[{**IV, "strength": "x"}])), "strength"),
    ("strength beyond the sane bound", json.dumps(_plan(interventions=[{**IV, "strength": 500}])),
     "sane bound"),
    ("position unknown", json.dumps(_plan(interventions=[{**IV, "position": "nowhere"}])),
     "unknown position"),
    ("feature negative", json.dumps(_plan(interventions=[{**IV, "feature": -1}])), "feature"),
    ("feature beyond the SAE", json.dumps(_plan(interventions=[{**IV, "feature": 999}])),
     "0..31"),
    ("no interventions", json.dumps(_plan(interventions=[])), "no interventions"),
    ("interventions an object", json.dumps(_plan(interventions={"a": 1})), "interventions"),
    ("intervention missing keys", json.dumps(_plan(interventions=[{"layer": 1}])), "position"),
    ("meta a string, score on", json.dumps({**_plan(meta="x"), "score": True}), "meta"),
    ("meta a list, score on", json.dumps({**_plan(meta=[1, 2]), "score": True}), "meta"),
    ("mode unknown", json.dumps(_plan(mode="multiply")), "mode"),
    ("format missing", json.dumps({**STEER, "plan": {"interventions": [IV]}}), "format"),
    ("plan a string", json.dumps({**STEER, "plan": "x"}), "plan"),
    ("layer of the request 1e400",
     json.dumps({**STEER, "feature": "1/resid_post/3", "mode": "single", "layer": 1})
     .replace('"layer": 1', '"layer": 1e400'), "layer"),
    ("strength of the request Infinity",
     json.dumps({**STEER, "feature": "1/resid_post/3", "strength": 1.0})
     .replace('"strength": 1.0', '"strength": Infinity'), "strength"),
    ("features strength -Infinity",
     json.dumps({**STEER, "features": [{"feature": "1/resid_post/3", "strength": 1.0}]})
     .replace('"strength": 1.0', '"strength": -Infinity'), "strength"),
    ("feature garbage", json.dumps({**STEER, "feature": "a/b/c"}), "a/b/c"),
    ("prompt null", json.dumps({**STEER, "prompt": None, "feature": "1/resid_post/3"}), "prompt"),
    ("prompt empty", json.dumps({**STEER, "prompt": "", "feature": "1/resid_post/3"}), "prompt"),
    ("two of feature, features, plan", json.dumps({**_plan(), "feature": "1/resid_post/3"}),
     "exactly one"),
    ("unknown key", json.dumps({**_plan(), "temperatur": 1}), "temperatur"),
    ("not JSON", "{not json", "JSON"),
    ("a list", "[1, 2]", "object"),
    ("empty", "", "body"),
]


@pytest.mark.parametrize("path", ["/api/steer", "/api/steer/stream"])
def test_bad_steering_requests_answer_4xx_with_a_clear_line(client, path):
    wrong = []
    for what, body, word in BAD_STEERS:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        ok_json = r.headers.get("content-type", "").startswith("application/json")
        detail = json.dumps(r.json()["detail"]) if ok_json else r.text
        if not (400 <= r.status_code < 500 and word.lower() in detail.lower()
                and len(r.content) < 4000):
            wrong.append((what, r.status_code, detail[:200]))
    assert len(BAD_STEERS) >= 35
    assert not wrong, f"{len(wrong)} of {len(BAD_STEERS)} bad requests answered wrongly: {wrong}"


def test_plan_check_takes_the_same_schema(client):
    assert client.post("/api/plan/check", json=PLAN).json()["interventions"] == [IV]
    # "all" is every token, like null; token positions come back sorted and unique
    assert client.post("/api/plan/check", json={**PLAN, "tokens": "all"}).json()["tokens"] is None
    assert client.post("/api/plan/check", json={**PLAN, "tokens": [4, 1, 4]}).json()["tokens"] \
        == [1, 4]
    # old plans: unknown keys are ignored, "version" may be absent
    legacy = {**PLAN, "interventions": [{**IV, "id": "1/resid_post/3"}], "extra": 1}
    assert client.post("/api/plan/check", json=legacy).status_code == 200
    for what, body, word in BAD_STEERS[:22]:
        plan = json.loads(body.replace("1e400", "1e999").replace("NaN", "1e999"))["plan"] \
            if "plan" in body and not body.startswith("[") else None
        if not isinstance(plan, dict):
            continue
        r = client.post("/api/plan/check", content=json.dumps(plan).replace(
            "Infinity", "1e400"), headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])


def test_a_422_does_not_echo_a_large_body(client):
    big = "x" * 300_000  # under the body limit, far over the prompt's 4000 characters
    r = client.post("/api/steer", json={"prompt": big, "feature": "1/resid_post/3"})
    assert r.status_code == 422 and len(r.content) < 2000, len(r.content)
    assert "300000 characters" in r.text
    r = client.post("/api/steer", json={"prompt": "hi", "plan": {**PLAN, "interventions": [
        {**IV, "position": "p" * 1000}] * 2000}})
    assert r.status_code in (413, 422) and len(r.content) < 20_000, len(r.content)
    # over the body limit: refused before it is parsed
    r = client.post("/api/steer", content=b"{" + b" " * (2 << 20) + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    r = client.post("/api/activations", json={"text": "y" * 100_000})
    assert r.status_code == 422 and len(r.content) < 2000


@pytest.fixture()
def run_copy(tiny_run, tmp_path):
    run, _, _ = tiny_run
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _truncate(path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_truncated_tables_answer_503_with_what_to_do(tiny_run, run_copy):
    from fastapi.testclient import TestClient

    from saeflow.app.server import create_app

    run, pack, model = tiny_run
    _truncate(run_copy / "index" / "features.parquet")
    app = create_app(run_copy, loaded_model=model, loaded_pack=pack)
    with TestClient(app, raise_server_exceptions=False) as c:
        for path, params in (("/api/features/1/resid_post/3", {}), ("/api/search", {"q": "the"}),
                             ("/api/trace", {"feature": "1/resid_post/3"}),
                             ("/api/dashboard/1/resid_post/3", {})):
            r = c.get(path, params=params)
            assert r.status_code in (400, 503), (path, r.status_code, r.text[:300])
            assert "rerun" in r.json()["detail"] or "index" in r.json()["detail"], r.text[:300]
        assert c.get("/api/info").status_code == 200  # what does not read the index still works
    shutil.copy(run / "index" / "features.parquet", run_copy / "index" / "features.parquet")
    _truncate(run_copy / "stats" / "communities.parquet", 4)  # what a kill left (issue 30)
    app = create_app(run_copy, loaded_model=model, loaded_pack=pack)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/api/features/1/resid_post/3")
        assert r.status_code == 503 and "rerun" in r.json()["detail"], r.text[:300]
        assert "communities" in r.json()["detail"], r.text[:300]


def test_a_run_served_from_another_directory_finds_its_relative_pack(tiny_run, tmp_path,
                                                                     monkeypatch):
    """flow.json keeps the pack path as it was typed (relative to where `flow` ran)."""
    from fastapi.testclient import TestClient

    from saeflow.app.server import create_app

    run, pack, model = tiny_run
    proj = tmp_path / "proj"
    shutil.copytree(run, proj / "runs" / "r")
    shutil.copytree(pack.root, proj / "packs" / "p")
    flow_json = proj / "runs" / "r" / "flow.json"
    m = json.loads(flow_json.read_text())
    m["pack"]["root"] = "packs/p"  # as typed in proj/: `saeflow flow packs/p --out runs/r`
    flow_json.write_text(json.dumps(m))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    app = create_app(proj / "runs" / "r", loaded_model=model)  # the pack from flow.json
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/api/steer", json={**STEER, "feature": "1/resid_post/3"})
        assert r.status_code == 200, r.text[:300]
    # a pack that is nowhere: 503 naming the pack and --pack, not a traceback
    m["pack"]["root"] = "packs/gone"
    flow_json.write_text(json.dumps(m))
    app = create_app(proj / "runs" / "r", loaded_model=model)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/api/steer", json={**STEER, "feature": "1/resid_post/3"})
        assert r.status_code == 503 and "--pack" in r.json()["detail"], r.text[:300]


def test_a_dropped_stream_stops_generating(tiny_run):
    """The client reads two events and hangs up: the generation thread stops within a few
    tokens instead of running to max_new_tokens."""
    import socket

    import uvicorn

    from saeflow.app.server import create_app

    run, pack, model = tiny_run
    app = create_app(run, loaded_model=model, loaded_pack=pack)
    live = app.state.live
    steps: list[int] = []
    ended = threading.Event()
    real_steer = live.steer

    def counting_steer(plan, prompt, cfg, on_token=None, force=False):
        def cb(which, step, texts):
            steps.append(step)
            time.sleep(0.01)  # a slow model: the client hangs up long before the end
            on_token(which, step, texts)
        try:
            return real_steer(plan, prompt, cfg, on_token=cb, force=force)
        finally:
            ended.set()
    live.steer = counting_steer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(400):
            if server.started:
                break
            time.sleep(0.05)
        body = {"prompt": "hello", "feature": "1/resid_post/3", "n": 1, "max_new_tokens": 512,
                "temperature": 1.0, "seed": 0}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            with c.stream("POST", "/api/steer/stream", json=body) as r:
                got = 0
                for line in r.iter_lines():
                    got += line.startswith("data: ")
                    if got == 2:
                        break
        assert ended.wait(30), "the generation thread is still running"
        assert len(steps) < 200, f"{len(steps)} tokens generated after the client left"
    finally:
        server.should_exit = True
        t.join(10)


def test_a_part_not_computed_is_absent_and_a_corrupt_one_is_not(tiny_run, run_copy):
    """No statistics: the app serves without them. A corrupt manifest is not taken for a
    missing part: its requests answer 503 with what to rerun, and a corrupt flow (which names
    the pack) stops the server from starting."""
    from fastapi.testclient import TestClient

    from saeflow.app.server import create_app
    from saeflow.errors import UnreadableTableError

    run, pack, model = tiny_run
    shutil.rmtree(run_copy / "stats")
    app = create_app(run_copy, loaded_model=model, loaded_pack=pack)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/api/info").json()["has"] == {"flow": True, "index": True, "stats": False}
        assert c.get("/api/features/1/resid_post/3").json()["coactivation"] == {
            "upstream": [], "downstream": []}
        assert c.get("/api/communities").status_code == 404
    (run_copy / "index" / "index.json").write_text("{not json")
    app = create_app(run_copy, loaded_model=model, loaded_pack=pack)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/api/info")
        assert r.status_code == 503 and "rerun" in r.json()["detail"], r.text[:300]
    (run_copy / "flow.json").write_text("{not json")
    with pytest.raises(UnreadableTableError, match="flow"):
        create_app(run_copy, loaded_model=model)

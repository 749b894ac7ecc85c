"""The web app's JSON API on a small real run (tiny model, random pack): views, errors, limits,
path traversal, concurrent steering over a real uvicorn server, and schemathesis fuzzing."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest


@pytest.fixture(scope="module")
def client(tiny_run):
    from fastapi.testclient import TestClient

    from saeflow.app.server import create_app

    run, pack, model = tiny_run
    app = create_app(run, loaded_model=model, loaded_pack=pack)
    with TestClient(app) as c:
        yield c


def test_info_search_feature_and_trace(client, tiny_run):
    run, pack, model = tiny_run
    info = client.get("/api/info").json()
    assert info["has"] == {"flow": True, "index": True, "stats": True}
    assert info["layers"] == list(range(model.n_layers))
    assert info["first_feature"].split("/")[1] == "resid_post"
    # search by id and by a token that the index labels hold
    hits = client.get("/api/search", params={"q": "1/resid_post/3"}).json()["hits"]
    assert hits[0]["id"] == "1/resid_post/3"
    page = client.get("/api/features/1/resid_post/3").json()
    assert page["index"]["label"] and page["index"]["examples"]
    from saeflow.features.lens import LogitLens  # the lens, computed when the page opens
    want = LogitLens(pack, model).feature(("resid_post", 1), 3)
    assert [t["id"] for t in page["index"]["logit_top"]] == [t["id"] for t in want["logit_top"]]
    assert set(page["predecessors"]) == {"res", "mlp", "attn"}
    assert page["predecessors"]["res"][0]["id"].startswith("0/resid_post/")
    assert page["class"] in ("translated", "processed", "newborn", "unexplained")
    g = client.get("/api/trace", params={"feature": "1/resid_post/3", "t_res": 0,
                                          "t_mod": 0}).json()
    ids = {n["id"] for n in g["nodes"]}
    assert "1/resid_post/3" in ids and len(ids) >= 3
    assert all({"x", "y", "lane"} <= set(n) for n in g["nodes"])
    assert any(link["chain"] for link in g["links"])  # R0 -> R1 at t_res 0 is a chain
    # a higher threshold cuts links; max_nodes prunes and says so
    g_hi = client.get("/api/trace", params={"feature": "1/resid_post/3", "t_res": 1,
                                             "t_mod": 1}).json()
    assert len(g_hi["nodes"]) < len(g["nodes"])
    many = ",".join(f"{L}/resid_post/{f}" for L in range(model.n_layers) for f in range(32))
    big = client.get("/api/trace", params={"feature": many, "t_res": 0, "t_mod": 0, "mod_k": 3,
                                            "max_nodes": 40}).json()
    assert len(big["nodes"]) == 40 and big["pruned"] and big["n_total"] > 40
    pred = client.get("/api/predecessors/1/resid_post/3").json()
    assert pred["predecessors"] == page["predecessors"]


def test_layers_gates_and_communities(client):
    d = client.get("/api/layers").json()
    assert d["classes"] and abs(sum(v for k, v in d["classes"][0].items() if k != "layer") - 1) < 1e-6
    assert d["pass_through"]
    gates = client.get("/api/gates", params={"limit": 3}).json()
    assert gates["total"] >= len(gates["items"])
    for g in gates["items"]:
        assert g["gate"] in ("AND", "OR") and len(g["inputs"]) == 2
    comm = client.get("/api/communities", params={"min_similarity": 0.0}).json()
    assert comm["nodes"] and all(n["community"] is not None for n in comm["nodes"])
    tight = client.get("/api/communities", params={"min_similarity": 0.9}).json()
    assert len(tight["links"]) <= len(comm["links"])


def test_bad_ids_are_404_and_bad_values_4xx(client):
    for path in ("/api/features/1/resid_post/999", "/api/features/9/resid_post/0",
                 "/api/features/1/nowhere/0", "/api/predecessors/1/resid_post/-1"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["detail"], path
    r = client.get("/api/trace", params={"feature": "1/resid_post/99999"})
    assert r.status_code == 404 and "out of range" in r.json()["detail"]
    r = client.get("/api/trace", params={"feature": "garbage"})
    assert r.status_code == 404
    base = {"prompt": "hello", "feature": "1/resid_post/3"}
    for extra, word in (({"max_new_tokens": 100000}, "max_new_tokens"), ({"n": 1000}, "n"),
                        ({"strength": 1e9}, "strength")):
        r = client.post("/api/steer", json={**base, **extra})
        assert r.status_code == 422 and word in json.dumps(r.json()["detail"])
    r = client.post("/api/steer", json={**base, "feature": "1/resid_post/5000"})
    assert r.status_code == 404 and "0..31" in r.json()["detail"]
    too_many = [{"feature": "1/resid_post/1", "strength": 1.0}] * 300
    r = client.post("/api/steer", json={"prompt": "hi", "features": too_many})
    assert r.status_code == 422
    r = client.post("/api/steer", json={"prompt": "hi", "plan": {"format": "nope"}})
    assert r.status_code == 422 and "saeflow-steering-plan" in json.dumps(r.json()["detail"])
    r = client.post("/api/steer", json={"prompt": "hi"})
    assert r.status_code == 400 and "exactly one" in r.json()["detail"]


def test_files_never_leave_the_run(client, tiny_run, tmp_path):
    run, _, _ = tiny_run
    (run.parent / "secret.txt").write_text("outside")
    (run / "link-out").symlink_to(run.parent / "secret.txt")
    assert client.get("/files/flow.json").status_code == 200
    ok = [p.relative_to(run).as_posix() for p in run.rglob("*.json")][0]
    assert client.get(f"/files/{ok}").status_code == 200
    for bad in ("/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/..%2fsecret.txt",
                "/files/link-out", "/files//etc/passwd", "/files/%2fetc%2fpasswd",
                "/static/../../../../etc/passwd", "/static/%2e%2e/server.py"):
        r = client.get(bad)
        assert r.status_code == 404 and "outside" not in r.text and "root:" not in r.text, bad
    # the app's own files and plotly's bundle are served
    assert client.get("/").status_code == 200
    assert client.get("/assets/plotly.min.js").headers["content-type"].startswith(
        "application/javascript")


def test_steer_prompt_activations_and_plans(client):
    req = {"prompt": "hello world", "feature": "1/mlp_out/3", "strength": 60, "n": 2,
           "max_new_tokens": 6, "seed": 3}
    a = client.post("/api/steer", json=req).json()
    b = client.post("/api/steer", json=req).json()
    assert a["default"] == b["default"] and a["steered"] == b["steered"]  # seeded
    assert len(a["default"]) == 2 and a["steered"] != a["default"]
    plan = a["plan"]
    assert client.post("/api/plan/check", json=plan).json()["interventions"] == plan["interventions"]
    c = client.post("/api/steer", json={**{k: v for k, v in req.items() if k != "feature"},
                                        "plan": plan}).json()
    assert c["steered"] == a["steered"]
    # the stream sends tokens for both sides, then the same result
    with client.stream("POST", "/api/steer/stream", json=req) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert {e["which"] for e in events if e["event"] == "token"} == {"default", "steered"}
    assert events[-1]["event"] == "done" and events[-1]["result"]["steered"] == a["steered"]
    act = client.post("/api/activations", json={"text": "hello world again", "top_k": 4}).json()
    assert len(act["slots"]) == 9 and act["token"] == len(act["tokens"]) - 1
    assert act["graph"]["nodes"]


def test_eight_concurrent_steering_requests_equal_their_sequential_runs(live_server):
    reqs = [{"prompt": p, "feature": f, "strength": s, "n": 2, "max_new_tokens": 8, "seed": i,
             "kind": k}
            for i, (p, f, s, k) in enumerate([
                ("hello", "1/resid_post/3", 8, "add"), ("the cat", "2/resid_post/5", -6, "add"),
                ("a b c", "0/mlp_out/7", 12, "add"), ("hello", "1/resid_post/3", 0, "rescale"),
                ("xyz", "2/attn_out/1", 5, "add"), ("the cat", "1/resid_post/9", 3, "rescale"),
                ("one two", "0/resid_post/2", 10, "add"), ("hello", "2/mlp_out/4", -10, "add")])]
    with httpx.Client(base_url=live_server, timeout=120) as c:
        alone = [c.post("/api/steer", json=r).json() for r in reqs]
    with ThreadPoolExecutor(8) as ex, httpx.Client(base_url=live_server, timeout=120) as c:
        together = list(ex.map(lambda r: c.post("/api/steer", json=r).json(), reqs))
    for a, b in zip(alone, together):
        assert a["steered"] == b["steered"] and a["default"] == b["default"]
    assert len({json.dumps(a["steered"]) for a in alone}) > 4  # they do differ from each other


def test_fuzz_the_api_with_its_openapi_schema(live_server):
    """schemathesis (property-based, bounded): every documented operation with schema-valid and
    schema-violating inputs; no 5xx, every status documented, every body of the documented
    content type and schema, and inputs that violate the schema rejected with a 4xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, negative_data_rejection]
    schema = schemathesis.openapi.from_url(f"{live_server}/openapi.json")
    failures = []
    statuses: dict[int, int] = {}
    n_cases = 0
    t0 = time.perf_counter()
    for op, mode in [(o.ok(), m) for o in schema.get_all_operations()
                     for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]:
        if op.path in ("/api/steer", "/api/steer/stream") and mode == GenerationMode.POSITIVE:
            examples = 16  # each valid case generates text: keep these few
        else:
            examples = 50

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(mode))
        def check(case):
            nonlocal n_cases
            body = case.body
            if isinstance(body, dict) and isinstance(body.get("max_new_tokens"), int) and \
                    isinstance(body.get("n", 1), int):  # keep valid generations small
                body["max_new_tokens"] = min(body["max_new_tokens"], 4)
                body["n"] = min(body.get("n", 1), 2)
                body["score"] = False  # the scorers are optional packages
            n_cases += 1
            r = case.call(base_url=live_server, timeout=120)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            try:
                case.validate_response(r, checks=checks)
            except Exception as e:  # schemathesis' failures (an exception group of them)
                failures.append((op.path, mode.name, r.status_code, str(e)[:300],
                                 str(case.body or case.query)[:200]))
        try:
            check()
        except Unsatisfiable:  # negative mode on an operation that takes no input
            assert mode == GenerationMode.NEGATIVE
    print(f"schemathesis: {n_cases} cases over {len(list(schema.get_all_operations()))} "
          f"operations in {time.perf_counter() - t0:.0f} s; statuses "
          f"{dict(sorted(statuses.items()))}")
    assert n_cases > 100
    assert not statuses.get(500) and not any(s >= 500 and s != 503 for s in statuses)
    assert not failures, f"{len(failures)} failures: {failures[:5]}"


def test_saeflow_serve_binds_localhost_and_warns_when_widened(tiny_run, tiny_model_dirs):
    """The real command in a subprocess: prints its URL, answers, warns for a wider host."""
    import socket
    import subprocess
    import sys

    run, pack, _ = tiny_run
    for host, warns in (("127.0.0.1", False), ("0.0.0.0", True)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "saeflow.cli.main", "serve", str(run),
                                 "--port", str(port), "--host", host, "--pack", str(pack.root),
                                 "--model", str(tiny_model_dirs["gemma3"])],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines = []
            while True:
                line = proc.stdout.readline()
                assert line, "serve exited: " + "".join(lines)
                lines.append(line)
                if " at http" in line:
                    break
            assert f"http://127.0.0.1:{port}/" in line
            assert ("WARNING" in "".join(lines)) == warns
            for _ in range(100):
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=5)
                    break
                except httpx.ConnectError:
                    time.sleep(0.1)
            assert r.status_code == 200 and r.json()["has"]["flow"]
        finally:
            proc.terminate()
            proc.wait(10)

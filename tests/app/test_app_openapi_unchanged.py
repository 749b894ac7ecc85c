"""The API is a contract: its paths, parameters, bodies, status codes and schemas stay as they
were when create_app held every route (openapi_snapshot.json, written from that app;
`python tests/app/test_app_openapi_unchanged.py` rewrites it, on purpose only). The version
and the routes outside the schema (files, page) are checked apart."""
from __future__ import annotations

import json
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("openapi_snapshot.json")
HIDDEN_ROUTES = [("GET", "/files/{path:path}", "run_file"),
                 ("GET", "/assets/plotly.min.js", "plotly_js"), ("GET", "/", "index")]


def current(run: Path) -> dict:
    from saeflow.app.server import create_app

    schema = create_app(run).openapi()
    schema["info"].pop("version")  # the package's version, not the contract
    return json.loads(json.dumps(schema))


def test_the_api_schema_is_as_before(tmp_path):
    assert current(tmp_path) == json.loads(SNAPSHOT.read_text())


def test_the_routes_outside_the_schema_are_served(tmp_path):
    from fastapi.testclient import TestClient

    from saeflow.app.server import create_app

    app = create_app(tmp_path)
    with TestClient(app) as c:
        for method, path, name in HIDDEN_ROUTES:
            url = app.url_path_for(name, **({"path": "x.png"} if "{path" in path else {}))
            assert c.request(method, url).status_code in (200, 404), (path, name)
        assert c.get("/static/index.html").status_code == 200
        assert c.get("/").headers["content-type"].startswith("text/html")

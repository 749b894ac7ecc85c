"""`saeflow serve RUN`: the JSON API (FastAPI, documented at /docs and /openapi.json) and the
single-page app that uses it (static files of this package; plotly.js from the plotly wheel).

The routes live in app/routes/, one router per view; create_app opens the run, sets up the
live model and assembles them. Requests are in schemas.py, error answers in http_errors.py.

Files: only the package's static folder, plotly's own bundle, and files inside RUN are served;
paths are resolved and must stay inside RUN (no '..', no symlink out).

Errors: every answer to a bad request is a 4xx with a `detail` that says what to change; a
saeflow error maps to 404 (unknown feature), 400 (a request that cannot run as asked) or 503
(what the server cannot do now: no model, an unreadable table, a missing scorer). A 422 names
each bad field without echoing large inputs back, and bodies over MAX_BODY_BYTES are refused.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from saeflow._version import __version__
from saeflow.app import DEFAULT_HOST, DEFAULT_PORT
from saeflow.app.http_errors import (  # noqa: F401  (re-exported: the old home of these names)
    ERROR_RESPONSES,
    MAX_BODY_BYTES,
    MAX_ECHO_CHARS,
    MAX_ERRORS,
    BodyLimit,
    ErrorDetail,
    add_error_handlers,
    error_status,
    short_errors,
)
from saeflow.app.live import LiveModel
from saeflow.app.routes import evolution, features, files, flow, overview, steering
from saeflow.app.routes.files import STATIC, plotly_bundle  # noqa: F401  (re-exported)
from saeflow.app.routes.steering import (  # noqa: F401  (re-exported)
    STREAM_POLL_S,
    EventStream,
    StreamDropped,
)
from saeflow.app.schemas import (  # noqa: F401  (re-exported)
    MAX_PROMPT_CHARS,
    ActivationsRequest,
    FeatureStrength,
    SteerRequest,
)
from saeflow.app.views import RunData
from saeflow.saes.recipes import EMBEDDED_NAMES

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
EMBEDDED_MODEL_NAME = "gemma-3-270m"  # an index of this model is served with the embedded one


def create_app(run: str | Path, *, pack: str | None = None, model: str | None = None,
               loaded_model=None, loaded_pack=None) -> FastAPI:
    """The app over one RUN. The pack defaults to the one its flow names, and the model to the
    embedded one when its index was built from it; `loaded_*` are already open (tests)."""
    data = RunData(run)
    if pack is None and loaded_pack is None and data.flow is not None:
        pack = flow_pack_spec(data.flow.manifest["pack"]["root"], data.root)
    if model is None and loaded_model is None and data.index is not None:
        if data.index.manifest.get("identity", {}).get("model") == EMBEDDED_MODEL_NAME:
            model = "embedded"
    live = LiveModel(pack, model, loaded_model, loaded_pack, run=data.root)
    app = FastAPI(title="saeflow", version=__version__,
                  description="Feature flow, feature pages and steering over one RUN directory.",
                  responses=ERROR_RESPONSES)
    app.state.data, app.state.live = data, live
    if live.available:
        data.set_model(live.load)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    add_error_handlers(app)
    for view in (overview, features, flow, evolution, steering):
        app.include_router(view.router)
    files.add_files(app)
    return app


def flow_pack_spec(root: str, run: Path) -> str:
    """The pack a run's flow was computed from, as a spec `open_pack` can load from here.

    flow.json keeps the pack path as it was typed, often relative to the directory the flow
    ran in, not to this server's working directory. A relative path is looked up from the
    working directory, then from RUN and each folder above it (runs/x beside packs/y); the
    first that exists wins. A spec that is not a path ('embedded') is kept."""
    p = Path(root)
    if not root or p.is_absolute() or root in EMBEDDED_NAMES:
        return root
    for base in (Path.cwd(), run, *run.parents):
        if (base / p).exists():
            return str((base / p).resolve())
    return root


def serve(run: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          pack: str | None = None, model: str | None = None, open_browser: bool = False) -> None:
    """Start the server (blocks) and print its URL."""
    import uvicorn

    app = create_app(run, pack=pack, model=model)
    if host not in LOCAL_HOSTS:
        print(f"[saeflow] WARNING: serving on {host}, reachable from other machines; the API "
              f"can run the model. Use the default 127.0.0.1 unless you mean it.", flush=True)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print(f"[saeflow] serving {Path(run).resolve()} at {url}  (API docs: {url}docs)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    uvicorn.run(app, host=host, port=port, log_level="warning")

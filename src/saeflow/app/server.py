"""`saeflow serve RUN`: the JSON API (FastAPI, documented at /docs and /openapi.json) and the
single-page app that uses it (static files of this package; plotly.js from the plotly wheel).

Files: only the package's static folder, plotly's own bundle, and files inside RUN are served;
paths are resolved and must stay inside RUN (no '..', no symlink out).

Errors: every answer to a bad request is a 4xx with a `detail` that says what to change; a
saeflow error maps to 404 (unknown feature), 400 (a request that cannot run as asked) or 503
(what the server cannot do now: no model, an unreadable table, a missing scorer). A 422 names
each bad field without echoing large inputs back, and bodies over MAX_BODY_BYTES are refused.
"""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from saeflow._version import __version__
from saeflow.app import DEFAULT_HOST, DEFAULT_PORT
from saeflow.app.live import LiveModel
from saeflow.app.views import MAX_GRAPH_NODES, NotFound, RunData, jsonable
from saeflow.errors import AppError, FlowError, MissingSAEError, SaeflowError
from saeflow.features.dashboards import feature_dashboard
from saeflow.ids import parse_feature
from saeflow.saes.recipes import EMBEDDED_NAMES
from saeflow.steering.generate import MAX_NEW_TOKENS, MAX_SAMPLES, SamplingConfig
from saeflow.steering.plans import (
    MAX_INTERVENTIONS,
    MAX_STRENGTH,
    Intervention,
    PlanSchema,
    SteeringPlan,
    build_plan,
)
from saeflow.steering.scores import compare_completions

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_PROMPT_CHARS = 4000
MAX_BODY_BYTES = 1 << 20  # a 256-intervention plan is ~20 kB; nothing valid comes near 1 MiB
MAX_ECHO_CHARS = 120  # of a bad value quoted back in a 422
MAX_ERRORS = 20  # per 422
STREAM_POLL_S = 1.0  # a stream with no new token checks this often that its client is there


class ErrorDetail(BaseModel):
    detail: str = Field(..., description="what was wrong and what to do")


ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorDetail, "description": "a request that cannot run as asked"},
    404: {"model": ErrorDetail, "description": "an unknown feature, slot or part of the run"},
    413: {"model": ErrorDetail, "description": f"a body over {MAX_BODY_BYTES} bytes"},
    503: {"model": ErrorDetail, "description": "what this server cannot do now: no model, an "
                                               "unreadable table, a missing scorer"},
}


class StreamDropped(Exception):
    """Raised in the generation thread of a stream whose client went away: stops the loop."""


class EventStream(StreamingResponse):
    """Server-sent events; `on_close()` runs however the response ends (done, cancelled, or a
    send that failed because the client went away), so its generation thread can stop."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def plotly_bundle() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise AppError(f"plotly's bundled plotly.min.js is missing at {path}; "
                           f"reinstall plotly")
    return path


# --- requests --------------------------------------------------------------------------------
class FeatureStrength(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not a number here
    feature: str = Field(..., max_length=64, description="LAYER/POSITION/INDEX")
    strength: float = Field(..., ge=-MAX_STRENGTH, le=MAX_STRENGTH)


class SteerRequest(BaseModel):
    """Default and steered completions. Give one of `feature` (with `mode`), `features`
    (several features, each with its strength, like Neuronpedia's steer) or `plan`."""
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not a number here
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    feature: str | None = Field(None, max_length=64)
    features: list[FeatureStrength] | None = Field(None, max_length=MAX_INTERVENTIONS)
    plan: PlanSchema | None = None
    mode: Literal["seed", "single", "cumulative", "span"] = "seed"
    kind: Literal["add", "rescale"] = "add"
    strength: float = Field(4.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH)
    layer: int | None = Field(None, ge=0, le=1000, strict=True)
    schedule: Literal["constant", "linear", "exponential"] = "constant"
    alpha: float = Field(-0.05, ge=-10, le=10)
    t_res: float = Field(0.5, ge=-1, le=1)
    t_mod: float | None = Field(None, ge=-1, le=1)  # None: each layer's threshold from the flow
    n: int = Field(1, ge=1, le=MAX_SAMPLES, strict=True)
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS, strict=True)
    temperature: float = Field(1.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=2**31 - 1, strict=True)
    score: bool = Field(False, strict=True)
    concept: str | None = Field(None, max_length=500)


class ActivationsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not a number here
    text: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    top_k: int = Field(8, ge=1, le=64, strict=True)
    token: int | None = Field(None, ge=0, le=4096, strict=True)  # "3" is not a token index


# --- the app ---------------------------------------------------------------------------------
def create_app(run: str | Path, *, pack: str | None = None, model: str | None = None,
               loaded_model=None, loaded_pack=None) -> FastAPI:
    data = RunData(run)
    if pack is None and loaded_pack is None and data.flow is not None:
        pack = flow_pack_spec(data.flow.manifest["pack"]["root"], data.root)
    if model is None and loaded_model is None and data.index is not None:
        if data.index.manifest.get("identity", {}).get("model") == "gemma-3-270m":
            model = "embedded"
    live = LiveModel(pack, model, loaded_model, loaded_pack, run=data.root)
    app = FastAPI(title="saeflow", version=__version__,
                  description="Feature flow, feature pages and steering over one RUN directory.",
                  responses=ERROR_RESPONSES)
    app.state.data, app.state.live = data, live
    if live.available:
        data.set_model(live.load)

    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return JSONResponse({"detail": str(exc).strip("'\"")}, status_code=404)

    @app.exception_handler(SaeflowError)
    async def _saeflow_error(request: Request, exc: SaeflowError):
        return JSONResponse({"detail": str(exc)}, status_code=error_status(exc))

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: ValueError):
        if isinstance(exc, _table_errors()):  # pyarrow's ArrowInvalid is a ValueError too
            return await _unreadable_table(request, exc)
        # a request that cannot run as asked (a ValueError of a library, say)
        return JSONResponse({"detail": str(exc)}, status_code=error_status(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": short_errors(exc.errors())}, status_code=422)

    for table_error in _table_errors():
        app.add_exception_handler(table_error, _unreadable_table)

    # --- browsing ------------------------------------------------------------------------
    @app.get("/api/info", summary="What this run holds: slots, parts, pack")
    def info() -> dict:
        out = data.info()
        out["steering"] = live.available
        out["limits"] = {"max_new_tokens": MAX_NEW_TOKENS, "n": MAX_SAMPLES,
                         "strength": MAX_STRENGTH, "interventions": MAX_INTERVENTIONS}
        return out

    @app.get("/api/search", summary="Features by label, token or id, best first")
    def search(q: str = Query(..., min_length=1, max_length=200),
               limit: int = Query(20, ge=1, le=200)) -> dict:
        q = q.strip()
        if not q:
            raise HTTPException(400, "give a word, a phrase or a feature id to search for")
        hits = []
        if q.count("/") == 2:
            try:
                L, pos, f = data.check_feature(q)
                fid = f"{L}/{pos}/{f}"
                lab = data.labels([fid]).get(fid, {})
                hits.append({"id": fid, "layer": L, "position": pos, "feature": f,
                             "label": lab.get("label"), "score": 10.0})
            except NotFound:
                pass
        if data.index is not None:
            hits += [{k: jsonable(v) for k, v in h.items()} for h in data.index.search(q, limit)]
        return {"query": q, "hits": hits[:limit]}

    def _feature_spec(layer: int, position: str, index: int) -> str:
        return f"{layer}/{position}/{index}"

    @app.get("/api/features/{layer}/{position}/{index}", summary="One feature's page")
    def feature(layer: int, position: str, index: int) -> dict:
        return data.feature(_feature_spec(layer, position, index))

    @app.get("/api/dashboard/{layer}/{position}/{index}",
             summary="One feature's dashboard in Neuronpedia's JSON shape")
    def dashboard(layer: int, position: str, index: int) -> dict:
        L, pos, f = data.check_feature(_feature_spec(layer, position, index))
        if data.index is None or f"{L}/{pos}" not in data.index.manifest["slots"]:
            raise NotFound(f"this run has no feature index for {L}/{pos}; run `saeflow index`")
        row = data.index_row(L, pos, f)
        return jsonable(feature_dashboard(row, data.index.manifest["hist_edges"],
                                          data.index.manifest.get("model")))

    @app.get("/api/predecessors/{layer}/{position}/{index}",
             summary="Data-free predecessors and successors of a feature")
    def predecessors(layer: int, position: str, index: int) -> dict:
        return data.predecessors(_feature_spec(layer, position, index))

    @app.get("/api/trace", summary="Flow graph of one or more features (comma-separated)")
    def trace(feature: str = Query(..., max_length=2000),
              t_res: float = Query(0.5, ge=-1, le=1), t_mod: float | None = Query(None, ge=-1, le=1,
                                          description="MLP/attention link threshold; omitted: "
                                                      "each layer's own from the flow's null"),
              mod_k: int = Query(1, ge=1, le=32),
              direction: Literal["both", "backward", "forward"] = "both",
              max_nodes: int = Query(2000, ge=1, le=MAX_GRAPH_NODES)) -> dict:
        seeds = [s.strip() for s in feature.split(",") if s.strip()]
        if not seeds or len(seeds) > 256:
            raise HTTPException(400, "give 1 to 256 comma-separated feature ids")
        return data.trace(seeds, t_res, t_mod, mod_k, direction, max_nodes)

    @app.get("/api/layers", summary="Layer overview: classes, pass-through, gates, communities")
    def layers() -> dict:
        return data.layers()

    @app.get("/api/gates", summary="AND/OR gates with labels, paged")
    def gates(kind: Literal["AND", "OR"] | None = None, offset: int = Query(0, ge=0),
              limit: int = Query(50, ge=1, le=500)) -> dict:
        return data.gates(kind, offset, limit)

    @app.get("/api/communities", summary="The largest communities as a layered graph")
    def communities(min_similarity: float = Query(0.3, ge=-1, le=1),
                    max_nodes: int = Query(800, ge=1, le=MAX_GRAPH_NODES),
                    top: int = Query(12, ge=1, le=200)) -> dict:
        return data.community_graph(min_similarity, max_nodes, top)

    # --- the model -----------------------------------------------------------------------
    def _need_model():
        if not live.available:
            raise HTTPException(503, "this server has no model: restart it with --model (and "
                                     "--pack) to steer and to read prompts")
        return live.load()

    @app.post("/api/activations", summary="Features active at each token of a text")
    def activations(req: ActivationsRequest) -> dict:
        _need_model()
        return live.activations(req.text, req.top_k, data.flow_index, data.labels, req.token)

    def _plan(req: SteerRequest) -> SteeringPlan:
        _, pk = _need_model()
        given = [x for x in (req.feature, req.features, req.plan) if x]
        if len(given) != 1:
            raise HTTPException(400, "give exactly one of feature, features or plan")
        if req.plan is not None:
            plan = SteeringPlan.from_schema(req.plan)
        elif req.features:
            ivs = []
            for fs in req.features:
                L, pos, f = _pack_feature(pk, fs.feature)
                ivs.append(Intervention(L, pos, f, fs.strength))
            plan = SteeringPlan(req.kind, ivs, description="features from the request")
        else:
            assert req.feature is not None  # exactly one of the three was given
            _pack_feature(pk, req.feature)
            plan = build_plan(pk, feature=req.feature, strength=req.strength,
                              graph_mode=req.mode, kind=req.kind, layer=req.layer,
                              schedule=req.schedule, alpha=req.alpha, run=data.root
                              if data.flow is not None else None, model=live.load()[0],
                              t_res=req.t_res, t_mod=req.t_mod)
        plan.check(pk)
        return plan

    def _sampling(req: SteerRequest) -> SamplingConfig:
        cfg = SamplingConfig(max_new_tokens=req.max_new_tokens, n=req.n,
                             temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        cfg.check()
        return cfg

    def _scores(req: SteerRequest, res: dict, plan: SteeringPlan) -> dict | None:
        if not req.score:
            return None

        concept = req.concept
        if not concept:  # the seed feature's activating tokens (its label left of the arrow)
            seed = plan.meta.get("seed")  # meta is the client's: any JSON
            ids = [seed] if isinstance(seed, str) and seed else []
            ids += [i.id for i in plan.interventions]
            labs = data.labels(ids)
            concept = next((labs[i]["label"] for i in ids if labs.get(i, {}).get("label")), "")
            concept = concept.split("→")[0].strip(" ,")
        return compare_completions(res["default"], res["steered"], concept or "")

    @app.post("/api/steer", summary="Default and steered completions (in the spirit of "
                                    "Neuronpedia's POST /api/steer)")
    def steer(req: SteerRequest) -> dict:
        cfg = _sampling(req)
        plan = _plan(req)
        res = live.steer(plan, req.prompt, cfg)
        res["scores"] = _scores(req, res, plan)
        return res

    @app.post("/api/steer/stream", summary="The same, streamed as server-sent events",
              response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                               "description": "events: token (which, step, texts), then done "
                                              "(result) or error (status, detail)"}})
    async def steer_stream(req: SteerRequest, request: Request):
        cfg = _sampling(req)
        plan = await asyncio.to_thread(_plan, req)  # errors answer 4xx before streaming
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        dropped = threading.Event()  # the client went away: stop generating

        def push(event: dict | None):
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def on_token(which, step, texts):
            if dropped.is_set():
                raise StreamDropped()
            push({"event": "token", "which": which, "step": step, "texts": texts})

        def work():
            try:
                res = live.steer(plan, req.prompt, cfg, on_token=on_token)
                res["scores"] = _scores(req, res, plan)
                push({"event": "done", "result": res})
            except StreamDropped:
                pass
            except Exception as e:  # reported in the stream: the status line is already sent
                push({"event": "error", "status": error_status(e), "detail": str(e)})
            push(None)

        threading.Thread(target=work, daemon=True).start()

        async def events():
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), STREAM_POLL_S)
                except asyncio.TimeoutError:  # no token for a while: is anyone listening?
                    if await request.is_disconnected():
                        return
                    continue
                if ev is None:
                    return
                yield f"data: {json.dumps(ev)}\n\n"
        return EventStream(events(), on_close=dropped.set)

    @app.post("/api/plan/check", summary="Validate a steering plan against the pack")
    def plan_check(plan: PlanSchema) -> dict:
        _, pk = _need_model()
        p = SteeringPlan.from_schema(plan)
        p.check(pk)
        return p.to_dict()

    # --- files ---------------------------------------------------------------------------
    @app.get("/files/{path:path}", summary="A file of the run (plots, tables)",
             include_in_schema=False)
    def run_file(path: str):
        target = (data.root / path).resolve()
        try:
            target.relative_to(data.root)
        except ValueError:
            raise HTTPException(404, "no such file in this run") from None
        if not target.is_file():
            raise HTTPException(404, "no such file in this run")
        return FileResponse(target)

    @app.get("/assets/plotly.min.js", include_in_schema=False)
    def plotly_js():
        return FileResponse(plotly_bundle(), media_type="application/javascript")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    return app


# --- errors ----------------------------------------------------------------------------------
def error_status(exc: Exception) -> int:
    """The HTTP status of an error raised while answering: 404 for what does not exist, 400 for
    a request that cannot run as asked, 503 for what this server cannot do now."""
    if isinstance(exc, (NotFound, MissingSAEError)):
        return 404
    if isinstance(exc, _table_errors()):
        return 503
    if isinstance(exc, ValueError):  # PlanError, GenerationError, FlowError, ...
        return 400
    return 503  # AppError (no model), HubError / EvalError (a scorer), an unreadable table...


def _table_errors() -> tuple[type[Exception], ...]:
    """Errors of the table readers: a truncated or corrupt parquet file of the run."""
    import duckdb
    import pyarrow

    return (duckdb.Error, pyarrow.ArrowException)


async def _unreadable_table(request: Request, exc: Exception):
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return JSONResponse({"detail": f"a table of this run cannot be read ({first}); rerun the "
                                   f"stage that wrote it (saeflow flow / index / stats)"},
                        status_code=503)


def _echo(value):
    """A bad input as quoted back in a 422: scalars as they are, long text cut, containers
    summarised (the body that failed may be megabytes)."""
    if value is None or isinstance(value, (bool, int)):
        return value if not isinstance(value, int) or abs(value) < 10**15 else str(value)[:40]
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_ECHO_CHARS else \
            f"{value[:MAX_ECHO_CHARS]}... ({len(value)} characters)"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    return type(value).__name__


def short_errors(errors) -> list[dict]:
    """FastAPI's 422 detail (loc, msg, type, input) with each input trimmed by _echo and at most
    MAX_ERRORS entries."""
    out = []
    for e in list(errors)[:MAX_ERRORS]:
        item = {"loc": [x if isinstance(x, (str, int)) else str(x) for x in e.get("loc", ())],
                "msg": str(e.get("msg", ""))[:500], "type": str(e.get("type", ""))}
        if "input" in e:
            item["input"] = _echo(e["input"])
        out.append(item)
    if len(errors) > MAX_ERRORS:
        out.append({"loc": [], "msg": f"... and {len(errors) - MAX_ERRORS} more errors",
                    "type": "too_many_errors"})
    return out


class BodyLimit:
    """Refuse request bodies over max_bytes with 413, by Content-Length or while reading."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            res = JSONResponse({"detail": self._too_big()}, status_code=413)
            return await res(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a chunked body without Content-Length
                raise StarletteHTTPException(413, self._too_big())
            return message
        return await self.app(scope, counted, send)

    def _too_big(self) -> str:
        return f"the request body is over {self.max_bytes} bytes; send less"


# --- the pack of a run ------------------------------------------------------------------------
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


def _pack_feature(pack, spec: str) -> tuple[int, str, int]:
    """A feature id the pack has, or 404."""

    try:
        L, pos, f = parse_feature(spec)
    except FlowError as e:
        raise NotFound(str(e)) from None
    if (pos, L) not in pack:
        raise NotFound(f"unknown feature {spec}: the pack has no SAE at {pos} layer {L}")
    n = pack.info(pos, L).d_sae
    if not 0 <= f < n:
        raise NotFound(f"unknown feature {spec}: that SAE has features 0..{n - 1}")
    return L, pos, f


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

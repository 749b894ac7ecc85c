"""`saeflow serve RUN`: the JSON API (FastAPI, documented at /docs and /openapi.json) and the
single-page app that uses it (static files of this package; plotly.js from the plotly wheel).

Files: only the package's static folder, plotly's own bundle, and files inside RUN are served;
paths are resolved and must stay inside RUN (no '..', no symlink out).
"""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from saeflow._version import __version__
from saeflow.app import DEFAULT_HOST, DEFAULT_PORT
from saeflow.app.live import LiveModel
from saeflow.app.views import MAX_GRAPH_NODES, NotFound, RunData, jsonable
from saeflow.errors import AppError, FlowError
from saeflow.features.dashboards import feature_dashboard
from saeflow.ids import parse_feature
from saeflow.steering.generate import MAX_NEW_TOKENS, MAX_SAMPLES, SamplingConfig
from saeflow.steering.plans import (
    MAX_INTERVENTIONS,
    MAX_STRENGTH,
    Intervention,
    SteeringPlan,
    build_plan,
)
from saeflow.steering.scores import compare_completions

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_PROMPT_CHARS = 4000


def plotly_bundle() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise AppError(f"plotly's bundled plotly.min.js is missing at {path}; "
                           f"reinstall plotly")
    return path


# --- requests --------------------------------------------------------------------------------
class FeatureStrength(BaseModel):
    model_config = ConfigDict(extra="forbid")
    feature: str = Field(..., max_length=64, description="LAYER/POSITION/INDEX")
    strength: float = Field(..., ge=-MAX_STRENGTH, le=MAX_STRENGTH)


class SteerRequest(BaseModel):
    """Default and steered completions. Give one of `feature` (with `mode`), `features`
    (several features, each with its strength, like Neuronpedia's steer) or `plan`."""
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    feature: str | None = Field(None, max_length=64)
    features: list[FeatureStrength] | None = Field(None, max_length=MAX_INTERVENTIONS)
    plan: dict | None = None
    mode: Literal["seed", "single", "cumulative", "span"] = "seed"
    kind: Literal["add", "rescale"] = "add"
    strength: float = Field(4.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH)
    layer: int | None = Field(None, ge=0, le=1000)
    schedule: Literal["constant", "linear", "exponential"] = "constant"
    alpha: float = Field(-0.05, ge=-10, le=10)
    t_res: float = Field(0.5, ge=-1, le=1)
    t_mod: float | None = Field(None, ge=-1, le=1)  # None: each layer's threshold from the flow
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    score: bool = False
    concept: str | None = Field(None, max_length=500)


class ActivationsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    top_k: int = Field(8, ge=1, le=64)
    token: int | None = Field(None, ge=0, le=4096)


# --- the app ---------------------------------------------------------------------------------
def create_app(run: str | Path, *, pack: str | None = None, model: str | None = None,
               loaded_model=None, loaded_pack=None) -> FastAPI:
    data = RunData(run)
    if pack is None and loaded_pack is None and data.flow is not None:
        pack = data.flow.manifest["pack"]["root"]
    if model is None and loaded_model is None and data.index is not None:
        if data.index.manifest.get("identity", {}).get("model") == "gemma-3-270m":
            model = "embedded"
    live = LiveModel(pack, model, loaded_model, loaded_pack, run=data.root)
    app = FastAPI(title="saeflow", version=__version__,
                  description="Feature flow, feature pages and steering over one RUN directory.")
    app.state.data, app.state.live = data, live

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return JSONResponse({"detail": str(exc).strip("'\"")}, status_code=404)

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: ValueError):
        # PlanError, GenerationError, FlowError and the like: a request that cannot run as asked
        return JSONResponse({"detail": str(exc)}, status_code=400)

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
        row = data.index.feature(L, pos, f)
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
            plan = SteeringPlan.from_dict(req.plan)
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
            ids = [plan.meta["seed"]] if plan.meta.get("seed") else []
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
              response_class=StreamingResponse)
    async def steer_stream(req: SteerRequest):
        cfg = _sampling(req)
        plan = await asyncio.to_thread(_plan, req)  # errors answer 4xx before streaming
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def push(event: dict):
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def work():
            try:
                res = live.steer(plan, req.prompt, cfg,
                                 on_token=lambda w, s, texts: push(
                                     {"event": "token", "which": w, "step": s, "texts": texts}))
                res["scores"] = _scores(req, res, plan)
                push({"event": "done", "result": res})
            except Exception as e:  # reported in the stream: the status line is already sent
                push({"event": "error", "detail": str(e)})
            push(None)

        threading.Thread(target=work, daemon=True).start()

        async def events():
            while (ev := await queue.get()) is not None:
                yield f"data: {json.dumps(ev)}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/api/plan/check", summary="Validate a steering plan against the pack")
    def plan_check(plan: dict) -> dict:
        _, pk = _need_model()
        p = SteeringPlan.from_dict(plan)
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

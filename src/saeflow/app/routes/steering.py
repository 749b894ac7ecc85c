"""The routes that run the model: activations of a prompt, steering (whole or streamed as
server-sent events) and checking a plan against the pack."""
from __future__ import annotations

import asyncio
import json
import threading

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from saeflow.app.deps import Data, Live, need_model
from saeflow.app.http_errors import error_status
from saeflow.app.live import LiveModel
from saeflow.app.schemas import ActivationsRequest, SteerRequest
from saeflow.app.views import NotFound, RunData
from saeflow.errors import FlowError
from saeflow.ids import Slot, parse_feature
from saeflow.steering.generate import SamplingConfig
from saeflow.steering.plans import Intervention, PlanSchema, SteeringPlan, build_plan
from saeflow.steering.scores import compare_completions

router = APIRouter()

STREAM_POLL_S = 1.0  # a stream with no new token checks this often that its client is there


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


def pack_feature(pack, spec: str) -> tuple[int, str, int]:
    """A feature id the pack has, or 404."""
    try:
        L, pos, f = parse_feature(spec)
    except FlowError as e:
        raise NotFound(str(e)) from None
    if Slot(pos, L) not in pack:
        raise NotFound(f"unknown feature {spec}: the pack has no SAE at {pos} layer {L}")
    n = pack.info(pos, L).d_sae
    if not 0 <= f < n:
        raise NotFound(f"unknown feature {spec}: that SAE has features 0..{n - 1}")
    return L, pos, f


def steering_plan(req: SteerRequest, data: RunData, live: LiveModel) -> SteeringPlan:
    """The plan a request asks for (one of feature, features or plan), checked against the
    pack."""
    model, pack = need_model(live)
    given = [x for x in (req.feature, req.features, req.plan) if x]
    if len(given) != 1:
        raise HTTPException(400, "give exactly one of feature, features or plan")
    if req.plan is not None:
        plan = SteeringPlan.from_schema(req.plan)
    elif req.features:
        ivs = []
        for fs in req.features:
            L, pos, f = pack_feature(pack, fs.feature)
            ivs.append(Intervention(L, pos, f, fs.strength))
        plan = SteeringPlan(req.kind, ivs, description="features from the request")
    else:
        assert req.feature is not None  # exactly one of the three was given
        pack_feature(pack, req.feature)
        plan = build_plan(pack, feature=req.feature, strength=req.strength,
                          graph_mode=req.mode, kind=req.kind, layer=req.layer,
                          schedule=req.schedule, alpha=req.alpha, run=data.root
                          if data.flow is not None else None, model=model,
                          t_res=req.t_res, t_mod=req.t_mod)
    plan.check(pack)
    return plan


def sampling(req: SteerRequest) -> SamplingConfig:
    cfg = SamplingConfig(max_new_tokens=req.max_new_tokens, n=req.n,
                         temperature=req.temperature, top_p=req.top_p, seed=req.seed)
    cfg.check()
    return cfg


def concept_scores(req: SteerRequest, res: dict, plan: SteeringPlan, data: RunData) -> dict | None:
    """How much of the concept the completions carry, when the request asks for scores."""
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


@router.post("/api/activations", summary="Features active at each token of a text")
def activations(req: ActivationsRequest, data: Data, live: Live) -> dict:
    need_model(live)
    return live.activations(req.text, req.top_k, data.flow_index, data.labels, req.token)


@router.post("/api/steer", summary="Default and steered completions (in the spirit of "
                                   "Neuronpedia's POST /api/steer)")
def steer(req: SteerRequest, data: Data, live: Live) -> dict:
    cfg = sampling(req)
    plan = steering_plan(req, data, live)
    res = live.steer(plan, req.prompt, cfg)
    res["scores"] = concept_scores(req, res, plan, data)
    return res


STREAM_RESPONSES: dict[int | str, dict] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "events: token (which, step, texts), then done (result) or error "
                         "(status, detail)"}}


@router.post("/api/steer/stream", summary="The same, streamed as server-sent events",
             response_class=StreamingResponse, responses=STREAM_RESPONSES)
async def steer_stream(req: SteerRequest, request: Request, data: Data, live: Live):
    cfg = sampling(req)
    plan = await asyncio.to_thread(steering_plan, req, data, live)  # errors answer 4xx first
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
            res["scores"] = concept_scores(req, res, plan, data)
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


@router.post("/api/plan/check", summary="Validate a steering plan against the pack")
def plan_check(plan: PlanSchema, live: Live) -> dict:
    _, pack = need_model(live)
    checked = SteeringPlan.from_schema(plan)
    checked.check(pack)
    return checked.to_dict()

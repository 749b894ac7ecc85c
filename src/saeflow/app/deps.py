"""What a route needs from the app it runs in (FastAPI dependencies): the run's data and the
live model, both set on `app.state` by create_app. They take only the request, so they add
nothing to the API's schema."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from saeflow.app.live import LiveModel
from saeflow.app.views import RunData


async def run_data(request: Request) -> RunData:
    return request.app.state.data


async def live_model(request: Request) -> LiveModel:
    return request.app.state.live


Data = Annotated[RunData, Depends(run_data)]
Live = Annotated[LiveModel, Depends(live_model)]


def need_model(live: LiveModel):
    """(model, pack), or 503 when this server was started without a model."""
    if not live.available:
        raise HTTPException(503, "this server has no model: restart it with --model (and "
                                 "--pack) to steer and to read prompts")
    return live.load()

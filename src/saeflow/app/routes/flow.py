"""Flow graphs of features and the layer overview."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Query

from saeflow.app.deps import Data
from saeflow.app.graph_layout import MAX_GRAPH_NODES

router = APIRouter()

MAX_SEEDS = 256


@router.get("/api/trace", summary="Flow graph of one or more features (comma-separated)")
def trace(data: Data, feature: str = Query(..., max_length=2000),
          t_res: float = Query(0.5, ge=-1, le=1), t_mod: float | None = Query(None, ge=-1, le=1,
                                      description="MLP/attention link threshold; omitted: "
                                                  "each layer's own from the flow's null"),
          mod_k: int = Query(1, ge=1, le=32),
          direction: Literal["both", "backward", "forward"] = "both",
          max_nodes: int = Query(2000, ge=1, le=MAX_GRAPH_NODES)) -> dict:
    seeds = [s.strip() for s in feature.split(",") if s.strip()]
    if not seeds or len(seeds) > MAX_SEEDS:
        raise HTTPException(400, f"give 1 to {MAX_SEEDS} comma-separated feature ids")
    return data.trace(seeds, t_res, t_mod, mod_k, direction, max_nodes)


@router.get("/api/layers", summary="Layer overview: classes, pass-through, gates, communities")
def layers(data: Data) -> dict:
    return data.layers()

"""The data-driven statistics: gates and communities."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query

from saeflow.app.deps import Data
from saeflow.app.graph_layout import MAX_GRAPH_NODES

router = APIRouter()


@router.get("/api/gates", summary="AND/OR gates with labels, paged")
def gates(data: Data, kind: Literal["AND", "OR"] | None = None, offset: int = Query(0, ge=0),
          limit: int = Query(50, ge=1, le=500)) -> dict:
    return data.gates(kind, offset, limit)


@router.get("/api/communities", summary="The largest communities as a layered graph")
def communities(data: Data, min_similarity: float = Query(0.3, ge=-1, le=1),
                max_nodes: int = Query(800, ge=1, le=MAX_GRAPH_NODES),
                top: int = Query(12, ge=1, le=200)) -> dict:
    return data.community_graph(min_similarity, max_nodes, top)

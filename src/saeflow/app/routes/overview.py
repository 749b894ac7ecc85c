"""What the run holds, and search over its features."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query

from saeflow.app.deps import Data, Live
from saeflow.app.encode import jsonable
from saeflow.app.views import NotFound
from saeflow.ids import feature_id
from saeflow.steering.generate import MAX_NEW_TOKENS, MAX_SAMPLES
from saeflow.steering.plans import MAX_INTERVENTIONS, MAX_STRENGTH

router = APIRouter()

ID_SCORE = 10.0  # a search that is a feature id puts that feature first


@router.get("/api/info", summary="What this run holds: slots, parts, pack")
def info(data: Data, live: Live) -> dict:
    out = data.info()
    out["steering"] = live.available
    out["limits"] = {"max_new_tokens": MAX_NEW_TOKENS, "n": MAX_SAMPLES,
                     "strength": MAX_STRENGTH, "interventions": MAX_INTERVENTIONS}
    return out


@router.get("/api/search", summary="Features by label, token or id, best first")
def search(data: Data, q: str = Query(..., min_length=1, max_length=200),
           limit: int = Query(20, ge=1, le=200)) -> dict:
    q = q.strip()
    if not q:
        raise HTTPException(400, "give a word, a phrase or a feature id to search for")
    hits = []
    try:  # a query that is a feature id of this run
        L, pos, f = data.check_feature(q)
    except NotFound:
        pass
    else:
        fid = feature_id(L, pos, f)
        lab = data.labels([fid]).get(fid, {})
        hits.append({"id": fid, "layer": L, "position": pos, "feature": f,
                     "label": lab.get("label"), "score": ID_SCORE})
    if data.index is not None:
        hits += [{k: jsonable(v) for k, v in h.items()} for h in data.index.search(q, limit)]
    return {"query": q, "hits": hits[:limit]}

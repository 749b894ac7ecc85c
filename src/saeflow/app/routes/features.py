"""A feature's page, its Neuronpedia-shaped dashboard and its data-free neighbours."""
from __future__ import annotations

from fastapi import APIRouter

from saeflow.app.deps import Data
from saeflow.app.encode import jsonable
from saeflow.app.views import NotFound
from saeflow.errors import UnknownPositionError
from saeflow.features.dashboards import feature_dashboard
from saeflow.ids import Slot, feature_id

router = APIRouter()


def path_feature(layer: int, position: str, index: int) -> str:
    """The feature id of a path's LAYER/POSITION/INDEX; an unknown position is a 404."""
    try:
        return feature_id(layer, position, index)
    except UnknownPositionError as e:
        raise NotFound(str(e)) from None


@router.get("/api/features/{layer}/{position}/{index}", summary="One feature's page")
def feature(data: Data, layer: int, position: str, index: int) -> dict:
    return data.feature(path_feature(layer, position, index))


@router.get("/api/dashboard/{layer}/{position}/{index}",
            summary="One feature's dashboard in Neuronpedia's JSON shape")
def dashboard(data: Data, layer: int, position: str, index: int) -> dict:
    L, pos, f = data.check_feature(path_feature(layer, position, index))
    slot = Slot(pos, L)
    if not data.has_index_for(slot):
        raise NotFound(f"this run has no feature index for {slot}; run `saeflow index`")
    assert data.index is not None  # has_index_for
    row = data.index_row(L, pos, f)
    return jsonable(feature_dashboard(row, data.index.manifest["hist_edges"],
                                      data.index.manifest.get("model")))


@router.get("/api/predecessors/{layer}/{position}/{index}",
            summary="Data-free predecessors and successors of a feature")
def predecessors(data: Data, layer: int, position: str, index: int) -> dict:
    return data.predecessors(path_feature(layer, position, index))

"""Names shared by every stage: feature ids (`L6/resid_post/123`), the flow classes, the
predecessor kinds and the group names of the evolution analyses. Kept apart so that tables,
graphs and the app can speak them without importing the stages that compute them."""
from __future__ import annotations

from saeflow.errors import FlowError
from saeflow.lm.hookpoints import check_position

CLASSES = ("translated", "processed", "newborn", "unexplained")


PRED_KINDS = ("res", "mlp", "attn")


def feature_id(layer: int, position: str, feature: int) -> str:
    return f"{layer}/{position}/{feature}"


def parse_feature(spec: str) -> tuple[int, str, int]:
    """'12/resid_post/4230' -> (12, 'resid_post', 4230)."""
    parts = str(spec).strip().split("/")
    if len(parts) != 3:
        raise FlowError(f"a feature is written LAYER/POSITION/INDEX, e.g. 12/resid_post/4230; "
                        f"got {spec!r}")
    try:
        layer, index = int(parts[0]), int(parts[2])
    except ValueError:
        raise FlowError(f"layer and index must be integers in {spec!r}") from None
    try:
        position = check_position(parts[1])
    except ValueError as e:
        raise FlowError(str(e)) from None
    return layer, position, index


GROUPS = ("From RES", "From MLP", "From ATT", "From RES & MLP", "From RES & ATT",
          "From MLP & ATT", "From RES & MLP & ATT", "From nowhere")


def group_name(res: bool, mlp: bool, att: bool) -> str:
    parts = [n for n, on in (("RES", res), ("MLP", mlp), ("ATT", att)) if on]
    return "From " + " & ".join(parts) if parts else "From nowhere"

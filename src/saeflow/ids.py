"""Names shared by every stage: an SAE's place (`Slot`, written `6/resid_post`), feature ids
(`6/resid_post/123`), the flow classes, the predecessor kinds and the group names of the
evolution analyses. Kept apart so that tables, graphs and the app can speak them without
importing the stages that compute them. Place strings are built and split here only."""
from __future__ import annotations

from typing import NamedTuple

from saeflow.errors import FlowError, HookError, UnknownPositionError

# Where an SAE can sit; lm/hookpoints.py says where each is read in a model's modules.
POSITIONS: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn_z",
                              "mlp_raw", "attn_raw")


def check_position(position: str) -> str:
    if position not in POSITIONS:
        raise UnknownPositionError(
            f"unknown position {position!r}; use one of: {', '.join(POSITIONS)}"
        )
    return position


class _SlotFields(NamedTuple):
    position: str
    layer: int


class Slot(_SlotFields):
    """Where one SAE sits: a position at a layer. A tuple `(position, layer)`, so it sorts by
    position, then layer, and equals (and hashes as) the plain tuple; `str()` is `6/resid_post`,
    the key of every manifest, and `Slot.parse` reads it back."""

    __slots__ = ()

    def __new__(cls, position: str, layer: int) -> "Slot":
        return super().__new__(cls, check_position(position), int(layer))

    def __str__(self) -> str:
        return f"{self.layer}/{self.position}"

    def __repr__(self) -> str:
        return f"Slot({self.position!r}, {self.layer})"

    @classmethod
    def parse(cls, text: "str | Slot") -> "Slot":
        """'12/resid_post' -> Slot('resid_post', 12)."""
        if isinstance(text, Slot):
            return text
        try:
            layer, position = str(text).strip().split("/")
            return cls(position, int(layer))
        except ValueError as e:
            raise HookError(f"an SAE's place is written LAYER/POSITION, e.g. 12/resid_post; "
                            f"got {text!r}") from e

    @classmethod
    def of(cls, key: "tuple[str, int] | Slot") -> "Slot":
        """A `(position, layer)` tuple as a Slot."""
        return key if isinstance(key, Slot) else cls(*key)

    def folder_key(self) -> str:
        """`resid_post/6`: position first, the order of a pack's folders
        (`PACK/resid_post/layer_6`); pack.json's training metrics are keyed by it."""
        return f"{self.position}/{self.layer}"

    def feature(self, index: int) -> str:
        """The feature id of feature `index` here, e.g. `6/resid_post/123`."""
        return f"{self.layer}/{self.position}/{int(index)}"

CLASSES = ("translated", "processed", "newborn", "unexplained")


# Where a feature's predecessor comes from: the previous residual, this layer's MLP or its
# attention (the flow's "origin"; table columns and manifest keys keep these spellings).
PRED_ORIGINS = ("res", "mlp", "attn")
PRED_KINDS = PRED_ORIGINS  # the former name


def feature_id(layer: int, position: str, feature: int) -> str:
    return Slot(position, layer).feature(feature)


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

"""Reading a finished flow: `open_flow(RUN)` -> `FlowRun`, the manifest, the thresholds and the
two tables that `saeflow flow` wrote (flow.json, thresholds.json, predecessors.parquet,
successors.parquet). Every later stage reads the flow through this module, never the compute."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saeflow.errors import FlowError, MissingResultError, UnknownPositionError
from saeflow.ids import CLASSES, Slot
from saeflow.saes.packs import pack_fingerprint

FLOW_MANIFEST = "flow.json"
FLOW_FORMAT = "saeflow-flow"
THRESHOLDS_FILE = "thresholds.json"
TABLE_FILES = ("predecessors.parquet", "successors.parquet")


@dataclass
class FlowRun:
    """A finished flow in a RUN directory (what `saeflow flow` wrote)."""

    root: Path
    manifest: dict
    thresholds: dict
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    def check_pack(self, pack, name: str | None = None) -> None:
        """Refuse a pack other than the one this flow was computed from."""
        if pack_fingerprint(pack) != self.manifest["pack"]["fingerprint"]:
            raise FlowError(f"{self.root} was computed from a different pack than "
                            f"{name or pack.root} ({self.manifest['pack']['root']}); rerun "
                            f"`saeflow flow`")

    def slots(self) -> dict[Slot, int]:
        """{slot: number of features} of every SAE the flow matched."""
        return {Slot.parse(key): int(n) for key, n in self.manifest["slots"].items()}

    def n_features(self, position: str, layer: int) -> int | None:
        """How many features the SAE at `position` `layer` has; None: the flow has none there."""
        try:
            return self.slots().get(Slot(position, layer))
        except UnknownPositionError:
            return None

    def predecessor_slots(self, layer: int) -> dict[str, Slot | None]:
        """{origin ("res", "mlp", "attn"): the SAE the residual features of `layer` were
        matched against, or None where the pack has none}."""
        kept = self.manifest["predecessor_slots"].get(str(layer), {})
        return {origin: Slot.parse(key) if key else None for origin, key in kept.items()}

    def table(self, name: str):
        """'predecessors' or 'successors' as a pyarrow Table (cached)."""
        import pyarrow.parquet as pq

        if name not in self._tables:
            self._tables[name] = pq.read_table(self.root / f"{name}.parquet")
        return self._tables[name]

    def predecessors(self):
        return self.table("predecessors").to_pandas()

    def successors(self):
        return self.table("successors").to_pandas()

    def live_mask(self) -> np.ndarray:
        """[rows of predecessors.parquet] bool: False for latents flagged dead or rare (all
        True when the flow was computed without firing counts)."""
        t = self.table("predecessors")
        if "live" not in t.column_names:
            return np.ones(t.num_rows, bool)
        return np.asarray(t.column("live").to_numpy(zero_copy_only=False), bool)

    def class_counts(self, include_dead: bool = False) -> dict[int, dict[str, int]]:
        """{layer: {class: count}} over the live residual features (dead and rare latents are
        left out unless include_dead)."""
        t = self.table("predecessors")
        layers = t.column("layer").to_numpy()
        classes = np.asarray(t.column("class").to_pylist())
        keep = np.ones(len(layers), bool) if include_dead else self.live_mask()
        return {int(L): {c: int(((layers == L) & (classes == c) & keep).sum()) for c in CLASSES}
                for L in self.layers}

    def check_feature(self, layer: int, position: str, feature: int) -> None:
        n = self.n_features(position, layer)
        if n is None:
            have = sorted({slot.position for slot in self.slots()})
            raise FlowError(f"this flow has no SAE at {position} layer {layer} (positions: "
                            f"{', '.join(have)}; layers {self.layers[0]}..{self.layers[-1]})")
        if not 0 <= feature < n:
            raise FlowError(f"feature {feature} is out of range for {Slot(position, layer)}: it "
                            f"has {n} features (0..{n - 1})")


def read_json(path: Path, what: str) -> dict:
    """A JSON object of a flow result; FlowError when it is unreadable (not when absent)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FlowError(f"{path} is unreadable ({e}); rerun `saeflow flow` ({what})") from None
    if not isinstance(doc, dict):
        raise FlowError(f"{path} is not a saeflow {what}")
    return doc


def read_manifest(run: str | os.PathLike) -> dict | None:
    """flow.json of `run`, or None when no flow was computed there; FlowError when it is there
    but corrupt or not a saeflow flow's."""
    mf = Path(run) / FLOW_MANIFEST
    if not mf.is_file():
        return None
    manifest = read_json(mf, "flow manifest")
    if manifest.get("format") != FLOW_FORMAT:
        raise FlowError(f"{mf} is not a saeflow flow manifest")
    return manifest


def open_flow(run: str | os.PathLike) -> FlowRun:
    """The flow in the RUN directory `run`. MissingResultError when none was computed there
    (no flow.json); FlowError when one is there but corrupt or not a saeflow flow."""
    root = Path(run)
    manifest = read_manifest(root)
    if manifest is None:
        raise MissingResultError(f"{root} holds no flow results ({FLOW_MANIFEST} missing); run "
                                 f"`saeflow flow PACK --out {root}` first")
    thresholds = read_json(root / THRESHOLDS_FILE, "flow thresholds file")
    return FlowRun(root, manifest, thresholds)

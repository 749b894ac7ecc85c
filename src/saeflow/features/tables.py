"""Writing and querying the feature index (RUN/index/*.parquet), through DuckDB.

    features.parquet  one row per (layer, position, feature): density, mean/max activation,
                      histogram, label, characteristic tokens, Neuronpedia link (the logit
                      lens is computed when a feature is asked for: features/lens.py)
    examples.parquet  one row per (feature, kind, rank): kind 'top' (highest activations) or
                      'sample' (uniform sample, with its activation quantile); token ids and
                      the feature's activation on each token of the window
    tokens.parquet    id -> text for every token id the other tables mention
    index.json        manifest (identity: pack hash, model, settings), written last
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from saeflow.errors import (
    FeatureIndexError,
    MissingResultError,
    UnknownPositionError,
    UnreadableTableError,
)
from saeflow.ids import Slot
from saeflow.store import open_manifest

if TYPE_CHECKING:
    import networkx as nx
    import numpy as np

    from saeflow.features.lens import LogitLens

INDEX_DIR = "index"
INDEX_MANIFEST = "index.json"
INDEX_FORMAT = "saeflow-index"
EXPLANATIONS = "explanations.parquet"  # see explain.py
# the per-feature columns of features.parquet that slot_column reads
FEATURE_COLUMNS = ("count", "density", "mean_act", "max_act", "label", "neuronpedia")

# --- reading and search ---------------------------------------------------------------------
@dataclass
class FeatureIndex:
    root: Path  # RUN/index
    manifest: dict
    # computes a feature's logit lens when asked (attach_lens); None: rows carry the lens only
    # when an older index stored it
    lens: "LogitLens | None" = None

    def attach_lens(self, pack, model) -> "FeatureIndex":
        """Give feature rows and search the logit lens, computed on demand with `model`."""
        from saeflow.features.lens import LogitLens

        self.lens = LogitLens(pack, model, n=int(self.manifest.get("n_logits", 10)))
        return self

    def _with_lens(self, row: dict) -> dict:
        if self.lens is not None:
            row.update(self.lens.feature(Slot(row["position"], row["layer"]), row["feature"]))
        else:
            row.setdefault("logit_top", None)
            row.setdefault("logit_bottom", None)
        return row

    def _slot_key(self, layer: int, position: str) -> str:
        """The manifest key of the SAE at (layer, position); FeatureIndexError when the index
        holds none there."""
        try:
            key = str(Slot(position, layer))
        except UnknownPositionError:  # no SAE of the index is at a position saeflow does not know
            key = ""
        if key not in self.manifest["slots"]:
            raise FeatureIndexError(f"the index has no SAE at {position} layer {layer}")
        return key

    def _con(self):
        import duckdb

        con = _ReadableConnection(duckdb.connect(), self.root)
        for name in ("features", "examples", "tokens"):
            path = str(self.root / f"{name}.parquet").replace("'", "''")
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{path}')")
        expl = self.root / EXPLANATIONS  # optional: written by `saeflow explain`
        if expl.is_file():
            path = str(expl).replace("'", "''")
            con.execute(f"CREATE VIEW explanations AS SELECT id, explanation "
                        f"FROM read_parquet('{path}')")
        else:
            con.execute("CREATE VIEW explanations AS SELECT NULL::VARCHAR AS id, "
                        "NULL::VARCHAR AS explanation WHERE false")
        return con

    def feature(self, layer: int, position: str, feature: int) -> dict:
        """Everything about one feature: stats, label, logit lens, examples with token text."""
        key = self._slot_key(layer, position)
        n = self.manifest["slots"][key]
        if not 0 <= feature < n:
            raise FeatureIndexError(f"feature {feature} is out of range for {key} (0..{n - 1})")
        con = self._con()
        row = con.execute("SELECT f.*, e.explanation FROM features f LEFT JOIN explanations e "
                          "USING (id) WHERE layer=? AND position=? AND feature=?",
                          [layer, position, feature])
        row = _rows(row)[0]
        ex = con.execute(
            "SELECT kind, rank, activation, quantile, doc_id, token_index, center, token_ids, "
            "acts FROM examples WHERE layer=? AND position=? AND feature=? ORDER BY kind, rank",
            [layer, position, feature])
        ex = _rows(ex)
        ids = sorted({i for e in ex for i in e["token_ids"] if i >= 0})
        text = dict(con.execute("SELECT id, text FROM tokens WHERE list_contains(?, id)",
                                [ids]).fetchall()) if ids else {}
        for e in ex:
            e["tokens"] = [text.get(i, "") if i >= 0 else None for i in e["token_ids"]]
        row["examples"] = [e for e in ex if e["kind"] == "top"]
        row["samples"] = [e for e in ex if e["kind"] == "sample"]
        row["hist_edges"] = self.manifest["hist_edges"]
        return self._with_lens(row)

    def slot_features(self, layer: int, position: str) -> list[dict]:
        """feature() for every feature of one SAE, in two queries (exports read whole SAEs)."""
        self._slot_key(layer, position)
        con = self._con()
        rows = _rows(con.execute(
            "SELECT f.*, e.explanation FROM features f LEFT JOIN explanations e USING (id) "
            "WHERE layer=? AND position=? ORDER BY feature", [layer, position]))
        ex = _rows(con.execute(
            "SELECT feature, kind, rank, activation, quantile, center, token_ids, acts "
            "FROM examples WHERE layer=? AND position=? ORDER BY feature, kind, rank",
            [layer, position]))
        ids = sorted({i for e in ex for i in e["token_ids"] if i >= 0})
        text = dict(con.execute("SELECT id, text FROM tokens WHERE list_contains(?, id)",
                                [ids]).fetchall()) if ids else {}
        by_feature: dict[int, dict] = {r["feature"]: {**r, "examples": [], "samples": []}
                                       for r in rows}
        if self.lens is not None:  # the whole SAE in one tiled pass
            for r, lens in zip(rows, self.lens.slot(Slot(position, layer))):
                by_feature[r["feature"]].update(lens)
        else:
            for r in by_feature.values():
                r.setdefault("logit_top", None)
                r.setdefault("logit_bottom", None)
        for e in ex:
            e["tokens"] = [text.get(i, "") if i >= 0 else None for i in e["token_ids"]]
            by_feature[e["feature"]]["examples" if e["kind"] == "top" else "samples"].append(e)
        return [by_feature[f] for f in sorted(by_feature)]

    def labels(self, ids: list[str]) -> dict[str, dict]:
        """{feature id: {"label", "explanation"}} for the ids this index holds."""
        if not ids:
            return {}
        rows = self._con().execute(
            "SELECT f.id, f.label, e.explanation FROM features f LEFT JOIN explanations e "
            "USING (id) WHERE list_contains(?, f.id)", [list(ids)]).fetchall()
        return {i: {"label": lab, "explanation": ex} for i, lab, ex in rows}

    # --- whole columns, for the stages that read the index in bulk -----------------------
    def slot_column(self, slot: "Slot | tuple[str, int]", column: str) -> list:
        """One column of the features table for every feature of the SAE at `slot`, in
        feature order ([] when the index holds no SAE there)."""
        if column not in FEATURE_COLUMNS:
            raise FeatureIndexError(f"the features table has no column {column!r} "
                                    f"(it has {', '.join(FEATURE_COLUMNS)})")
        slot = Slot.of(slot)
        rows = self._con().execute(
            f"SELECT {column} FROM features WHERE layer=? AND position=? ORDER BY feature",
            [slot.layer, slot.position]).fetchall()
        return [r[0] for r in rows]

    def firing_counts(self) -> "dict[Slot, np.ndarray]":
        """{slot: [d] tokens each feature was active on} for every SAE of the index, in slot
        order (position, then layer); a feature without a count counts 0."""
        import numpy as np

        rows = self._con().execute("SELECT position, layer, feature, count FROM features "
                                   "ORDER BY position, layer, feature").fetchall()
        by: dict[Slot, list[tuple[int, int]]] = {}
        for pos, L, f, c in rows:
            by.setdefault(Slot(pos, L), []).append((int(f), int(c or 0)))
        counts = {}
        for slot, fc in by.items():
            arr = np.zeros(max(f for f, _ in fc) + 1, np.int64)
            for f, c in fc:
                arr[f] = c
            counts[slot] = arr
        return counts

    def active_ids(self, layers: list[int] | None = None, positions: list[str] | None = None,
                   limit: int | None = None) -> list[str]:
        """Ids of the features that were ever active, densest first (ties by id), at `layers`
        and `positions` when given, at most `limit` (None or 0: all)."""
        where: list[str] = ["count > 0"]
        args: list[int | str] = []
        if layers:
            where.append(f"layer IN ({', '.join('?' * len(layers))})")
            args += list(layers)
        if positions:
            where.append(f"position IN ({', '.join('?' * len(positions))})")
            args += list(positions)
        sql = f"SELECT id FROM features WHERE {' AND '.join(where)} ORDER BY density DESC, id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [r[0] for r in self._con().execute(sql, args).fetchall()]

    def label_map(self) -> dict[str, str]:
        """{feature id: automatic label} for every feature of the index."""
        return dict(self._con().execute("SELECT id, label FROM features").fetchall())

    def search(self, query: str, limit: int = 20) -> list[dict]:
        """Features whose label or top contexts contain `query` (case-insensitive), best first.

        score = 3 * (label contains it) + 3 * (the LLM explanation, if any, contains it)
        + 2 * (share of top examples whose activating token is it) + (share of top examples whose
        window contains it) + 2 * (a top logit-lens token is it; with an attached lens, which
        checks its best candidates exactly: features/lens.py).
        """
        q = query.strip().lower()
        if not q:
            raise FeatureIndexError("give a word or phrase to search for")
        con = self._con()
        sql = """
        WITH hit_tokens AS (SELECT id FROM tokens WHERE lower(trim(text)) = ?),
        ex AS (
          SELECT layer, position, feature,
                 avg(CASE WHEN token_ids[center + 1] IN (SELECT id FROM hit_tokens) THEN 1 ELSE 0 END) AS center_share,
                 avg(CASE WHEN len(list_intersect(token_ids, (SELECT list(id) FROM hit_tokens))) > 0 THEN 1 ELSE 0 END) AS window_share
          FROM examples WHERE kind = 'top' GROUP BY layer, position, feature
        )
        SELECT f.id, f.layer, f.position, f.feature, f.label, e.explanation, f.density,
               f.neuronpedia,
               (CASE WHEN lower(f.label) LIKE '%' || ? || '%' THEN 3 ELSE 0 END)
               + (CASE WHEN lower(coalesce(e.explanation, '')) LIKE '%' || ? || '%' THEN 3 ELSE 0 END)
               + 2 * coalesce(ex.center_share, 0) + coalesce(ex.window_share, 0) AS score,
               coalesce(ex.center_share, 0) AS center_share
        FROM features f LEFT JOIN ex USING (layer, position, feature)
        LEFT JOIN explanations e ON e.id = f.id
        WHERE lower(f.label) LIKE '%' || ? || '%' OR ex.window_share > 0
           OR lower(coalesce(e.explanation, '')) LIKE '%' || ? || '%'
        ORDER BY score DESC, f.density DESC, f.id LIMIT ?
        """
        rows = _rows(con.execute(sql, [q, q, q, q, q, limit]))
        if self.lens is None:
            return rows
        slots = [Slot.parse(k) for k in self.manifest["slots"]]
        hits = {Slot.of(h["slot"]).feature(h["feature"]): h for h in self.lens.search(q, slots)}
        by_id = {r["id"]: r for r in rows}
        missing = [i for i in hits if i not in by_id]
        if missing:
            extra = _rows(con.execute(
                "SELECT f.id, f.layer, f.position, f.feature, f.label, e.explanation, "
                "f.density, f.neuronpedia, 0.0 AS score, 0.0 AS center_share FROM features f "
                "LEFT JOIN explanations e ON e.id = f.id WHERE list_contains(?, f.id)",
                [missing]))
            by_id.update({r["id"]: r for r in extra})
        for i, h in hits.items():
            by_id[i]["score"] += 2
            by_id[i]["logit_rank"] = h["rank"]
        out = sorted(by_id.values(), key=lambda r: (-r["score"], -r["density"], r["id"]))
        return out[:limit]


class _ReadableConnection:
    """A DuckDB connection whose errors on a truncated or corrupt table say what to rerun."""

    def __init__(self, con, root: Path):
        self._c, self._root = con, root

    def execute(self, *args, **kwargs):
        import duckdb

        try:
            return self._c.execute(*args, **kwargs)
        except (duckdb.IOException, duckdb.InvalidInputException) as e:
            first = str(e).strip().splitlines()[0][:200]
            raise UnreadableTableError(
                f"a table of the index in {self._root} cannot be read ({first}); rerun "
                f"`saeflow index PACK --out RUN --force`") from None

    def __getattr__(self, name):
        return getattr(self._c, name)


def _rows(cursor) -> list[dict]:
    cols = [d[0] for d in cursor.description]
    return [dict(zip(cols, r)) for r in cursor.fetchall()]


def open_index(run: str | os.PathLike, lens_model=None, pack=None) -> FeatureIndex:
    """The index in RUN; with `lens_model`, feature rows and search get the logit lens
    (computed on demand; `pack` defaults to the one the index was built from).

    MissingResultError when RUN has no index yet; FeatureIndexError when its manifest is
    unreadable or not an index's."""
    hint = f"feature index; run `saeflow index PACK --out {run}`"
    manifest_file = Path(run) / INDEX_DIR / INDEX_MANIFEST
    if not manifest_file.is_file():
        raise MissingResultError(f"{Path(run)} has no {hint}")
    try:
        idx = FeatureIndex(*open_manifest(run, INDEX_DIR, INDEX_MANIFEST, INDEX_FORMAT,
                                          FeatureIndexError, hint))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FeatureIndexError(f"{manifest_file} is unreadable ({e}); rerun "
                                f"`saeflow index PACK --out {run} --force`") from None
    if lens_model is not None:
        if pack is None:
            from saeflow.saes.packs import load_pack

            pack = load_pack(idx.manifest["pack_root"])
        idx.attach_lens(pack, lens_model)
    return idx



# --- export ---------------------------------------------------------------------------------
def add_labels(G: "nx.DiGraph", run_dir: str | Path) -> int:
    """Give each node its label (and LLM explanation) from the feature index in `run_dir`, when
    there is one built from the same pack as the flow. Returns how many nodes got a label."""
    try:
        index = open_index(run_dir)
    except MissingResultError:
        return 0
    flow_pack = G.graph.get("pack")
    if flow_pack and index.manifest.get("identity", {}).get("pack") not in (None, flow_pack):
        return 0  # an index of another pack: its feature numbers mean other features
    found = index.labels(list(G.nodes))
    for nid, info in found.items():
        for key in ("label", "explanation"):
            if info.get(key):
                G.nodes[nid][key] = info[key]
    return sum(1 for n in G if G.nodes[n].get("label"))


def model_spec_of(manifest: dict) -> str | None:
    """What `load_model` takes to load the model an index was built with (None: unknown)."""
    src = manifest.get("model_source")
    if not src:
        return None
    if src.startswith("embedded"):
        return "embedded"
    return src.removeprefix("hub:")


def open_index_with_lens(run, model=None, device: str | None = "cpu"):
    """The index in RUN with its logit lens: `model`, else the one it was built with (loaded
    here). Raises FeatureIndexError when that model is unknown or cannot be loaded."""
    if model is None:
        idx = open_index(run)
        spec = model_spec_of(idx.manifest)
        if spec is None:
            raise FeatureIndexError(f"{run}'s index does not name its model (written by an "
                                    f"older saeflow); rebuild it with `saeflow index`")
        from saeflow.lm.model import load_model

        try:
            model = load_model(spec, device=device, progress=False)
        except (OSError, ValueError) as e:
            raise FeatureIndexError(f"cannot load the index's model {spec!r} for the logit "
                                    f"lens: {e}") from None
    return open_index(run, lens_model=model)

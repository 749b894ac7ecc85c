"""What the web app shows, as plain JSON-able dicts built from a RUN directory.

Each method here is one view's data; the routes (routes/) only check requests and call them.
Everything is read lazily and cached per RunData, so a server on a large run starts at once.
"""
from __future__ import annotations

import json
import threading
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq

from saeflow.app.encode import jsonable, num
from saeflow.app.graph_layout import LANES, graph_json, prune
from saeflow.errors import (
    AppError,
    FeatureIndexError,
    FlowError,
    MissingResultError,
    StatsError,
    UnreadableTableError,
)
from saeflow.evolution.tables import open_stats
from saeflow.features.tables import open_index
from saeflow.flow.graphs import FlowIndex, persistence, trace
from saeflow.flow.run import open_flow
from saeflow.ids import PRED_ORIGINS, Slot, feature_id, parse_feature


class NotFound(LookupError):
    """An unknown feature, slot or missing part of the run: the server answers 404."""


class RunData:
    """The parts of RUN that exist (flow, index, stats), opened on first use."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory; give a RUN made by "
                                    f"`saeflow flow` / `index` / `stats`")
        self._lock = threading.Lock()
        self._model_source = None  # set_model: how to load the model for the logit lens

    # --- the parts ---------------------------------------------------------------------
    @cached_property
    def flow(self):
        return _open_part(open_flow, self.root)

    @cached_property
    def flow_index(self):
        with self._lock:
            return FlowIndex(self.flow) if self.flow is not None else None

    @cached_property
    def index(self):
        idx = _open_part(open_index, self.root)
        if idx is None:
            return None
        if self.flow is not None and idx.manifest.get("identity", {}).get("pack") not in (
                None, self.flow.manifest["pack"]["fingerprint"]):
            return None  # an index of another pack: its feature numbers mean other features
        return idx

    @cached_property
    def lens(self):
        """The logit lens of a feature page, when the server can run the model (set_model)."""
        if self._model_source is None:
            return None
        from saeflow.features.lens import LogitLens

        try:
            model, pack = self._model_source()
        except AppError:  # no pack to read the decoders from: pages go without the lens
            return None
        return LogitLens(pack, model)

    def set_model(self, load) -> None:
        """`load() -> (model, pack)`: called on the first feature page that needs the model."""
        self._model_source = load

    @cached_property
    def stats(self):
        return _open_part(open_stats, self.root)

    @cached_property
    def communities(self) -> dict[str, int]:
        path = self.root / "stats" / "communities.parquet"
        if not path.is_file():
            return {}
        t = pq.read_table(path, columns=["id", "community"])
        return dict(zip(t.column("id").to_pylist(), t.column("community").to_pylist()))

    @cached_property
    def stats_summary(self) -> dict:
        path = self.root / "stats" / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def slots(self) -> dict[str, int]:
        """{'L/position': n_features} over every part of the run."""
        out: dict[str, int] = {}
        if self.index is not None:
            out.update(self.index.manifest["slots"])
        if self.flow is not None:
            out.update(self.flow.manifest["slots"])
        return out

    def info(self) -> dict:
        slots = self.slots()
        places = [Slot.parse(k) for k in slots]
        layers = sorted({s.layer for s in places})
        positions = sorted({s.position for s in places}, key=lambda p: LANES.get(p, 9))
        out: dict[str, Any] = {"run": self.root.name, "layers": layers, "positions": positions,
               "slots": slots, "has": {"flow": self.flow is not None,
                                       "index": self.index is not None,
                                       "stats": self.stats is not None}}
        if self.flow is not None:
            m = self.flow.manifest
            out["pack"] = {"root": m["pack"]["root"], "fingerprint": m["pack"]["fingerprint"]}
            # t_mod None: each layer's own MLP / attention threshold (the flow's null model)
            out["default_thresholds"] = {"t_res": 0.5, "t_mod": None}
            out["flow_null"] = self.flow.thresholds.get("null", m.get("config", {}).get("null"))
            out["flow_geometry"] = m.get("geometry", "raw")
        out["first_feature"] = self.suggested_feature()
        if self.index is not None:
            out["index_tokens"] = self.index.manifest.get("tokens")
        if self.stats is not None:
            out["stats_tokens"] = self.stats.manifest.get("tokens")
        return out

    def suggested_feature(self) -> str | None:
        """A residual feature of a middle layer whose chain persists longest: a good first look."""
        if self.flow is None:
            return None

        per = persistence(self.flow_index, t_res=0.5)
        if not per:
            return None
        layers = sorted(per)
        L = layers[len(layers) // 2]
        return feature_id(L, "resid_post", int(np.argmax(per[L]))) if len(per[L]) else None

    # --- features ----------------------------------------------------------------------
    def check_feature(self, spec: str) -> tuple[int, str, int]:
        try:
            L, pos, f = parse_feature(spec)
        except FlowError as e:
            raise NotFound(str(e)) from None
        slot = Slot(pos, L)
        n = self.slots().get(str(slot))
        if n is None:
            raise NotFound(f"this run has no SAE at {pos} layer {L}; its slots are "
                           f"{', '.join(sorted(self.slots())[:12])}")
        if not 0 <= f < n:
            raise NotFound(f"feature {f} is out of range for {slot} (0..{n - 1})")
        return L, pos, f

    def has_index_for(self, slot: Slot) -> bool:
        """Whether the run's feature index holds the SAE at `slot`."""
        return self.index is not None and str(slot) in self.index.manifest["slots"]

    def labels(self, ids: list[str]) -> dict[str, dict]:
        return self.index.labels(ids) if self.index is not None and ids else {}

    def predecessors(self, spec: str) -> dict:
        """Top-k data-free predecessors (residual, MLP, attention) and successors of a feature."""
        L, pos, f = self.check_feature(spec)
        out: dict = {"id": feature_id(L, pos, f), "predecessors": {}, "successors": [],
                     "class": None}
        if self.flow is None:
            return out
        slots = self.flow.manifest["predecessor_slots"].get(str(L), {})
        if pos == "resid_post":
            t = self.flow.table("predecessors")
            row = _row(t, layer=L, feature=f)
            if row is not None:
                out["class"] = row["class"]
                for origin in PRED_ORIGINS:
                    slot = slots.get(origin)
                    if slot is None or not row.get(f"top_{origin}"):
                        continue
                    place = Slot.parse(slot)
                    out["predecessors"][origin] = [
                        {"id": place.feature(e["feature"]),
                         "similarity": float(e["similarity"])}
                        for e in row[f"top_{origin}"] if e["feature"] >= 0]
        t = self.flow.table("successors")
        row = _row(t, layer=L, feature=f, position=pos)
        if row is not None and row.get("top_next") and row.get("next_layer") is not None:
            out["successors"] = [{"id": feature_id(int(row["next_layer"]), row["next_position"],
                                                   int(e["feature"])),
                                  "similarity": float(e["similarity"])}
                                 for e in row["top_next"] if e["feature"] >= 0]
        ids = [e["id"] for v in out["predecessors"].values() for e in v] + \
              [e["id"] for e in out["successors"]]
        lab = self.labels(ids)
        for e in [e for v in out["predecessors"].values() for e in v] + out["successors"]:
            e["label"] = (lab.get(e["id"]) or {}).get("label")
        return out

    def coactivation(self, spec: str, limit: int = 10) -> dict:
        """The strongest data-driven partners upstream and downstream (by Pearson)."""
        L, pos, f = self.check_feature(spec)
        if self.stats is None:
            return {"upstream": [], "downstream": []}
        path = self.stats.root / "edges.parquet"
        cols = ["up_layer", "up_position", "up", "down_layer", "down_position", "down", "count",
                "pearson", "jaccard", "sufficiency", "necessity", "mutual_info"]
        schema = pq.read_schema(path)
        cols = [c for c in cols if c in schema.names]
        down = pq.read_table(path, columns=cols, filters=[("down_layer", "=", L),
                                                          ("down_position", "=", pos),
                                                          ("down", "=", f)]).to_pandas()
        up = pq.read_table(path, columns=cols, filters=[("up_layer", "=", L),
                                                        ("up_position", "=", pos),
                                                        ("up", "=", f)]).to_pandas()

        def rows(df, side):
            df = df.sort_values("pearson", ascending=False).head(limit)
            out = []
            for r in df.to_dict("records"):
                other = feature_id(int(r[f"{side}_layer"]), r[f"{side}_position"], int(r[side]))
                out.append({"id": other, **{k: num(r[k]) for k in cols
                                           if k not in ("up_layer", "up_position", "up",
                                                        "down_layer", "down_position", "down")}})
            return out

        res = {"upstream": rows(down, "up"), "downstream": rows(up, "down")}
        lab = self.labels([r["id"] for r in res["upstream"] + res["downstream"]])
        for r in res["upstream"] + res["downstream"]:
            r["label"] = (lab.get(r["id"]) or {}).get("label")
        return res

    def index_row(self, L: int, pos: str, f: int) -> dict:
        """The index's row of a feature, with its logit lens when the model can run."""
        assert self.index is not None
        row = self.index.feature(L, pos, f)
        if row.get("logit_top") is None and self.lens is not None:
            row.update(self.lens.feature((pos, L), f))  # on demand (features/lens.py)
        return row

    def feature(self, spec: str) -> dict:
        """Everything the feature page shows."""
        L, pos, f = self.check_feature(spec)
        fid = feature_id(L, pos, f)
        page: dict = {"id": fid, "layer": L, "position": pos, "feature": f, "index": None}
        if self.has_index_for(Slot(pos, L)):
            row = self.index_row(L, pos, f)
            page["index"] = {k: jsonable(v) for k, v in row.items()}
        page.update(self.predecessors(fid))
        page["coactivation"] = self.coactivation(fid)
        page["community"] = self.communities.get(fid)
        return page

    # --- graphs ------------------------------------------------------------------------
    def trace(self, seeds: list[str], t_res: float, t_mod: float | None, mod_k: int = 1,
              direction: Literal["both", "backward", "forward"] = "both", max_nodes: int = 2000, color_by: str = "class") -> dict:
        """The union of the seeds' flow graphs, pruned to max_nodes and laid out in lanes."""
        import networkx as nx

        if self.flow is None:
            raise NotFound("this run has no flow; run `saeflow flow PACK --out RUN`")
        for s in seeds:
            L, pos, f = self.check_feature(s)
            try:
                self.flow.check_feature(L, pos, f)
            except FlowError as e:
                raise NotFound(str(e)) from None
        G = nx.DiGraph()
        for s in seeds:
            G = nx.compose(G, trace(self.flow_index, s, t_res=t_res, t_mod=t_mod, mod_k=mod_k,
                                    direction=direction))
        seed_ids = {feature_id(*parse_feature(s)) for s in seeds}
        for n in seed_ids & set(G):
            G.nodes[n]["role"] = "seed"
        n_total = G.number_of_nodes()
        if n_total > max_nodes:
            G = G.subgraph(prune(G, seed_ids, max_nodes)).copy()
        lab = self.labels(list(G))
        for n, info in lab.items():
            G.nodes[n]["label"] = info.get("label")
            if info.get("explanation"):
                G.nodes[n]["explanation"] = info["explanation"]
        for n in G:
            G.nodes[n]["community"] = self.communities.get(n)
        return graph_json(G, t_res, {"seeds": sorted(seed_ids), "n_total": n_total,
                                     "pruned": n_total > G.number_of_nodes(),
                                     "t_res": t_res, "t_mod": t_mod, "mod_k": mod_k})

    def layers(self) -> dict:
        """Layer overview: class shares, pass-through, gates count, communities summary."""
        out: dict = {"classes": [], "pass_through": [], "communities": [], "groups": {},
                     "agreement": []}
        if self.flow is not None:
            from saeflow.flow.plots import thresholds_caption

            for L, c in self.flow.class_counts().items():
                n = max(sum(c.values()), 1)
                out["classes"].append({"layer": L, **{k: v / n for k, v in c.items()}})
            out["classes_caption"] = thresholds_caption(self.flow)
        s = self.stats_summary
        out["pass_through"] = s.get("pass_through", [])
        out["groups"] = s.get("groups", {})
        out["agreement"] = s.get("agreement", [])
        out["gates"] = s.get("gates", {})
        path = self.root / "stats" / "communities_summary.csv"
        if path.is_file():
            import pandas as pd

            out["communities"] = pd.read_csv(path).head(50).to_dict("records")
        return out

    def gates(self, kind: str | None, offset: int, limit: int) -> dict:
        path = self.root / "stats" / "gates.json"
        rows = json.loads(path.read_text()) if path.is_file() else []
        if kind:
            rows = [r for r in rows if r.get("gate") == kind]
        items = []
        for r in rows[offset:offset + limit]:
            r = {k: jsonable(v) for k, v in r.items()}
            r["inputs"] = [{"id": r.get(f"up_{x}"), "label": r.get(f"up_{x}_label"),
                            "count": r.get(f"up_{x}_count")} for x in ("a", "b")]
            items.append(r)
        return {"total": len(rows), "offset": offset, "items": items}

    def community_graph(self, min_similarity: float, max_nodes: int, top: int = 12) -> dict:
        """Features of the largest communities, linked by their Pearson edges >= min_similarity."""
        import networkx as nx

        if self.stats is None or not self.communities:
            raise NotFound("this run has no communities; run `saeflow stats PACK --out RUN`")
        sizes: dict[int, int] = {}
        for c in self.communities.values():
            sizes[c] = sizes.get(c, 0) + 1
        keep = set(sorted(sizes, key=lambda c: -sizes[c])[:top])
        e = pq.read_table(self.stats.root / "edges.parquet",
                          columns=["up_layer", "up_position", "up", "down_layer",
                                   "down_position", "down", "pearson"],
                          filters=[("pearson", ">=", float(min_similarity))]).to_pandas()
        e = e[e.up_position == e.down_position]
        src = _feature_ids(e.up_layer, e.up_position, e.up)
        dst = _feature_ids(e.down_layer, e.down_position, e.down)
        G = nx.DiGraph()
        for u, v, w in zip(src, dst, e.pearson.to_numpy(float)):
            cu, cv = self.communities.get(u), self.communities.get(v)
            if cu in keep and cu == cv:
                for n in (u, v):
                    if n not in G:
                        L, pos, f = parse_feature(n)
                        G.add_node(n, layer=L, position=pos, feature=f, community=cu, score=0.0,
                                   role="member")
                G.add_edge(u, v, similarity=w, kind="pearson")
        n_total = G.number_of_nodes()
        if n_total > max_nodes:
            deg = dict(G.degree(weight="similarity"))
            G = G.subgraph(sorted(G, key=lambda n: -deg[n])[:max_nodes]).copy()
        for n, info in self.labels(list(G)).items():
            G.nodes[n]["label"] = info.get("label")
        return graph_json(G, 1.1, {"n_total": n_total, "pruned": n_total > G.number_of_nodes(),
                                   "min_similarity": min_similarity,
                                   "communities": [{"community": c, "size": sizes[c]}
                                                   for c in sorted(keep, key=lambda c: -sizes[c])]})


# --- helpers ---------------------------------------------------------------------------------
def _open_part(opener, root: Path):
    """A part of the run (flow, index, stats): None when it was not computed; one that is
    there but unreadable is an UnreadableTableError (the server answers 503), not absent."""
    try:
        return opener(root)
    except MissingResultError:
        return None
    except (FlowError, FeatureIndexError, StatsError) as e:
        raise UnreadableTableError(str(e)) from None


def _row(table, **eq) -> dict | None:
    import pyarrow.compute as pc

    mask = None
    for k, v in eq.items():
        m = pc.equal(table.column(k), v)
        mask = m if mask is None else pc.and_(mask, m)
    sel = table.filter(mask)
    return sel.slice(0, 1).to_pylist()[0] if sel.num_rows else None


def _feature_ids(layers, positions, indices) -> list[str]:
    """The feature ids of three table columns (one Slot per place: edge tables are long)."""
    slots: dict[tuple[int, str], Slot] = {}
    out = []
    for L, pos, f in zip(layers.tolist(), positions.tolist(), indices.tolist()):
        slot = slots.get((L, pos))
        if slot is None:
            slot = slots[(L, pos)] = Slot(pos, L)
        out.append(slot.feature(f))
    return out

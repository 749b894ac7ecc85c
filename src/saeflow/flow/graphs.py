"""Flow graphs (appendix B.2): trace one feature backward and forward through depth, and export.

From a seed at R_L, one layer at a time:
  - backward: follow the top-1 residual predecessor while its similarity is >= t_res;
  - forward: follow the top-1 residual successor while its similarity is >= t_res;
  - at every residual node on the chain, attach its MLP and attention predecessors (the best
    `mod_k`) whose similarity is >= t_mod.
Edges point downstream (predecessor -> successor) and carry the similarity.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import networkx as nx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from saeflow.errors import FlowError
from saeflow.flow.run import FlowRun
from saeflow.ids import PRED_ORIGINS, Slot, feature_id, parse_feature
from saeflow.store import atomic_path, write_json_atomic

LANES = {"attn_out": 1.0, "attn_z": 1.0, "attn_raw": 1.0, "resid_post": 0.0, "resid_pre": 0.0,
         "mlp_out": -1.0, "mlp_raw": -1.0}


def _padded(col: pa.ChunkedArray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """list<struct<feature, similarity>> -> (indices [n, k] with -1, values [n, k] with nan)."""
    arr = col.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy()
    k = int(lengths.max()) if n else 0
    idx = np.full((n, max(k, 1)), -1, np.int64)
    val = np.full((n, max(k, 1)), np.nan, np.float32)
    flat = pc.list_flatten(arr)
    f = flat.field("feature").to_numpy(zero_copy_only=False)
    v = flat.field("similarity").to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(n), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n else np.zeros(0, int)
    cols = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    idx[rows, cols], val[rows, cols] = f, v
    return idx, val


def _blocks(table: pa.Table, key: np.ndarray):
    """(key value, sub-table) for each run of equal keys (the tables are written slot by slot)."""
    cuts = [0, *(np.flatnonzero(np.diff(key)) + 1).tolist(), len(key)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b > a:
            yield key[a], table.slice(a, b - a)


@dataclass
class _LayerTops:
    """The top-k predecessor lists of one layer's residual features, per origin."""

    top_i: dict  # origin ("res", "mlp", "attn") -> [n, k] int64 (-1 missing)
    top_v: dict  # origin -> [n, k] float32 (nan missing)
    cls: np.ndarray  # [n] object: each feature's class


@dataclass
class _SuccessorTops:
    """The top-k successor lists of one SAE's features, all at resid_post `next_layer`."""

    top_i: np.ndarray  # [n, k] int64 (-1 missing)
    top_v: np.ndarray  # [n, k] float32 (nan missing)
    next_layer: int | None  # None: the last layer's residual features have no successor


class PredecessorMatch(NamedTuple):
    """A residual feature's predecessor: where it sits, which feature, how similar."""

    position: str
    layer: int
    feature: int
    similarity: float


class SuccessorMatch(NamedTuple):
    """A feature's best residual successor (at resid_post `layer`)."""

    layer: int
    feature: int
    similarity: float


class FlowIndex:
    """Per-slot numpy arrays of a FlowRun, for fast tracing."""

    def __init__(self, run: FlowRun):
        self.run = run
        self.pred: dict[int, _LayerTops] = {}
        t = run.table("predecessors")
        for L, sel in _blocks(t, t.column("layer").to_numpy()):
            n = sel.num_rows
            top_i, top_v = {}, {}
            for origin in PRED_ORIGINS:
                top_i[origin], top_v[origin] = _padded(sel.column(f"top_{origin}"), n)
            self.pred[int(L)] = _LayerTops(top_i, top_v,
                                           np.asarray(sel.column("class").to_pylist(),
                                                      dtype=object))
        self.succ: dict[Slot, _SuccessorTops] = {}
        s = run.table("successors")
        names = pc.dictionary_encode(s.column("position").combine_chunks())
        key = names.indices.to_numpy().astype(np.int64) * 100_000 + s.column("layer").to_numpy()
        for _, sel in _blocks(s, key):
            pos, L = sel.column("position")[0].as_py(), sel.column("layer")[0].as_py()
            i, v = _padded(sel.column("top_next"), sel.num_rows)
            self.succ[Slot(pos, L)] = _SuccessorTops(i, v, sel.column("next_layer")[0].as_py())
        # layer -> origin -> the SAE matched against (None: the pack has none)
        self.predecessor_slots = {int(L): run.predecessor_slots(int(L))
                                  for L in run.manifest["predecessor_slots"]}
        # the same as written in flow.json ("5/resid_post"), for callers that read strings
        self.pred_slots = {int(L): v for L, v in run.manifest["predecessor_slots"].items()}

    def predecessor(self, layer: int, feature: int, origin: str, rank: int = 0
                    ) -> PredecessorMatch | None:
        """The `rank`-th best predecessor from `origin` ("res", "mlp", "attn"), or None."""
        slot = self.predecessor_slots.get(layer, {}).get(origin)
        if slot is None:
            return None
        i = self.pred[layer].top_i[origin][feature]
        v = self.pred[layer].top_v[origin][feature]
        if rank >= len(i) or i[rank] < 0:
            return None
        return PredecessorMatch(slot.position, slot.layer, int(i[rank]), float(v[rank]))

    def successor(self, position: str, layer: int, feature: int) -> SuccessorMatch | None:
        """The best residual successor, or None."""
        tops = self.succ.get(Slot(position, layer))
        if tops is None or tops.next_layer is None or tops.top_i[feature, 0] < 0:
            return None
        return SuccessorMatch(tops.next_layer, int(tops.top_i[feature, 0]),
                              float(tops.top_v[feature, 0]))


def trace(run: FlowRun | FlowIndex, seed: str, t_res: float = 0.5, t_mod: float | None = None,
          mod_k: int = 1, direction: Literal["both", "backward", "forward"] = "both",
          max_steps: int | None = None) -> nx.DiGraph:
    """The flow graph of `seed` ('12/resid_post/4230'). Thresholds are inclusive (s >= t).

    t_mod None: each layer's MLP / attention link threshold is the flow's own (thresholds.json,
    from its null model), so a graph links a module only where the classes call it "high"."""
    index = run if isinstance(run, FlowIndex) else FlowIndex(run)
    run = index.run
    if direction not in ("both", "backward", "forward"):
        raise FlowError("direction must be both, backward or forward")
    if mod_k < 1:
        raise FlowError("mod_k must be >= 1")
    L, pos, f = parse_feature(seed)
    run.check_feature(L, pos, f)
    G = nx.DiGraph(seed=feature_id(L, pos, f), t_res=t_res,
                   t_mod=t_mod if t_mod is not None else "per layer (flow null)", mod_k=mod_k,
                   pack=run.manifest["pack"]["fingerprint"])
    tracer = _Tracer(index, G, t_res=t_res, t_mod=t_mod, mod_k=mod_k)
    seed_id = tracer.node(L, pos, f, 1.0, "seed")
    if pos != "resid_post":  # enter the residual chain through the seed's successor
        s = index.successor(pos, L, f)
        origin = "attn" if pos.startswith("attn") else "mlp"
        if s is None or not s.similarity >= (tracer.module_t(s.layer, origin)
                                             if pos != "resid_pre" else t_res):
            return G
        L, f = s.layer, s.feature
        G.add_edge(seed_id, tracer.node(L, "resid_post", f, s.similarity, "res"),
                   similarity=s.similarity, kind="seed")
    steps = max_steps if max_steps is not None else len(run.layers) + 1
    if direction in ("both", "backward"):
        tracer.backward(L, f, steps)
    if direction in ("both", "forward"):
        tracer.forward(L, f, steps, modules_at_start=direction == "forward")
    return G


class _Tracer:
    """Grows one flow graph: nodes are added once, links only at or above their thresholds."""

    def __init__(self, index: FlowIndex, G: nx.DiGraph, *, t_res: float, t_mod: float | None,
                 mod_k: int):
        self.index, self.G = index, G
        self.t_res, self.t_mod, self.mod_k = t_res, t_mod, mod_k

    def node(self, layer: int, position: str, feature: int, score: float, role: str) -> str:
        nid = feature_id(layer, position, feature)
        if nid not in self.G:
            cls = None
            if position == "resid_post" and layer in self.index.pred:
                cls = str(self.index.pred[layer].cls[feature])
            self.G.add_node(nid, layer=layer, position=position, feature=feature,
                            score=float(score), role=role, **({"class": cls} if cls else {}))
        return nid

    def module_t(self, layer: int, origin: str) -> float:
        """The link threshold of an MLP or attention predecessor at `layer`."""
        if self.t_mod is not None:
            return self.t_mod
        entry = self.index.run.thresholds.get("layers", {}).get(str(layer), {}).get(origin)
        return float(entry["value"]) if entry else 0.15  # 0.15: the paper's figure

    def modules(self, layer: int, feature: int, target: str) -> None:
        """Link the best `mod_k` MLP and attention predecessors of a residual feature."""
        for origin in ("mlp", "attn"):
            for rank in range(self.mod_k):
                p = self.index.predecessor(layer, feature, origin, rank)
                if p is None or not p.similarity >= self.module_t(layer, origin):
                    break
                src = self.node(p.layer, p.position, p.feature, p.similarity, origin)
                self.G.add_edge(src, target, similarity=p.similarity, kind=origin)

    def backward(self, layer: int, feature: int, steps: int) -> None:
        """Follow the top-1 residual predecessor while it reaches t_res."""
        for _ in range(steps):
            here = feature_id(layer, "resid_post", feature)
            self.modules(layer, feature, here)
            p = self.index.predecessor(layer, feature, "res")
            if p is None or not p.similarity >= self.t_res:
                break
            self.G.add_edge(self.node(p.layer, p.position, p.feature, p.similarity, "res"), here,
                            similarity=p.similarity, kind="res")
            if p.position != "resid_post" or p.layer not in self.index.pred:
                break
            layer, feature = p.layer, p.feature

    def forward(self, layer: int, feature: int, steps: int, modules_at_start: bool) -> None:
        """Follow the top-1 residual successor while it reaches t_res."""
        if modules_at_start:
            self.modules(layer, feature, feature_id(layer, "resid_post", feature))
        for _ in range(steps):
            s = self.index.successor("resid_post", layer, feature)
            if s is None or not s.similarity >= self.t_res:
                break
            here = feature_id(layer, "resid_post", feature)
            nxt = self.node(s.layer, "resid_post", s.feature, s.similarity, "res")
            self.G.add_edge(here, nxt, similarity=s.similarity, kind="res")
            layer, feature = s.layer, s.feature
            self.modules(layer, feature, nxt)


def persistence(run: FlowRun | FlowIndex, t_res: float = 0.5) -> dict[int, np.ndarray]:
    """For each layer L: [n_features] how many further layers each R_L feature's top-1 forward
    chain stays at or above t_res (0 = its best successor is already below)."""
    index = run if isinstance(run, FlowIndex) else FlowIndex(run)
    layers = sorted(index.pred)
    out: dict[int, np.ndarray] = {}
    for L in reversed(layers):
        n = len(index.pred[L].cls)
        tops = index.succ.get(Slot("resid_post", L))
        if tops is None or tops.next_layer is None or tops.next_layer not in out:
            out[L] = np.zeros(n, np.int32)
            continue
        i, v = tops.top_i, tops.top_v
        ok = (i[:, 0] >= 0) & (v[:, 0] >= t_res)
        length = np.zeros(n, np.int32)
        length[ok] = 1 + out[tops.next_layer][i[ok, 0]]
        out[L] = length
    return {L: out[L] for L in layers}


def node_link(G: nx.DiGraph) -> dict:
    """{'directed', 'seed', 'thresholds', 'nodes': [{id, layer, position, feature, score, ...}],
    'links': [{source, target, similarity, kind}]}"""
    nodes = [{"id": n, **G.nodes[n]} for n in sorted(G, key=lambda n: (G.nodes[n]["layer"],
                                                                       -LANES[G.nodes[n]["position"]],
                                                                       G.nodes[n]["feature"]))]
    links = [{"source": u, "target": v, **d} for u, v, d in G.edges(data=True)]
    return {"directed": True, "seed": G.graph.get("seed"),
            "thresholds": {"t_res": G.graph.get("t_res"), "t_mod": G.graph.get("t_mod"),
                           "mod_k": G.graph.get("mod_k")},
            "nodes": nodes, "links": links}


def write_graph(G: nx.DiGraph, out_dir: str | Path, formats=("json", "graphml", "svg", "png"),
                title: str | None = None) -> dict[str, Path]:
    """graph.json (node-link), graph.graphml, graph.svg / graph.png (layered picture)."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if "json" in formats:
        write_json_atomic(out_dir / "graph.json", node_link(G))
        written["json"] = out_dir / "graph.json"
    if "graphml" in formats:
        H = nx.DiGraph()
        H.add_nodes_from((n, {k: v for k, v in d.items() if v is not None})
                         for n, d in G.nodes(data=True))
        H.add_edges_from(G.edges(data=True))
        H.graph.update({k: v for k, v in G.graph.items() if v is not None})
        with atomic_path(out_dir / "graph.graphml") as tmp:
            nx.write_graphml(H, tmp)
        written["graphml"] = out_dir / "graph.graphml"
    pics = [f for f in ("svg", "png") if f in formats]
    if pics:
        written.update(draw_graph(G, out_dir, pics, title=title))
    return written


POSITION_COLORS = {"resid_post": "#4c72b0", "resid_pre": "#4c72b0", "mlp_out": "#dd8452",
                   "attn_out": "#55a868", "attn_z": "#55a868", "mlp_raw": "#dd8452",
                   "attn_raw": "#55a868"}


def draw_graph(G: nx.DiGraph, out_dir: Path, formats=("svg", "png"),
               title: str | None = None) -> dict[str, Path]:
    """Layers on x, lanes (attention / residual / MLP) on y, edge width grows with similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = {}
    stacks: dict[tuple[int, float], int] = {}
    for n, d in sorted(G.nodes(data=True), key=lambda x: x[1]["feature"]):
        lane = LANES[d["position"]]
        j = stacks.get((d["layer"], lane), 0)
        stacks[(d["layer"], lane)] = j + 1
        pos[n] = (d["layer"], lane + 0.28 * j * (1 if lane >= 0 else -1))
    layers = [d["layer"] for _, d in G.nodes(data=True)] or [0]
    width = max(6.0, 0.9 * (max(layers) - min(layers) + 2))
    fig, ax = plt.subplots(figsize=(width, 4.2))
    for u, v, d in G.edges(data=True):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", lw=0.5 + 4.0 * max(d["similarity"], 0),
                                    color="#555555", alpha=0.75, shrinkA=9, shrinkB=9))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.06, f"{d['similarity']:.2f}", fontsize=6,
                ha="center", color="#333333")
    for n, d in G.nodes(data=True):
        x, y = pos[n]
        seed = n == G.graph.get("seed")
        ax.scatter([x], [y], s=260 if seed else 160, color=POSITION_COLORS[d["position"]],
                   edgecolors="black" if seed else "white", linewidths=2 if seed else 1, zorder=3)
        label = str(d["feature"])
        if d.get("label"):  # the activating tokens only (before " → "), short, so layers don't collide
            label += f"\n{d['label'].split(' → ')[0][:16]}"
        # Alternate the label height by layer so neighbours' labels do not overlap.
        ax.text(x, y - 0.2 - 0.16 * (d["layer"] % 2), label, fontsize=7, ha="center", va="top")
    ax.set_yticks([1, 0, -1], ["attention", "residual", "MLP"])
    ax.set_xlabel("layer")
    ax.set_xticks(sorted(set(layers)))
    ax.set_ylim(-1.8, 1.8)
    ax.set_xlim(min(layers) - 0.7, max(layers) + 0.7)
    ax.set_title(title or f"flow graph of {G.graph.get('seed')}  (t_res={G.graph.get('t_res')}, "
                          f"t_mod={G.graph.get('t_mod')})", fontsize=9)
    ax.grid(axis="x", alpha=0.2)
    fig.tight_layout()
    written = {}
    for f in formats:
        path = Path(out_dir) / f"graph.{f}"
        fig.savefig(path, dpi=150 if f == "png" else None)
        written[f] = path
    plt.close(fig)
    return written


def load_graph(path: str | Path) -> nx.DiGraph:
    """Read a graph.json written by write_graph back into networkx."""
    data = json.loads(Path(path).read_text())
    G = nx.DiGraph(seed=data.get("seed"), **(data.get("thresholds") or {}))
    for n in data["nodes"]:
        G.add_node(n["id"], **{k: v for k, v in n.items() if k != "id"})
    for e in data["links"]:
        G.add_edge(e["source"], e["target"], **{k: v for k, v in e.items()
                                                if k not in ("source", "target")})
    return G

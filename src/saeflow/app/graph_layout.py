"""Graphs as the page draws them: nodes laid out in lanes (residual, MLP, attention) by
layer, links marked 'chain' where a feature passes straight through, and pruning to a size
the browser can draw."""
from __future__ import annotations

from saeflow.app.encode import jsonable, num

LANES = {"resid_post": 0, "mlp_out": 1, "attn_out": 2, "attn_z": 2, "resid_pre": 0,
         "mlp_raw": 1, "attn_raw": 2,
         "resid_mid": 0, "mlp_in": 1, "transcoder": 1}
LANE_NAMES = ["residual", "MLP", "attention"]
MAX_GRAPH_NODES = 5000  # the most nodes a graph view returns


def prune(G, seeds: set[str], max_nodes: int) -> list[str]:
    """Keep the seeds, then the nodes reached through the strongest links (best-first)."""
    import heapq

    keep: list[str] = []
    seen = set()
    heap = [(-2.0, n) for n in seeds if n in G]
    heapq.heapify(heap)
    while heap and len(keep) < max_nodes:
        _, n = heapq.heappop(heap)
        if n in seen:
            continue
        seen.add(n)
        keep.append(n)
        for m in list(G.predecessors(n)) + list(G.successors(n)):
            if m not in seen:
                w = (G.edges[m, n] if G.has_edge(m, n) else G.edges[n, m])["similarity"]
                heapq.heappush(heap, (-float(w), m))
    return keep


def graph_json(G, t_res: float, meta: dict) -> dict:
    """Nodes with a lane layout (x = layer, y = lane band + rank in the band) and links.

    A link is 'chain' when it is a residual-to-residual link at or above t_res: the features
    that pass straight through."""
    groups: dict[tuple[int, int], list[str]] = {}
    for n, d in G.nodes(data=True):
        groups.setdefault((d["layer"], LANES.get(d["position"], 0)), []).append(n)
    widest = max((len(v) for v in groups.values()), default=1)
    band = max(widest, 1) + 1
    nodes = []
    for (L, lane), members in groups.items():
        members.sort(key=lambda n: (-G.nodes[n].get("score", 0.0), n))
        for r, n in enumerate(members):
            d = G.nodes[n]
            y = -(lane * band + (r - (len(members) - 1) / 2) * min(1.0, band / (len(members) + 1)))
            nodes.append({"id": n, "x": float(L), "y": float(y), "lane": LANE_NAMES[lane],
                          **{k: jsonable(v) for k, v in d.items()}})
    nodes.sort(key=lambda d: (d["layer"], d["y"]))
    links = []
    for u, v, d in G.edges(data=True):
        chain = (d.get("kind") == "res" and G.nodes[u]["position"] == "resid_post"
                 and G.nodes[v]["position"] == "resid_post" and d["similarity"] >= t_res)
        links.append({"source": u, "target": v, "similarity": num(d["similarity"]),
                      "kind": d.get("kind"), "chain": bool(chain)})
    return {"nodes": nodes, "links": links, "lanes": LANE_NAMES, "band": band, **meta}

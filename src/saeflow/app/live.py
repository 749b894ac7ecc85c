"""The parts of the web app that run the model: steering and the activations of a prompt.

The model and pack load on first use (a server that only browses never loads them). Each
steering call installs its edits inside its own CallScope and has its own RNG, so concurrent
requests do not see each other's edits (see interventions.CallScope).
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from saeflow.app.graph_layout import graph_json
from saeflow.errors import AppError, SaeflowError
from saeflow.ids import PRED_ORIGINS, Slot, feature_id, parse_feature
from saeflow.lm.hooks import capture
from saeflow.lm.model import load_model
from saeflow.saes.recipes import open_pack
from saeflow.steering.generate import decode, encode_prompt, generate
from saeflow.steering.plans import typical_activations


class LiveModel:
    """Model + pack, loaded once, shared by all requests."""

    def __init__(self, pack_spec: str | None = None, model_spec: str | None = None,
                 model=None, pack=None, run: Path | None = None):
        self.pack_spec, self.model_spec = pack_spec, model_spec
        self._model, self._pack = model, pack
        self.run = run
        self._lock = threading.Lock()
        self._sae_lock = threading.Lock()
        self._typical: dict = {}

    @property
    def available(self) -> bool:
        return self._model is not None or self.model_spec is not None

    def load(self):
        with self._lock:
            if self._model is None:
                if self.model_spec is None:
                    raise AppError("this server has no model: start it with --model "
                                       "(and --pack) to steer and to read prompts")

                self._model = load_model(self.model_spec)
            if self._pack is None:
                if self.pack_spec is None:
                    raise AppError("this server has no pack: start it with --pack PATH (or on a "
                                   "RUN holding a flow, which names its pack)")
                try:
                    self._pack = open_pack(self.pack_spec, model=self._model)
                except (SaeflowError, OSError) as e:  # the server's setup, not the request
                    raise AppError(f"cannot open the pack {self.pack_spec!r} ({e}); restart the "
                                   f"server with --pack PATH") from None
            # every SAE stays in memory: requests come and go, the SAEs do not change
            self._pack.max_cached = max(self._pack.max_cached, len(self._pack.entries))
        return self._model, self._pack

    def sae(self, position: str, layer: int):
        _, pack = self.load()
        with self._sae_lock:  # the pack's LRU cache is not thread-safe
            return pack.sae(position, layer)

    # --- the prompt view ----------------------------------------------------------------
    def activations(self, text: str, top_k: int = 8, flow_index=None, labels=None,
                    token: int | None = None, max_tokens: int = 128) -> dict:
        """Per token and SAE: the top_k active features; plus the subgraph of the features
        active at `token` (default: the last) linked by their data-free predecessors."""

        model, pack = self.load()
        ids = model.tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]  # [1, T]
        slots = sorted((Slot.of(k) for k in pack.entries), key=lambda s: (s.layer, s.position))
        acts = capture(model, ids, slots)
        T = ids.shape[1]
        tok_text = [model.tokenizer.decode([i]) for i in ids[0].tolist()]
        per_slot = []
        active: dict[str, float] = {}  # features active at the chosen token
        t_sel = T - 1 if token is None else max(0, min(int(token), T - 1))
        for slot in slots:
            sae = self.sae(slot.position, slot.layer)
            with torch.inference_mode():
                z = sae.encode(acts[slot][0].float().cpu())  # [T, d_sae]
            k = min(top_k, z.shape[1])
            val, idx = z.topk(k, dim=1)  # [T, k]
            rows = []
            for t in range(T):
                rows.append([{"feature": int(i), "activation": round(float(v), 4)}
                             for v, i in zip(val[t].tolist(), idx[t].tolist()) if v > 0])
            per_slot.append({"layer": slot.layer, "position": slot.position,
                             "n_active": (z > 0).sum(1).tolist(), "top": rows})
            for e in rows[t_sel]:
                active[slot.feature(e["feature"])] = e["activation"]
        graph = self._active_subgraph(active, flow_index) if flow_index is not None else None
        if graph is not None and labels is not None:
            lab = labels(list(graph))
            for n, info in lab.items():
                graph.nodes[n]["label"] = info.get("label")
        out = {"tokens": tok_text, "token": t_sel, "slots": per_slot}
        if graph is not None:

            out["graph"] = graph_json(graph, 0.0, {"n_total": graph.number_of_nodes(),
                                                   "pruned": False})
        return out

    @staticmethod
    def _active_subgraph(active: dict[str, float], flow_index, max_rank: int = 5):
        import networkx as nx

        G = nx.DiGraph()
        for n, a in active.items():
            L, p, f = parse_feature(n)
            G.add_node(n, layer=L, position=p, feature=f, score=a, activation=a, role="active")
        for n in list(G):
            L, p, f = parse_feature(n)
            if p != "resid_post" or L not in flow_index.pred:
                continue
            cls = flow_index.pred[L].cls[f]
            G.nodes[n]["class"] = str(cls)
            for origin in PRED_ORIGINS:
                for rank in range(max_rank):
                    match = flow_index.predecessor(L, f, origin, rank)  # PredecessorMatch
                    if match is None:
                        break
                    src = feature_id(match.layer, match.position, match.feature)
                    if src in G:
                        G.add_edge(src, n, similarity=match.similarity, kind=origin)
        return G

    # --- steering -----------------------------------------------------------------------
    def typical(self, plan):
        _, pack = self.load()
        key = tuple(sorted(plan.slots()))
        with self._lock:
            if key not in self._typical:
                self._typical[key] = typical_activations(pack, plan.slots(), run=self.run,
                                                         model=self._model)
            return self._typical[key]

    def steer(self, plan, prompt: str, cfg, on_token=None, force: bool = False) -> dict:
        """Default and steered completions, streamed through on_token(which, step, texts)."""

        model, pack = self.load()
        cfg.check(force)
        plan.check(pack, force=force)
        encode_prompt(model, prompt, cfg)
        typical = self.typical(plan) if plan.op == "add" else None
        out = {}
        for which in ("default", "steered"):
            toks: list[torch.Tensor] = []

            def cb(step, nxt, which=which, toks=toks):
                toks.append(nxt.clone())
                if on_token is not None:
                    on_token(which, step, decode(model, torch.stack(toks, 1)))
            out[which] = generate(model, prompt, cfg, plan if which == "steered" else None,
                                  pack, typical, on_token=cb, force=force)
        return {"prompt": prompt, "plan": plan.to_dict(), **out}

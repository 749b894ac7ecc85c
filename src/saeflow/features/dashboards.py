"""Feature dashboards from RUN/index, in two shapes.

`neuronpedia` (the default): SAEDashboard's Neuronpedia batch format, one batch per SAE at
RUN/dashboards/{layer}-{position}/batch-0.json, which SAEDashboard's NeuronpediaDashboardBatch
and Neuronpedia's importer read:

    {model_id, layer (int), sae_set, sae_id_suffix, features: [{
        feature_index, frac_nonzero,
        pos_str / pos_values, neg_str / neg_values            the decoder direction's logit lens
        freq_hist_data_bar_values / _heights                   nonzero activations (occupied bins)
        logits_hist_data_bar_values / _heights                 logit lens over the vocabulary
        neuron_alignment_indices / _values / _l1               largest decoder weights
        correlated_neurons_* / correlated_features_*           [] (see docs/decisions.md)
        decoder_weights_dist, n_prompts_total, n_tokens_in_prompt, dataset,
        activations: [{tokens, values, bin_min, bin_max, bin_contains,
                       qualifying_token_index}]}]}

Top examples form the group Neuronpedia shows as "Top Activations" (bin_min -1, bin_max the
feature's maximum, bin_contains -1, as SAEDashboard writes it); the uniform samples fall in
equal-width activation intervals, with bin_min / bin_max the interval's bounds and
bin_contains the share of the feature's nonzero activations inside it. The importer derives
maxValue, maxValueTokenIndex and minValue from `values`.

`saeflow`: one object per feature in the shape of Neuronpedia's feature pages (modelId,
layer "6-saeflow-resid_post", index, saeflowId, maxActApprox, activations with maxValue,
maxValueTokenIndex and minValue: the window's maximum, its token and minimum), as a JSON
list per SAE at RUN/dashboards/{layer}-{position}.json; the web app serves it per feature.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from saeflow.errors import FeatureIndexError, UsageError
from saeflow.features.tables import open_index
from saeflow.ids import Slot, feature_id
from saeflow.store import write_json_atomic

DASHBOARD_DIR = "dashboards"
FORMATS = ("neuronpedia", "saeflow")
N_INTERVALS = 5  # activation intervals the samples are grouped in
N_LOGIT_BINS = 40
N_ALIGNMENT = 10  # decoder weights listed per feature


def _source_id(layer: int, position: str) -> str:
    return f"{layer}-saeflow-{position}"


def _window(e: dict) -> tuple[list[str], list[float], int]:
    """(tokens, values, index of the activating token) with the window's padding dropped."""
    vals = [float(v) for v in e["acts"]]
    toks = list(e["tokens"])
    keep = [i for i, t in enumerate(toks) if t is not None]
    center = keep.index(int(e["center"])) if int(e["center"]) in keep else 0
    return [toks[i] for i in keep], [vals[i] for i in keep], center


def feature_dashboard(row: dict, hist_edges: list[float], model_id: str | None) -> dict:
    """One index row (FeatureIndex.feature / slot_features) -> saeflow's Neuronpedia-style
    feature object (the web app's /api/dashboard)."""
    L, pos, f = int(row["layer"]), str(row["position"]), int(row["feature"])
    centers, heights = _occupied_hist(row["hist"], hist_edges)
    acts = []
    for kind in ("examples", "samples"):
        for e in row.get(kind) or []:
            toks, vals, _ = _window(e)
            peak = max(range(len(vals)), key=vals.__getitem__) if vals else 0
            q = float(e["quantile"]) if e.get("quantile") is not None else None
            # maxValue is the window's maximum (Neuronpedia's meaning), which may sit on
            # another token than the one the example was chosen for.
            acts.append({"tokens": toks, "values": vals,
                         "maxValue": vals[peak] if vals else 0.0, "maxValueTokenIndex": peak,
                         "minValue": min(vals) if vals else 0.0,
                         "kind": "top" if kind == "examples" else "sample", "quantile": q})
    expl = []
    if row.get("explanation"):
        expl.append({"description": row["explanation"], "explanationModelName": "saeflow-explain"})
    if row.get("label"):
        expl.append({"description": row["label"], "explanationModelName": "saeflow-auto-label"})
    top, bottom = row.get("logit_top") or [], row.get("logit_bottom") or []
    return {
        "modelId": model_id, "layer": _source_id(L, pos), "index": f,
        "saeflowId": feature_id(L, pos, f),
        "frac_nonzero": float(row["density"]), "maxActApprox": float(row["max_act"]),
        "meanAct": float(row["mean_act"]),
        "pos_str": [t["token"] for t in top], "pos_values": [float(t["logit"]) for t in top],
        "neg_str": [t["token"] for t in bottom],
        "neg_values": [float(t["logit"]) for t in bottom],
        "freq_hist_data_bar_values": centers,
        "freq_hist_data_bar_heights": heights,
        "activations": acts, "explanations": expl,
        "neuronpediaUrl": row.get("neuronpedia"),
    }


def _occupied_hist(hist, edges: list[float]) -> tuple[list[float], list[int]]:
    """The index's log-spaced histogram cut to the bins from the first to the last occupied one
    (its fixed 1e-3..1e4 range leaves most bars empty): (geometric bin centres, counts)."""
    h = [int(x) for x in hist]
    used = [i for i, x in enumerate(h) if x]
    if not used:
        return [], []
    lo, hi = used[0], used[-1] + 1
    return ([math.sqrt(edges[i] * edges[i + 1]) for i in range(lo, hi)], h[lo:hi])


def _cdf(hist, edges: list[float], x: float) -> float:
    """Share of a feature's nonzero activations <= x, from its log-binned histogram
    (log-linear within a bin; the histogram clamps values outside its range into its ends)."""
    h = [float(v) for v in hist]
    total = sum(h)
    if total == 0:
        return 0.0
    below = 0.0
    for i, n in enumerate(h):
        a, b = edges[i], edges[i + 1]
        if x >= b and i < len(h) - 1:
            below += n
            continue
        if x > a:
            below += n * min(1.0, math.log(x / a) / math.log(b / a))
        break
    return min(1.0, below / total)


def _model_id(manifest: dict) -> str | None:
    """The model's name as Neuronpedia ids spell it: a local path gives its folder name."""
    name = (manifest.get("identity") or {}).get("model") or manifest.get("model")
    if not name:
        return None
    return Path(str(name)).name  # "google/gemma-2-2b" and "/models/gemma-2-2b": "gemma-2-2b"


def _activation(e: dict, bin_min: float, bin_max: float, bin_contains: float) -> dict:
    toks, vals, center = _window(e)
    return {"tokens": toks, "values": [round(v, 3) for v in vals], "bin_min": bin_min,
            "bin_max": bin_max, "bin_contains": bin_contains, "qualifying_token_index": center}


def _activations(row: dict, edges: list[float]) -> list[dict]:
    top = float(row["max_act"])
    out = [_activation(e, -1.0, top, -1.0) for e in row.get("examples") or []]
    if top <= 0:
        return out
    width = top / N_INTERVALS
    for e in row.get("samples") or []:
        i = min(int(float(e["activation"]) / width), N_INTERVALS - 1)
        lo, hi = i * width, (i + 1) * width
        share = _cdf(row["hist"], edges, hi) - _cdf(row["hist"], edges, lo)
        out.append(_activation(e, round(lo, 4), round(hi, 4), round(share, 4)))
    return out


def _decoder_facts(sae, logit_hist: dict | None, feature: int) -> dict:
    """neuron_alignment_* from the decoder row; the logit histogram from the logit lens."""
    out: dict = {"neuron_alignment_indices": [], "neuron_alignment_values": [],
                 "neuron_alignment_l1": [], "logits_hist_data_bar_values": [],
                 "logits_hist_data_bar_heights": []}
    if sae is not None:
        w = sae.W_dec[feature].float()  # [d_in]
        top = w.abs().topk(min(N_ALIGNMENT, w.numel()))
        l1 = float(w.abs().sum()) or 1.0
        out["neuron_alignment_indices"] = [int(i) for i in top.indices]
        out["neuron_alignment_values"] = [round(float(w[i]), 4) for i in top.indices]
        out["neuron_alignment_l1"] = [round(float(w[i]) / l1, 4) for i in top.indices]
    if logit_hist is not None:
        lo, hi = float(logit_hist["lo"][feature]), float(logit_hist["hi"][feature])
        if hi > lo:
            step = (hi - lo) / N_LOGIT_BINS
            out["logits_hist_data_bar_values"] = [round(lo + (i + 0.5) * step, 4)
                                                  for i in range(N_LOGIT_BINS)]
            out["logits_hist_data_bar_heights"] = [int(h) for h in logit_hist["heights"][feature]]
    return out


def neuronpedia_feature(row: dict, edges: list[float], corpus: dict, decoder: dict) -> dict:
    """One index row -> a feature of SAEDashboard's Neuronpedia batch format."""
    centers, heights = _occupied_hist(row["hist"], edges)
    top, bottom = row.get("logit_top") or [], row.get("logit_bottom") or []
    return {
        "feature_index": int(row["feature"]),
        **{k: decoder[k] for k in ("neuron_alignment_indices", "neuron_alignment_values",
                                   "neuron_alignment_l1")},
        # Same-SAE correlations; saeflow's statistics relate features across layers instead.
        "correlated_neurons_indices": [], "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [], "correlated_features_indices": [],
        "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": [t["token"] for t in bottom],
        "neg_values": [round(float(t["logit"]), 3) for t in bottom],
        "pos_str": [t["token"] for t in top],
        "pos_values": [round(float(t["logit"]), 3) for t in top],
        "frac_nonzero": float(row["density"]),
        "freq_hist_data_bar_values": [round(c, 4) for c in centers],
        "freq_hist_data_bar_heights": heights,
        "logits_hist_data_bar_heights": decoder["logits_hist_data_bar_heights"],
        "logits_hist_data_bar_values": decoder["logits_hist_data_bar_values"],
        "n_prompts_total": corpus["n_prompts_total"],
        "n_tokens_in_prompt": corpus["n_tokens_in_prompt"],
        "dataset": corpus["dataset"],
        "decoder_weights_dist": [],
        "activations": _activations(row, edges),
    }


def dashboard(run: str | os.PathLike, layer: int, position: str, feature: int) -> dict:
    """The dashboard of one feature of RUN's index (saeflow's shape)."""
    ix = open_index(run)
    row = ix.feature(layer, position, feature)
    return feature_dashboard(row, ix.manifest["hist_edges"], _model_id(ix.manifest))


LOGIT_ROWS = 256  # decoder rows per block of the logit histograms (~270 MB at Gemma 3's vocab)


def _slot_decoder(pack, model, L: int, pos: str):
    """(SAE or None, logit histograms {"lo", "hi": [d_sae], "heights": [d_sae][bins]} or None)
    for one slot."""
    if pack is None or (pos, L) not in pack:
        return None, None
    sae = pack.sae(pos, L)
    if model is None:
        return sae, None
    from saeflow.features.labels import unembed_directions
    from saeflow.lm.model import residual_mapping

    dirs = sae.W_dec.float().cpu()  # [d_sae, d_in]
    mapping = residual_mapping(model, pos, L)
    if mapping is not None:
        dirs = dirs @ mapping.to(dirs.device)  # -> [d_sae, d_model]
    # The histogram of each feature's logits over the vocabulary, in blocks of rows: the whole
    # [d_sae, vocab] matrix is 4 GB at 4096 x 262k.
    lo, hi, heights = [], [], []
    with torch.inference_mode():
        for i in range(0, dirs.shape[0], LOGIT_ROWS):
            logits = unembed_directions(model, dirs[i:i + LOGIT_ROWS]).cpu()  # [rows, vocab]
            lo.append(logits.min(1).values)
            hi.append(logits.max(1).values)
            heights += [torch.histc(r, bins=N_LOGIT_BINS, min=float(a), max=float(b))
                        for r, a, b in zip(logits, lo[-1], hi[-1])]
    return sae, {"lo": torch.cat(lo), "hi": torch.cat(hi), "heights": heights}


def export_dashboards(run: str | os.PathLike, out: str | os.PathLike | None = None,
                      slots: list[str] | None = None, format: str = "neuronpedia",
                      pack=None, model=None, model_id: str | None = None,
                      sae_set: str | None = None) -> list[Path]:
    """Write the dashboards of RUN's index, one SAE ("6/resid_post") at a time.

    format "neuronpedia": a batch per SAE (OUT/{layer}-{position}/batch-0.json). `pack` (default:
    the index's pack when its folder still exists) gives neuron_alignment_*, and `model` the
    logit histogram; without them those lists stay empty. model_id / sae_set: the ids
    Neuronpedia files the SAE under (default: the model's name, "saeflow-{position}").
    format "saeflow": a JSON list of saeflow's feature objects per SAE (OUT/{layer}-{position}.json).
    """
    if format not in FORMATS:
        raise UsageError(f"unknown dashboard format {format!r}; use one of {', '.join(FORMATS)}")
    ix = open_index(run)
    have = ix.manifest["slots"]
    slots = slots or sorted(have, key=lambda s: (Slot.parse(s).layer, s))
    unknown = [s for s in slots if s not in have]
    if unknown:
        raise FeatureIndexError(f"the index has no SAE at {', '.join(unknown)}; it has "
                                f"{', '.join(sorted(have)[:12])}")
    out = Path(out) if out else Path(run) / DASHBOARD_DIR
    out.mkdir(parents=True, exist_ok=True)
    edges = ix.manifest["hist_edges"]
    model_id = model_id or _model_id(ix.manifest)
    if format == "neuronpedia" and pack is None and Path(ix.manifest.get("pack_root") or
                                                         "/nonexistent").exists():
        from saeflow.saes.packs import load_pack

        pack = load_pack(ix.manifest["pack_root"])
    attach_lens = getattr(ix, "attach_lens", None)  # an index that computes its lens on demand
    if attach_lens is not None and pack is not None and model is not None:
        attach_lens(pack, model)
    cfg = (ix.manifest.get("identity") or {}).get("config") or {}
    ctx = int(cfg.get("ctx_len") or 0)
    corpus = {"n_prompts_total": int(ix.manifest.get("tokens", 0)) // ctx if ctx else 0,
              "n_tokens_in_prompt": ctx, "dataset": str(cfg.get("corpus") or "")}
    written = []
    for slot in slots:
        pos, L = Slot.parse(slot)
        rows = ix.slot_features(L, pos)
        if format == "saeflow":
            path = out / f"{L}-{pos}.json"
            write_json_atomic(path, [feature_dashboard(r, edges, model_id) for r in rows])
        else:
            sae, logits = _slot_decoder(pack, model, L, pos)
            feats = [neuronpedia_feature(r, edges, corpus, _decoder_facts(sae, logits, r["feature"]))
                     for r in rows]
            path = out / f"{L}-{pos}" / "batch-0.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"model_id": model_id, "layer": L,
                                     "sae_set": sae_set or f"saeflow-{pos}",
                                     "sae_id_suffix": None, "features": feats})
        written.append(path)
    return written

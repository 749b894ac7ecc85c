"""What the flow matches: which SAEs feed which (`layer_slots`), their feature directions in
residual space (`slot_directions`), and the checks that the pack's files are what its manifest
says before any cached match is reused."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import saeflow.saes.formats as sae_formats
from saeflow.errors import FlowError, MatchError
from saeflow.flow.match import Directions, SafetensorsRows, TensorDirections
from saeflow.ids import Slot
from saeflow.lm.model import (
    MAPPED_POSITIONS,
    RESIDUAL_SPACE,
    attn_z_mapping,
    raw_mapping,
    residual_mapping,
)
from saeflow.store import file_digest

ATTENTION_POSITIONS = ("attn_out", "attn_z", "attn_raw")  # first present is used
MLP_POSITIONS = ("mlp_out", "mlp_raw")


@dataclass
class LayerSlots:
    """The residual SAE of one layer and the SAEs its features are matched against."""

    layer: int
    resid: Slot  # resid_post at `layer`
    preds: dict[str, Slot | None]  # origin ("res", "mlp", "attn") -> its SAE, None: the pack has none

    def __post_init__(self):  # plain (position, layer) tuples are accepted
        self.resid = Slot.of(self.resid)
        self.preds = {origin: Slot.of(s) if s else None for origin, s in self.preds.items()}


def layer_slots(pack, layers: list[int] | None = None) -> list[LayerSlots]:
    """Residual SAE and predecessor slots per layer; clear errors for gaps and width mismatches."""
    res_layers = pack.layers("resid_post")
    if not res_layers:
        raise FlowError(f"the pack at {pack.root} has no resid_post SAEs; feature flow matches "
                        f"residual features to their predecessors (it has: "
                        f"{', '.join(pack.positions) or 'nothing'})")
    want = sorted(set(layers)) if layers else res_layers
    missing = [L for L in want if Slot("resid_post", L) not in pack]
    if missing:
        raise FlowError(f"the pack has no resid_post SAE at layers {missing}; choose layers among "
                        f"{res_layers} (--layers)")
    attn_pos = next((p for p in ATTENTION_POSITIONS if p in pack.positions), None)
    mlp_pos = next((p for p in MLP_POSITIONS if p in pack.positions), None)
    gaps = [f"{pos} {L}" for pos in (mlp_pos, attn_pos) if pos is not None
            for L in want if Slot(pos, L) not in pack]
    if gaps:
        raise FlowError(f"the pack lacks SAEs at: {', '.join(gaps)}; every chosen layer needs the "
                        f"same predecessor positions (restrict --layers, or add the SAEs)")

    def held(position: str | None, layer: int) -> Slot | None:
        return Slot(position, layer) if position and Slot(position, layer) in pack else None

    chosen = [LayerSlots(L, Slot("resid_post", L),
                         {"res": held("resid_post", L - 1) or held("resid_pre", L),
                          "mlp": held(mlp_pos, L), "attn": held(attn_pos, L)})
              for L in want]
    _check_residual_widths(pack, chosen)
    return chosen


def _check_residual_widths(pack, chosen: list[LayerSlots]) -> None:
    """Refuse residual-space SAEs that disagree on d_model (they cannot come from one model)."""
    d_in: dict[Slot, int] = {}
    for entry in chosen:
        for slot in [entry.resid, *entry.preds.values()]:
            if slot and slot.position in RESIDUAL_SPACE:
                d_in[slot] = pack.info(*slot).d_in
    if len(set(d_in.values())) > 1:
        by: dict[int, list[str]] = {}
        for slot, d in d_in.items():
            by.setdefault(d, []).append(f"{slot.position} {slot.layer}")
        detail = "; ".join(f"d_in {d}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}"
                           for d, v in by.items())
        raise FlowError(f"the residual-space SAEs of this pack disagree on d_model ({detail}); "
                        f"they cannot come from one model")


# the decoder matrix of formats whose weights can be read in row blocks from disk
_LAZY = {"saelens": ("sae_weights.safetensors", "W_dec"),
         "gemmascope2": ("params.safetensors", "w_dec"),
         "sparsify": ("sae.safetensors", "W_dec")}


def _residual_projection(pack, slot: Slot, model):
    """The map of `slot`'s space into the residual stream (None: it is residual already)."""
    info = pack.info(*slot)
    if slot.position == "attn_z":
        if model is None:
            raise FlowError("the pack's attention SAEs sit at attn_z (head space); mapping them "
                            "into the residual needs the model's W_O: pass --model")
        if info.d_in != model.width("attn_z"):
            raise FlowError(f"attn_z SAE at layer {slot.layer} has d_in {info.d_in}, but the "
                            f"model's n_heads*d_head is {model.width('attn_z')}")
        return attn_z_mapping(model, slot.layer)
    if slot.position in ("mlp_raw", "attn_raw"):
        if model is None:
            raise FlowError(f"the pack has {slot.position} SAEs (the raw module output, before "
                            f"any post-norm); mapping them into the residual needs the model's "
                            f"norm weights: pass --model")
        return raw_mapping(model, slot.position, slot.layer)
    return None


def slot_directions(pack, slot: tuple[str, int], method: str = "decoder",
                    model=None, drop_dims: list[int] | None = None) -> Directions:
    """The slot's feature directions in residual space, for `method`, readable in blocks;
    `drop_dims`: residual coordinates set to zero before the rows are normalised."""
    slot = Slot.of(slot)
    info = pack.info(*slot)
    project = _residual_projection(pack, slot, model)
    label = str(slot)
    if method in ("decoder", "permutation") and info.format in _LAZY:
        fname, key = _LAZY[info.format]
        try:
            return SafetensorsRows(info.path / fname, key, label=label, project=project,
                                   drop_dims=drop_dims)
        except (MatchError, OSError):
            pass  # fall back to loading the SAE

    sae = sae_formats.load(info.path, info.format)
    if method == "encoder":
        return TensorDirections(sae.W_enc.T, label=label, project=project, drop_dims=drop_dims)
    scale = None
    if method == "folded":
        # SAE Match: rank by the dot product of threshold-folded decoder rows theta * W_dec.
        # Divided by the target's mean folded norm, so scores stay on a cosine-like scale.
        norms = sae.decoder_norms()
        if sae.threshold is not None and sae.activation == "jumprelu":
            norms = norms * sae.threshold.float()
        scale = norms / norms.mean().clamp_min(1e-12)
    return TensorDirections(sae.W_dec, label=label, project=project, row_scale=scale,
                            drop_dims=drop_dims)


def mapping_fingerprint(pack, model) -> str | None:
    """A digest of the maps that bring the pack's non-residual SAEs into the residual stream
    (None: the pack has none, or no model maps them)."""
    mapped = [p for p in MAPPED_POSITIONS if p in pack.positions]
    if not mapped or model is None:
        return None
    h = hashlib.sha256()
    for pos in mapped:
        for L in pack.layers(pos):
            m = residual_mapping(model, pos, L)
            h.update(pos.encode() + (m.numpy().tobytes() if m is not None else b"identity"))
    return h.hexdigest()


WEIGHT_FILES = {"saelens": sae_formats.SAELENS_WEIGHTS, "gemmascope2": "params.safetensors",
                "sparsify": "sae.safetensors"}


def check_pack_files(pack) -> None:
    """Refuse a pack whose SAE files are not what its manifest says, before any cached match is
    reused: the cache is keyed by pack.json's hashes, so a garbage or changed weights file
    would otherwise be reported as "reused cached matches". Tensor headers are parsed, and
    each weights file's sha256 is compared with pack.json's (memoised by size and mtime, so a
    pack is hashed once, not on every run)."""
    for slot, info in sorted(pack.entries.items()):
        problems = sae_formats.check_files(Path(info.path), info.format)
        want = info.extra.get("sha256")
        weights = Path(info.path) / WEIGHT_FILES.get(info.format, "")
        if not problems and want and weights.is_file() and file_digest(weights) != want:
            problems = [f"{weights.name} was changed after the pack was written (its sha256 "
                        f"differs from pack.json's)"]
        if problems:
            raise FlowError(f"the SAE at {Slot.of(slot)} ({info.path}) is corrupt: "
                            f"{'; '.join(problems)}; run `saeflow pack inspect {pack.root} "
                            f"--verify`, then retrain, re-fetch or re-convert the pack")

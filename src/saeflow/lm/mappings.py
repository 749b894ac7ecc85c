"""The linear maps that take an SAE's directions at a position into the residual stream
(attn_z through W_O, a raw MLP / attention output through its post-norm), and how to name
them in manifests."""
from __future__ import annotations

import torch

RESIDUAL_SPACE = ("resid_pre", "resid_post", "mlp_out", "attn_out", "mlp_raw", "attn_raw")


def attn_z_mapping(model, layer: int) -> torch.Tensor:
    """[n_heads*d_head, d_model]: head-space direction -> residual direction (W_O, norm gain)."""
    n_z = model.width("attn_z")
    return model.attn_z_to_residual(torch.eye(n_z), layer).cpu()  # consumed on the host


# Positions whose directions need the model to reach the residual stream.
MAPPED_POSITIONS = ("attn_z", "mlp_raw", "attn_raw")


def raw_mapping(model, position: str, layer: int) -> torch.Tensor | None:
    """[d_model, d_model] diag(1 + w) of the post-norm after a raw MLP / attention output.

    The RMSNorm also divides each token by its RMS, a positive scalar that leaves directions
    unchanged. None where the family has no post-norm (raw and *_out are then the same site).
    """
    norm = {"mlp_raw": model.arch.post_mlp_norm, "attn_raw": model.arch.post_attn_norm}[position]
    if not norm:
        return None
    w = model.layer_module(layer).get_submodule(norm).weight.detach().float().cpu()  # [d_model]
    return torch.diag(1.0 + w)


def residual_mapping(model, position: str, layer: int) -> torch.Tensor | None:
    """[width, d_model] taking a position's directions into the residual; None if identity."""
    if position == "attn_z":
        return attn_z_mapping(model, layer)
    if position in ("mlp_raw", "attn_raw"):
        return raw_mapping(model, position, layer)
    return None


def describe_mapping(model, position: str) -> str:
    if position in ("mlp_raw", "attn_raw"):
        norm = {"mlp_raw": model.arch.post_mlp_norm, "attn_raw": model.arch.post_attn_norm}
        return (f"{position} mapped to the residual through {norm[position]} (1 + w)"
                if norm[position] else position)
    if position != "attn_z":
        return position
    gain = " * (1 + post-attention norm weight)" if model.arch.post_attn_norm else ""
    return f"attn_z mapped to the residual through W_O ({model.arch.o_proj}){gain}"

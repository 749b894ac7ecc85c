"""Per-architecture table of hook points: position name <-> HF module path <-> TransformerLens name.

A hook point is one (position, layer) pair. Each position is read at one module of the
Hugging Face model, either at its input or at its output:

    resid_pre   input of decoder layer L          (blocks.L.hook_resid_pre)
    resid_post  output of decoder layer L         (blocks.L.hook_resid_post)
    attn_out    attention output added to the residual (after Gemma's post-attention norm)
    mlp_out     MLP output added to the residual (after Gemma's post-feedforward norm)
    attn_z      input of the attention output projection: concatenated head outputs
    mlp_raw     the MLP module's own output, before any post-norm (HF `layers.L.mlp`)
    attn_raw    the attention module's own output, before any post-norm (HF `layers.L.self_attn`)

mlp_raw / attn_raw differ from mlp_out / attn_out only where the family has sandwich norms
(Gemma 2/3): there the raw output is rescaled per token by RMSNorm before it joins the
residual, so the two are different sites (RMS 0.003 against 0.94 on a tiny Gemma 3).
Elsewhere they are the same module, and names are mapped to mlp_out / attn_out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from saeflow.errors import ConfigError, UnknownPositionError, UnsupportedArchitectureError
from saeflow.ids import POSITIONS, check_position

__all__ = ["POSITIONS", "check_position"]  # re-exported: they live in ids.py, below lm/
# Positions that are the raw module output, distinct from *_out only under a post-norm.
RAW_POSITIONS = {"mlp_raw": "mlp_out", "attn_raw": "attn_out"}

TL_NAMES: dict[str, str] = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "attn_z": "blocks.{L}.attn.hook_z",
}
# TransformerLens has no hook on the raw MLP / attention output of a sandwich-norm block;
# saeflow names those sites the HF way (what sparsify calls them).
HF_RAW_NAMES: dict[str, str] = {"mlp_raw": "layers.{L}.mlp", "attn_raw": "layers.{L}.self_attn"}


@dataclass(frozen=True)
class Site:
    """Where a position is read: a module path relative to the decoder layer, and input/output."""

    module: str  # relative to the decoder layer; "" is the layer itself
    io: str  # "input" or "output"


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]
    layers_path: str  # path of the ModuleList of decoder layers
    sites: dict[str, Site]
    o_proj: str  # attention output projection, relative to the layer
    o_proj_is_conv1d: bool  # GPT-2's Conv1D stores weight as [in, out]
    # Gemma's sandwich norm after attention: RMSNorm with gain (1 + w). None elsewhere.
    post_attn_norm: str | None
    final_norm: str
    post_mlp_norm: str | None = None  # Gemma's post-feedforward RMSNorm; None elsewhere

    @property
    def has_post_norms(self) -> bool:
        """True where mlp_raw / attn_raw are sites distinct from mlp_out / attn_out."""
        return self.post_attn_norm is not None

    def hf_module(self, position: str, layer: int) -> str:
        site = self.sites[check_position(position)]
        base = f"{self.layers_path}.{layer}"
        return f"{base}.{site.module}" if site.module else base

    def hf_name(self, position: str, layer: int) -> str:
        """Module path plus `.input`/`.output`, the style of Gemma Scope 2 configs."""
        return f"{self.hf_module(position, layer)}.{self.sites[position].io}"

    def tl_name(self, position: str, layer: int) -> str | None:
        """TransformerLens name, or None for a raw site TransformerLens does not hook."""
        check_position(position)
        if position in RAW_POSITIONS:
            if self.has_post_norms:
                return None
            position = RAW_POSITIONS[position]
        return TL_NAMES[position].format(L=layer)


_GEMMA_SITES = {
    "resid_pre": Site("", "input"),
    "resid_post": Site("", "output"),
    "attn_out": Site("post_attention_layernorm", "output"),
    "mlp_out": Site("post_feedforward_layernorm", "output"),
    "attn_z": Site("self_attn.o_proj", "input"),
    "mlp_raw": Site("mlp", "output"),
    "attn_raw": Site("self_attn", "output"),
}
_LLAMA_SITES = {
    "resid_pre": Site("", "input"),
    "resid_post": Site("", "output"),
    "attn_out": Site("self_attn", "output"),
    "mlp_out": Site("mlp", "output"),
    "attn_z": Site("self_attn.o_proj", "input"),
    "mlp_raw": Site("mlp", "output"),  # no post-norm: the same site as mlp_out
    "attn_raw": Site("self_attn", "output"),
}
_GPT2_SITES = {
    "resid_pre": Site("", "input"),
    "resid_post": Site("", "output"),
    "attn_out": Site("attn", "output"),
    "mlp_out": Site("mlp", "output"),
    "attn_z": Site("attn.c_proj", "input"),
    "mlp_raw": Site("mlp", "output"),
    "attn_raw": Site("attn", "output"),
}

ARCHITECTURES: dict[str, Architecture] = {
    a.family: a
    for a in [
        Architecture("gemma2", ("gemma2",), "model.layers", _GEMMA_SITES, "self_attn.o_proj",
                     False, "post_attention_layernorm", "model.norm",
                     "post_feedforward_layernorm"),
        Architecture("gemma3", ("gemma3_text",), "model.layers", _GEMMA_SITES,
                     "self_attn.o_proj", False, "post_attention_layernorm", "model.norm",
                     "post_feedforward_layernorm"),
        Architecture("llama", ("llama",), "model.layers", _LLAMA_SITES, "self_attn.o_proj",
                     False, None, "model.norm"),
        Architecture("qwen2", ("qwen2",), "model.layers", _LLAMA_SITES, "self_attn.o_proj",
                     False, None, "model.norm"),
        Architecture("qwen3", ("qwen3",), "model.layers", _LLAMA_SITES, "self_attn.o_proj",
                     False, None, "model.norm"),
        Architecture("gpt2", ("gpt2",), "transformer.h", _GPT2_SITES, "attn.c_proj",
                     True, None, "transformer.ln_f"),
    ]
}


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ARCHITECTURES.values())
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported families: {supported}"
    )


# Hook names as SAE configs spell them -> (position, layer). Order matters: specific first.
_LAYER = r"(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)"
_HOOK_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), "resid_pre"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "resid_post"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), "attn_out"),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "mlp_out"),
    (re.compile(r"^blocks\.(\d+)\.attn\.hook_z$"), "attn_z"),
    (re.compile(rf"^{_LAYER}\.self_attn\.o_proj\.input$"), "attn_z"),
    (re.compile(rf"^{_LAYER}\.post_feedforward_layernorm(?:\.output)?$"), "mlp_out"),
    (re.compile(rf"^{_LAYER}\.post_attention_layernorm(?:\.output)?$"), "attn_out@gemma"),
    (re.compile(rf"^{_LAYER}\.mlp(?:\.output)?$"), "mlp_raw"),
    (re.compile(rf"^{_LAYER}\.self_attn(?:\.output)?$"), "attn_raw"),
    (re.compile(rf"^{_LAYER}\.input$"), "resid_pre"),
    (re.compile(rf"^{_LAYER}(?:\.output)?$"), "resid_post"),
    (re.compile(r"^(?:transformer\.)?h\.(\d+)\.attn\.c_proj\.input$"), "attn_z"),
    (re.compile(r"^(?:transformer\.)?h\.(\d+)\.attn(?:\.output)?$"), "attn_out"),
    (re.compile(r"^(?:transformer\.)?h\.(\d+)\.mlp(?:\.output)?$"), "mlp_out"),
    (re.compile(r"^(?:transformer\.)?h\.(\d+)\.input$"), "resid_pre"),
    (re.compile(r"^(?:transformer\.)?h\.(\d+)(?:\.output)?$"), "resid_post"),
]


def parse_hook_name(name: str, family: str | None = None) -> tuple[str, int]:
    """Map a TransformerLens or HF-style hook name to (position, layer).

    HF names are placed by what the module is in the model's family, never by its name alone:
    `post_attention_layernorm` is the attention output only in Gemma (sandwich norms); in
    Llama, Qwen and most others it is the norm *before* the MLP, which saeflow has no position
    for. So it is refused when `family` is unknown or has no such post-norm, and a module the
    family does not have (`post_feedforward_layernorm` in Llama) is refused too.

    HF `layers.L.mlp` / `layers.L.self_attn` are the raw module outputs: mlp_raw / attn_raw
    in Gemma (before its post-norm), and when the family is unknown; mlp_out / attn_out in a
    family without post-norms, where they are the same site.
    """
    name = name.strip()
    for pattern, position in _HOOK_PATTERNS:
        m = pattern.match(name)
        if not m:
            continue
        layer = int(m.group(1))
        if position == "attn_out@gemma":
            if has_post_norms(family) is not True:
                raise UnknownPositionError(_post_attention_norm_refusal(name, family))
            position = "attn_out"
        elif position == "mlp_out" and "post_feedforward_layernorm" in name \
                and has_post_norms(family) is False:
            raise UnknownPositionError(
                f"{name!r}: the {family} family has no post_feedforward_layernorm; is the SAE "
                f"for another model? Pass the right --family or --model")
        if position in RAW_POSITIONS:
            position = raw_position(position, family)
        return position, layer
    raise UnknownPositionError(
        f"cannot map hook name {name!r} to a position; expected a TransformerLens name such as "
        f"'blocks.12.hook_resid_post' or an HF module path such as 'model.layers.12' / "
        f"'model.layers.12.post_feedforward_layernorm.output'"
    )


def _post_attention_norm_refusal(name: str, family: str | None) -> str:
    if has_post_norms(family) is None:
        known = f"the family {family!r} is not one saeflow knows, so it " if family else ""
        return (f"{name!r} is the attention output in Gemma 2/3 but the norm before the MLP in "
                f"Llama, Qwen and most other families; {known or 'saeflow '}cannot tell which "
                f"without the model: pass --model (or --family gemma3, llama, ...)")
    return (f"{name!r} is the norm before the MLP in the {family} family (its output is the "
            f"MLP's input), a site saeflow has no position for; such an SAE cannot be placed")


def written_hook_name(position: str, layer: int) -> str:
    """The hook name saeflow writes in an SAE's cfg: TransformerLens's where it has one."""
    check_position(position)
    return (HF_RAW_NAMES if position in RAW_POSITIONS else TL_NAMES)[position].format(L=layer)


def has_post_norms(family: str | None) -> bool | None:
    """Whether a family has Gemma-style post-norms (None: family unknown)."""
    if family is None:
        return None
    arch = ARCHITECTURES.get(family) or ARCHITECTURES.get(
        {"gemma": "gemma2", "qwen": "qwen2", "smollm": "llama"}.get(family, ""))
    if arch:
        return arch.has_post_norms
    return True if family.startswith("gemma") else None  # a family saeflow does not know


def raw_position(position: str, family: str | None) -> str:
    """mlp_raw -> mlp_out (attn_raw -> attn_out) in a family where they are the same site."""
    if position in RAW_POSITIONS and has_post_norms(family) is False:
        return RAW_POSITIONS[position]
    return position


def parse_layers(spec: str | None, n_layers: int | None) -> list[int] | None:
    """'all', '0-5', '1,3,7-9' -> sorted layer list; None/'all' without n_layers -> None."""
    if spec is None or spec == "all":
        return list(range(n_layers)) if n_layers is not None else None
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            layers.update(range(int(lo), int(hi) + 1))
        else:
            layers.add(int(part))
    out = sorted(layers)
    if n_layers is not None:
        bad = [L for L in out if not 0 <= L < n_layers]
        if bad:
            raise ConfigError(f"layer(s) {bad} out of range: the model has layers 0..{n_layers - 1}")
    return out

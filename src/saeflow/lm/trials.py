"""One-token trials over a clean prefix's KV cache.

A trial removes some SAE features at one token (h_slot <- h_slot - amount * W_dec[feature] /
input_scale, at that token only) and reads the target SAE's codes at R_L on the same token.
Removals change nothing before the token, so every trial is a one-token forward over the clean
prefix's KV cache, and the rows of one layer run as a batch.

The layers below the first block a chunk of trials changes are the clean forward's at that
token, so with `clean_h` (the clean residual stream after every layer at the token) they are
skipped: a trial at R_L usually runs block L alone. `path_error` tells whether that shortcut
reproduces the model's forward (the caller checks the unedited row against the clean forward).

The SAEs are read through `W_dec`, `input_scale`, `d_in`, `pre_acts` and `activate` only.
"""
from __future__ import annotations

import copy
import inspect
import math
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple

import torch

from saeflow.ids import Slot
from saeflow.lm.hooks import HookPoint, Hooks, model_body

# The largest relative error of an unedited trial row against the clean forward that is accepted.
PATH_TOLERANCE = 5e-2


class Removal(NamedTuple):
    """One feature taken out at the token: h_slot <- h_slot - amount * W_dec[feature] / scale."""
    slot: Slot | tuple[str, int]
    feature: int
    amount: float


class TrialKey(NamedTuple):
    """A trial: the removals (sorted) made before reading R_layer at the token."""
    layer: int
    removed: tuple[Removal, ...]


def trial_key(layer: int, removed) -> TrialKey:
    """The key of the trial that removes `removed` (Removals, any order) and reads R_layer."""
    return TrialKey(layer, tuple(sorted(Removal(*r) for r in removed)))


def cache_kwarg(body) -> str:
    """The forward's name for the KV cache: `cache` (newer transformers) or `past_key_values`."""
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.hf.config)
    except TypeError:  # older transformers
        return DynamicCache()


@contextmanager
def skipping_layers(model, start: int, h_prev: torch.Tensor | None, n: int) -> Iterator[None]:
    """Skip decoder layers 0..start-1 of the next forward: layer start-1 returns `h_prev`
    ([d_model], the clean residual stream after it at the token, for all n rows) and the
    layers below it pass their input through. Hooks on those layers still fire (an edit at
    resid_post start-1 applies to h_prev). Nothing is skipped when start is 0."""
    if start <= 0 or h_prev is None:
        yield
        return
    mods = [model.layer_module(i) for i in range(start)]
    value = h_prev.reshape(1, 1, -1).expand(n, 1, -1).contiguous()  # [n, 1, d_model]

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def constant(*args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return value.to(device=x.device, dtype=x.dtype)

    try:
        for i, m in enumerate(mods):
            m.forward = constant if i == start - 1 else passthrough
        yield
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


def trial_cache(prefix, n: int, lo: int, hi: int):
    """The clean prefix's KV cache for n trial rows. When the layers below `lo` are skipped,
    only layers lo..hi (the ones the rows run) are copied and repeated n times; the others stay
    shared and unrepeated (they never run; only their lengths are read, for the masks)."""
    layers = getattr(prefix, "layers", None)
    if lo <= 0 or not isinstance(layers, list):
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(n)
        return cache
    cache = copy.copy(prefix)
    cache.layers = list(layers)
    for i in range(lo, min(hi, len(layers) - 1) + 1):
        layer = copy.deepcopy(layers[i])
        layer.batch_repeat_interleave(n)
        cache.layers[i] = layer
    return cache


def first_block(chunk, layer: int) -> int:
    """The first decoder layer a chunk's removals change: block j for an edit inside it
    (mlp_out j, attn_out j, ...), j + 1 for resid_post j; `layer` when nothing is removed."""
    start = layer
    for _, removed in chunk:
        for (position, j), _, _ in removed:
            start = min(start, j + 1 if position == "resid_post" else j)
    return max(start, 0)


def _prefix_cache(model, body, cache_kw: str, input_ids: torch.Tensor, t: int, deepest: int):
    """The clean prefix's keys and values (tokens before t, layers <= deepest); None at t = 0."""
    if t <= 0:
        return None
    prefix = new_cache(model)
    with torch.inference_mode(), Hooks(model, capture=[HookPoint("resid_post", deepest)],
                                       stop_early=True):
        body(input_ids=input_ids[:, :t], use_cache=True, **{cache_kw: prefix})
    return prefix


def _removal_edits(chunk, saes, device) -> dict:
    """{hook point: edit} subtracting each row's removals at its place ([n, 1, d_in] deltas)."""
    n = len(chunk)
    deltas: dict[Any, torch.Tensor] = {}
    for row, (_, removed) in enumerate(chunk):
        for slot, feature, amount in removed:
            sae = saes[slot]
            if slot not in deltas:
                deltas[slot] = torch.zeros(n, 1, sae.d_in, device=device)
            v = sae.W_dec[feature].float() / sae.input_scale  # [d_model]
            deltas[slot][row, 0] -= amount * v
    return {HookPoint(*s): (lambda d: (lambda act: act + d.to(act.dtype)))(d)
            for s, d in deltas.items()}


def run_token(model, saes, input_ids, t, removal_sets, batch_rows, clean_h=None) -> dict:
    """Run every trial row of token t: {layer: (activations, pre-activations)} of R_L at t, each
    [n_rows_of_that_layer, d_sae], rows in the order of their keys (by row number).
    `removal_sets`: {TrialKey: row number}; `saes`: {slot: SAE}, R_L's among them.

    Every row is a one-token forward over the clean prefix's KV cache. With `clean_h` ({layer j:
    the clean resid_post j at t [d_model]}) the layers below the first block a chunk's removals
    change are skipped (they are the same for every row: the clean residual stream)."""
    body = model_body(model)
    cache_kw = cache_kwarg(body)
    keys = sorted(removal_sets, key=lambda k: (k[0], removal_sets[k]))
    prefix = _prefix_cache(model, body, cache_kw, input_ids, t, max(k[0] for k in keys))
    token = input_ids[:, t:t + 1]  # [1, 1]
    z_new: dict[int, list[torch.Tensor]] = {}
    pre_new: dict[int, list[torch.Tensor]] = {}
    by_layer: dict[int, list] = {}
    for k in keys:
        by_layer.setdefault(k[0], []).append(k)
    for L, lkeys in by_layer.items():
        sae_t = saes[("resid_post", L)]
        for a in range(0, len(lkeys), batch_rows):
            chunk = lkeys[a:a + batch_rows]
            n = len(chunk)
            edits = _removal_edits(chunk, saes, model.device)
            start = first_block(chunk, L) if clean_h is not None else 0
            cache = None if prefix is None else trial_cache(prefix, n, start, L)
            out = HookPoint("resid_post", L)
            with torch.inference_mode(), \
                    skipping_layers(model, start, (clean_h or {}).get(start - 1), n), \
                    Hooks(model, capture=[out], edits=edits, stop_early=True) as h:
                body(input_ids=token.expand(n, 1), use_cache=cache is not None,
                     **{cache_kw: cache})
            x = h.activations[out][:, 0]  # [n, d_model]
            with torch.inference_mode():
                pre = sae_t.pre_acts(x)  # [n, d_sae]
                z_new.setdefault(L, []).append(sae_t.activate(pre).float())
                pre_new.setdefault(L, []).append(pre.float())
    return {L: (torch.cat(z_new[L]), torch.cat(pre_new[L])) for L in z_new}


def path_error(z_rows: dict, clean_pre: dict) -> float:
    """How far the unedited trial rows are from the clean forward's pre-activations of R_L at
    the token: max |error| / max |pre-activation| over the layers (float noise: ~1e-6 in
    float32, ~1e-2 in bfloat16; a broken path: ~1)."""
    worst = 0.0
    for L, (_, pres) in z_rows.items():
        ref = clean_pre[L].float()
        err = float((pres[0] - ref).abs().max())  # row 0 of each layer: the unedited one
        worst = max(worst, err / max(float(ref.abs().max()), 1e-6))
    return worst if math.isfinite(worst) else math.inf

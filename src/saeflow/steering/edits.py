"""Edits that apply a steering plan inside one call, and the tokens they never touch.

A plan's edit at each hook point (`plan_edits`):
    add      h <- h + s * a_typ * W_dec[f]     s in units of the feature's typical activation
    rescale  h <- h + (r - 1) * z_f * W_dec[f] z_f the feature's current activation: r = 0
                                                deactivates, r < 0 inverts
applied at every token or at the plan's token positions (0-based, over prompt + generated
tokens). Each edit only acts inside the call that made it (a context variable, `CallScope`),
so concurrent calls on one model never see each other's interventions.

Special tokens are never edited: BOS, EOS, PAD, separators and chat markers (the tokenizer's
special ids) and padding positions keep their activations bit for bit. The SAEs never saw them
in training (a feature can fire at z ~ 57 on BOS), and editing them wrecks the model. Each
call's CallScope learns the input ids of every forward (`CallScope.set_inputs`) before it runs.
"""
from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable

import torch

from saeflow.errors import PlanError
from saeflow.lm.hooks import HookPoint

_CURRENT_CALL: contextvars.ContextVar = contextvars.ContextVar("saeflow_call", default=None)


def special_token_ids(tokenizer) -> list[int]:
    """The ids steering never edits: the tokenizer's `all_special_ids` (BOS, EOS, PAD, UNK,
    Gemma's <start_of_turn>/<end_of_turn>, ...), its bos/eos/pad ids, and every added token
    marked special."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or ())}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        i = getattr(tokenizer, name, None)
        if isinstance(i, int):
            ids.add(i)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, t in added.items() if getattr(t, "special", False))
    return sorted(ids)


class CallScope:
    """Marks the code that runs one call's forwards: edits made for this call act only inside
    it (in this thread), so hooks another call installed on the same modules pass through.

    It also knows which positions of the current forward are protected: before each forward
    the caller gives its input ids (and attention mask) to `set_inputs`; positions holding one
    of `special_ids` or masked out (padding, left or right) are then left unedited by every
    edit of this scope. A scope that was never given ids protects nothing (every in-repo caller
    gives them; `CallScope.for_model(model)` takes the special ids from the model's tokenizer).
    """

    def __init__(self, special_ids: Iterable[int] = ()):
        self.token = object()
        self.seen = 0  # tokens of the sequence processed so far (for token positions)
        self.special_ids = torch.tensor(sorted({int(i) for i in special_ids}), dtype=torch.long)
        self.protected: torch.Tensor | None = None  # [batch, seq] bool of the current forward
        self._reset = None

    @classmethod
    def for_model(cls, model) -> "CallScope":
        """A scope protecting the special tokens of `model`'s tokenizer."""
        return cls(special_token_ids(model.tokenizer))

    def set_inputs(self, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> None:
        """The forward about to run: input ids [batch, seq] and, when there is padding, its
        attention mask ([batch, seq], or [batch, past + seq] with a KV cache; 0 = padding).
        Call it before every forward of the call (the prompt, then each generated token)."""
        protected = torch.isin(input_ids, self.special_ids.to(input_ids.device))
        if attention_mask is not None:
            seq = input_ids.shape[1]
            protected |= attention_mask[:, -seq:].to(input_ids.device) == 0
        self.protected = protected

    def __enter__(self):
        self._reset = _CURRENT_CALL.set(self.token)
        return self

    def __exit__(self, *exc):
        _CURRENT_CALL.reset(self._reset)
        return False

    @property
    def active(self) -> bool:
        return _CURRENT_CALL.get() is self.token


def plan_edits(plan, pack, scope: CallScope, typical=None,
               device=None) -> dict[HookPoint, Callable]:
    """{hook point: edit} for Hooks(edits=...) that apply the steering plan `plan`
    (plans.SteeringPlan), acting only inside `scope`.

    Token positions are counted by `scope.seen`, which the generation loop advances after
    each forward (prompt, then one token per step). Positions the scope protects (special
    tokens and padding of the current forward, see CallScope.set_inputs) are never edited."""
    if plan.op == "add" and typical is None:
        raise PlanError("additive plans need typical activations (typical_activations())")
    edits = {}
    for slot in plan.slots():
        ivs = [i for i in plan.interventions if (i.position, i.layer) == slot]
        sae = pack.sae(*slot, device=device)
        feats = torch.tensor([i.feature for i in ivs])
        strength = torch.tensor([i.strength for i in ivs], dtype=torch.float32)
        W = (sae.W_dec[feats].float() / sae.input_scale).to(device)  # [n, d_model]
        if plan.op == "add":
            coef = strength * typical[slot][feats]  # [n]
            delta = (coef.to(device)[:, None] * W).sum(0)  # [d_model]
            edit = _add_edit(delta, plan.tokens, scope)
        else:
            edit = _rescale_edit(sae, feats.to(device), (strength - 1).to(device), W,
                                 plan.tokens, scope)
        edits[slot] = edit
    return edits


def _edit_mask(tokens, scope: CallScope, act: torch.Tensor) -> torch.Tensor | None:
    """[batch or 1, seq, 1] bool: where this forward's edit applies (the plan's token positions,
    minus the positions the scope protects), or None for every position."""
    batch, seq = act.shape[:2]
    m = None
    if tokens is not None:
        pos = torch.arange(scope.seen, scope.seen + seq)
        m = torch.isin(pos, torch.tensor(tokens)).to(act.device)[None, :]  # [1, seq]
    if scope.protected is not None:
        if tuple(scope.protected.shape) != (batch, seq):
            raise PlanError(f"the steering scope was given input ids of shape "
                            f"{tuple(scope.protected.shape)} but the forward runs "
                            f"[{batch}, {seq}]: call scope.set_inputs before every forward")
        keep = ~scope.protected.to(act.device)
        m = keep if m is None else m & keep
    return None if m is None else m[..., None]


def _add_edit(delta: torch.Tensor, tokens, scope: CallScope):
    def edit(act: torch.Tensor):  # act [batch, seq, d_model]
        if not scope.active:
            return None
        m = _edit_mask(tokens, scope, act)
        d = delta.to(device=act.device, dtype=act.dtype)  # the edit follows the activation
        return act + d if m is None else torch.where(m, act + d, act)  # protected: untouched
    return edit


def _rescale_edit(sae, feats: torch.Tensor, factor: torch.Tensor, W: torch.Tensor, tokens,
                  scope: CallScope):
    def edit(act: torch.Tensor):  # act [batch, seq, d_model]
        nonlocal sae, feats, factor, W
        if not scope.active:
            return None
        if W.device != act.device:  # built on another device: follow the activation, once
            sae, feats, factor, W = (t.to(act.device) for t in (sae, feats, factor, W))
        z = sae.encode(act)[..., feats].float()  # [batch, seq, n] current activations
        change = (z * factor) @ W  # [batch, seq, d_model]: sum_f (r_f - 1) z_f W_dec[f]
        new = act + change.to(act.dtype)
        m = _edit_mask(tokens, scope, act)
        return new if m is None else torch.where(m, new, act)  # protected: untouched
    return edit

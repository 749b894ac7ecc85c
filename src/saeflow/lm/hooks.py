"""Read and write hook points through one small, context-managed API.

    with Hooks(model, capture=[HookPoint("resid_post", 6)], edits={...}) as h:
        model.hf(input_ids)
    h.activations[HookPoint("resid_post", 6)]   # [batch, seq, width]

    acts = capture(model, input_ids, points)      # one forward, stops after the last layer needed

An edit is a callable `fn(act [batch, seq, width]) -> new act | None` (None: edited in place).
A capture at the same point sees the edited value. All torch hooks are removed on exit,
also when the forward raises.

Hooks are scoped to the call that entered them. Torch hooks sit on the model's modules, which
every thread shares (the web app serves requests from a thread pool), so a hook installed by
one request would otherwise fire in another request's forward: capture the wrong activations,
apply another request's edit, or stop its forward early. Each `Hooks` marks itself active in a
context variable on enter; its hook bodies do nothing in a forward run by any other context.
"""
from __future__ import annotations

import contextvars
from typing import Callable, Iterable, Mapping

import torch

from saeflow.errors import HookError, HookNotFiredError
from saeflow.ids import Slot
from saeflow.lm.model import LoadedModel

Edit = Callable[[torch.Tensor], "torch.Tensor | None"]


# A hook point is an SAE's place: one type, `Slot`, for both.
HookPoint = Slot


class _StopForward(Exception):
    """Raised inside a hook once every requested activation is captured."""


# The Hooks whose `with` block the running code is in (this thread / task only).
_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "saeflow_active_hooks", default=frozenset())


def replacing(value: torch.Tensor) -> Edit:
    return lambda act: value.to(act.dtype).expand_as(act)


class Hooks:
    def __init__(self, model: LoadedModel, capture: Iterable[HookPoint] = (),
                 edits: Mapping[HookPoint, Edit] | None = None, stop_early: bool = False,
                 detach: bool = True, to_cpu: bool = False):
        self.model = model
        self.capture_points = sorted(set(capture))
        self._capture_set = set(self.capture_points)
        self.edits = dict(edits or {})
        for p in [*self.capture_points, *self.edits]:
            model.check_layer(p.layer)
        # Stopping after the last captured layer is safe while no edit sits deeper.
        self.stop_early = stop_early and bool(self.capture_points) and all(
            p.layer <= max(c.layer for c in self.capture_points) for p in self.edits)
        self.detach, self.to_cpu = detach, to_cpu
        self.activations: dict[HookPoint, torch.Tensor] = {}
        self._handles: list = []
        self._reset: contextvars.Token | None = None

    @property
    def active(self) -> bool:
        """True inside this object's `with` block, in the thread (context) that entered it."""
        return id(self) in _ACTIVE.get()

    # -- installation ----------------------------------------------------------------------
    def __enter__(self) -> "Hooks":
        self._reset = _ACTIVE.set(_ACTIVE.get() | {id(self)})
        try:
            for point in sorted(set(self.capture_points) | set(self.edits)):
                self._install(point)
            if self.stop_early:
                last = max(p.layer for p in self.capture_points)
                self._handles.append(
                    self.model.layer_module(last).register_forward_hook(self._stop_hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        return exc_type is _StopForward  # swallow the early stop

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._reset is not None:
            try:
                _ACTIVE.reset(self._reset)
            except ValueError:  # removed from another context than the one that entered
                _ACTIVE.set(_ACTIVE.get() - {id(self)})
            self._reset = None

    def _install(self, point: HookPoint) -> None:
        module = self.model.hook_module(point.position, point.layer)
        site = self.model.arch.sites[point.position].io
        if site == "input":
            hook = self._make_pre_hook(point)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(self._make_post_hook(point)))

    # -- hook bodies -------------------------------------------------------------------------
    def _process(self, point: HookPoint, act: torch.Tensor) -> torch.Tensor | None:
        if not self.active:  # another call's forward on the shared model: not ours
            return None
        new = None
        edit = self.edits.get(point)
        if edit is not None:
            new = edit(act)
            if new is not None and new.shape != act.shape:
                raise HookError(f"edit at {point} returned shape {tuple(new.shape)}, "
                                 f"expected {tuple(act.shape)}")
        if point in self._capture_set:
            seen = new if new is not None else act
            if self.detach:
                seen = seen.detach()
            if self.to_cpu:
                seen = seen.cpu()
            self.activations[point] = seen
        return new

    def _make_pre_hook(self, point: HookPoint):
        def hook(module, args, kwargs):
            if args:
                new = self._process(point, args[0])
                if new is not None:
                    return (new, *args[1:]), kwargs
            else:
                new = self._process(point, kwargs["hidden_states"])
                if new is not None:
                    return args, {**kwargs, "hidden_states": new}
            return None
        return hook

    def _make_post_hook(self, point: HookPoint):
        def hook(module, args, output):
            if isinstance(output, tuple):
                new = self._process(point, output[0])
                return None if new is None else (new, *output[1:])
            return self._process(point, output)
        return hook

    def _stop_hook(self, module, args, output):
        if self.active and all(p in self.activations for p in self.capture_points):
            raise _StopForward()


def capture(model: LoadedModel, input_ids: torch.Tensor, points: Iterable[HookPoint],
            attention_mask: torch.Tensor | None = None, stop_early: bool = True,
            to_cpu: bool = False) -> dict[HookPoint, torch.Tensor]:
    """One forward pass; returns {point: activation [batch, seq, width]}.

    With stop_early, the forward stops after the deepest layer requested, so layers no one
    reads are never computed (and the LM head never runs).
    """
    points = list(points)
    input_ids = input_ids.to(model.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
    h = Hooks(model, capture=points, stop_early=stop_early, to_cpu=to_cpu)
    with torch.inference_mode(), h:
        body = model_body(model) if stop_early else model.hf
        body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    missing = [str(p) for p in points if p not in h.activations]
    if missing:
        raise HookNotFiredError(f"hook points never fired: {missing}")
    return h.activations


def model_body(model: LoadedModel) -> torch.nn.Module:
    """The transformer without the LM head (model.model / transformer)."""
    return model.hf.get_submodule(model.arch.layers_path.rsplit(".", 1)[0])

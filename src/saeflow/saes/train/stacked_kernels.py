"""The batched products of the stacked engine (stacked.py) and its host-side dead-latent bound.

- `StackedEncoder`: pre-activations with a backward that skips the input gradient (a full GEMM
  that was only summed over the batch for b_dec);
- `code`: the dense TopK / BatchTopK code, optionally through torch.compile (`CodeFn`);
- `aux_compact`: AuxK on the few dead latents only, when they are all selected anyway;
- `DeadBound`: an upper bound on every latent's tokens-since-fired, kept on the host from lagged,
  non-blocking reads, so a step decides without waiting for the device whether AuxK can matter.
"""
from __future__ import annotations

import collections
import warnings

import numpy as np
import torch


class StackedEncoder(torch.autograd.Function):
    """pre [S, B, n] = b_enc + (x - b_dec) @ W_enc, the products in `dt` (x data, no grad).

    Backward, with G [S, B, n] the gradient at pre: grad W_enc = xc^T G (bmm, in dt),
    grad b_enc = sum_B G, grad b_dec = -(sum_B G) @ W_enc^T ([S, n] x [S, n, d]: small); the
    input gradient G @ W_enc^T [S, B, d] is never formed. Gradients are returned in fp32."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, dt):
        xc = (x - b_dec[:, None, :]).to(dt)  # [S, B, d]
        ctx.save_for_backward(xc, W_enc)
        return torch.baddbmm(b_enc[:, None, :].to(dt), xc, W_enc.to(dt))

    @staticmethod
    def backward(ctx, G):
        xc, W_enc = ctx.saved_tensors
        col = G.sum(1, dtype=torch.float32)  # [S, n]
        grad_W = torch.bmm(xc.transpose(1, 2), G).float()  # [S, d, n]
        grad_b_dec = -torch.bmm(col[:, None, :], W_enc.transpose(1, 2))[:, 0]  # [S, d]
        return None, grad_W, col, grad_b_dec, None


def code(pre: torch.Tensor, k: int, batch_level: bool, linear: bool = False):
    """Dense code [S, B, n] of the top-k pre-activations (per row, or per batch); relu'd, or
    with their sign (`linear`; -inf, a masked entry, counts as 0). Also the top values."""
    S, B, n = pre.shape
    if batch_level:
        vals, pos = pre.reshape(S, B * n).topk(B * k, dim=1)  # [S, B*k]
        z = torch.zeros_like(pre).reshape(S, B * n).scatter(1, pos, torch.relu(vals))
        return z.reshape(S, B, n), vals
    vals, idx = pre.topk(k, dim=-1)  # [S, B, k]
    acts = torch.where(torch.isfinite(vals), vals, 0.0) if linear else torch.relu(vals)
    return torch.zeros_like(pre).scatter(-1, idx, acts), vals


class CodeFn:
    """`code` through torch.compile (top-k and scatter fused; opt-in, CUDA only), or eager.

    Each new (shape, dtype, k, mode) is first compiled and run forward and backward on a detached
    copy; any failure there, or later, switches to eager for good (with a warning)."""

    def __init__(self, enabled: bool):
        self.fn = None
        self._probed: set[tuple] = set()
        if enabled:
            try:
                self.fn = torch.compile(code, dynamic=False)
            except Exception as e:  # noqa: BLE001 - any failure means eager
                self._give_up(e)

    def _give_up(self, e: Exception) -> None:
        warnings.warn(f"torch.compile of the TopK code failed ({type(e).__name__}: {e}); "
                      f"running eager", stacklevel=3)
        self.fn = None

    def __call__(self, pre: torch.Tensor, k: int, batch_level: bool, linear: bool = False):
        if self.fn is not None:
            key = (tuple(pre.shape), pre.dtype, k, batch_level, linear)
            try:
                if key not in self._probed:
                    with torch.enable_grad():
                        p = pre.detach().requires_grad_()
                        self.fn(p, k, batch_level, linear)[0].sum().backward()
                    self._probed.add(key)
                return self.fn(pre, k, batch_level, linear)
            except Exception as e:  # noqa: BLE001
                self._give_up(e)
        return code(pre, k, batch_level, linear)


def aux_compact(pre: torch.Tensor, W_dec: torch.Tensor, since_fired: torch.Tensor,
                dead_tokens: int, m: int, linear: bool) -> torch.Tensor:
    """AuxK reconstruction [S, B, d] when no SAE has more than m <= aux_k dead latents, so the
    masked top-aux_k of every row selects exactly the dead ones: the m longest-silent latents of
    each SAE hold them all; the others among the m count 0. Costs 2·B·m·d, not 2·B·n·d.
    pre [S, B, n] and W_dec [S, n, d] in the product dtype, since_fired [S, n]."""
    S, B, _ = pre.shape
    top = since_fired.topk(m, dim=1)  # [S, m]
    idx, is_dead = top.indices, top.values > dead_tokens
    p = pre.gather(2, idx[:, None, :].expand(S, B, m))  # [S, B, m]
    acts = torch.where(is_dead[:, None, :], p if linear else torch.relu(p), 0.0)
    rows = W_dec.gather(1, idx[:, :, None].expand(S, m, W_dec.shape[2]))  # [S, m, d]
    return torch.bmm(acts, rows)


class DeadBound:
    """A host-side upper bound on since_fired [S, n], read lagged, so step() never waits.

    A latent's since_fired grows by exactly the step's batch unless it fires (then 0), and
    resampling only lowers it; so a snapshot taken `delta` tokens ago bounds it now by
    snapshot + delta. Each snapshot holds the maximum and, for j = 0..horizon, the most latents
    of one SAE with since_fired > dead_tokens - j·batch (those that can be dead j batches later).
    On a GPU the snapshot is copied into pinned memory with non_blocking and a CUDA event, and
    used once the event has completed (polled, never waited on); on a CPU it is ready at once.
    An in-place write to since_fired from outside (its version counter moves) voids the bound
    until the next snapshot: `plan` then answers "dense", which is always exact."""

    def __init__(self, since_fired: torch.Tensor, dead_tokens: int, batch: int,
                 horizon: int = 16, slots: int = 4):
        self.sf, self.dead, self.batch, self.horizon = since_fired, dead_tokens, batch, horizon
        self.tokens = 0  # tokens stepped so far (host)
        cuda = since_fired.device.type == "cuda"
        self._bufs = [torch.zeros(horizon + 2, dtype=torch.long, pin_memory=cuda)
                      for _ in range(slots)]
        self._views = [b.numpy() for b in self._bufs]  # read on the host: no torch op, no sync
        self._events = [torch.cuda.Event() if cuda else None for _ in range(slots)]
        self._pending: collections.deque[tuple[int, int]] = collections.deque()  # (slot, tokens)
        self._known: tuple[int, int, np.ndarray] | None = None  # (tokens, max, counts [h + 1])
        self._version = -1
        self.snapshot()

    def stepped(self, batch: int) -> None:
        """After a step's own update of since_fired (batch tokens): a new snapshot."""
        self.tokens += batch
        self.snapshot()

    def valid(self) -> bool:
        """Whether no outside write to since_fired happened since the last snapshot."""
        return self.sf._version == self._version

    def lowered(self, was_valid: bool) -> None:
        """since_fired was only lowered in place (resampling) since `valid()` answered
        was_valid: the bound still holds if it held before."""
        if was_valid:
            self._version = self.sf._version

    def snapshot(self) -> None:
        """Start reading the bound of since_fired as it is now (after the queued work)."""
        free = set(range(len(self._bufs))) - {s for s, _ in self._pending}
        self._version = self.sf._version
        if not free:
            return  # every slot still in flight: keep the older bound
        slot = min(free)
        with torch.no_grad():
            sf = self.sf
            # smallest j with sf > dead - j*batch, per latent; then counts at j = 0..horizon
            j = (torch.div(self.dead - sf, self.batch, rounding_mode="floor") + 1).clamp_(
                0, self.horizon + 1)  # [S, n]
            hist = torch.zeros(sf.shape[0], self.horizon + 2, dtype=torch.long, device=sf.device)
            hist.scatter_add_(1, j, torch.ones_like(j))
            counts = hist.cumsum(1)[:, :self.horizon + 1].amax(0)  # [horizon + 1]
            snap = torch.cat([sf.amax().reshape(1), counts])  # [horizon + 2]
            self._bufs[slot].copy_(snap, non_blocking=True)
        ev = self._events[slot]
        if ev is not None:
            ev.record()
        self._pending.append((slot, self.tokens))

    def _poll(self) -> None:
        while self._pending:
            slot, tokens = self._pending[0]
            ev = self._events[slot]
            if ev is not None and not ev.query():
                return
            self._pending.popleft()
            v = self._views[slot]
            self._known = (tokens, int(v[0]), v[1:].copy())

    def plan(self, aux_k: int) -> tuple[str, int]:
        """("skip", 0): no latent can be dead; ("compact", m): no SAE has more than m <= aux_k
        dead latents; ("dense", 0): otherwise, or the bound is unknown."""
        if not self.valid():
            self._pending.clear()  # read before an outside write: void
            self._known = None
            return "dense", 0
        self._poll()
        if self._known is None:
            return "dense", 0
        tokens, mx, counts = self._known
        delta = self.tokens - tokens
        if mx + delta <= self.dead:
            return "skip", 0
        j = -(-delta // self.batch)
        if j <= self.horizon:
            m = int(counts[j])
            if m == 0:
                return "skip", 0
            if m <= aux_k:
                return "compact", m
        return "dense", 0

"""Training's capture side: each chunk of the corpus run through the model, its activations
written straight into preallocated buffers (one per engine group, the content tokens only).

On a GPU with overlap on, the captures run on a side CUDA stream into two alternating buffer
sets, so the model's forward for chunk i+1 runs while the SAEs train on chunk i. Two CUDA events
per chunk hand the buffers over: `ready` (side stream: the chunk is written; training waits for
it) and `released` (main stream: its training is queued; the capture two chunks later, into the
same set, waits for it). Nothing here waits for the device, so one host thread keeps both
streams fed. On a CPU, or with overlap off, the same calls run in order on one stream.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from saeflow.ids import Slot
from saeflow.lm.corpora import Corpus
from saeflow.lm.hooks import capture
from saeflow.lm.model import LoadedModel, parallel_tokenizing
from saeflow.saes.train.config import TrainConfig


def overlap_default(device: torch.device) -> bool:
    """Overlap is opt-in (SAEFLOW_OVERLAP=1) and CUDA only until a GPU run has shown its packs
    identical to the serial loop's (benchmarks/gpu_check.sh `train`)."""
    return device.type == "cuda" and os.environ.get("SAEFLOW_OVERLAP") == "1"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor t on `device`. To a GPU from pinned memory, without the host waiting for the
    copy (torch's pinned allocator keeps the block until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class ChunkBuffer:
    """One engine group's chunk: its SAEs' activations x [S, capacity, d_in] in the capture's
    dtype, which each forward batch writes into in place (no per-batch lists, cat or stack)."""

    def __init__(self, slots: list[Slot], capacity: int):
        self.slots, self.capacity = slots, capacity
        self.x: torch.Tensor | None = None  # allocated by the first batch: its dtype and width

    def add(self, acts: dict[Slot, torch.Tensor], rows: torch.Tensor, at: int) -> None:
        """acts {slot: [batch, ctx, d_in]}; rows [n] flat positions of the content tokens, on
        the device: they become the chunk's rows at..at+n, in order."""
        for i, s in enumerate(self.slots):
            a = acts[s].reshape(-1, acts[s].shape[-1])  # [batch * ctx, d_in]
            if self.x is None:
                self.x = a.new_empty(len(self.slots), self.capacity, a.shape[-1])
            torch.index_select(a, 0, rows, out=self.x[i, at:at + rows.shape[0]])

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx [m] (on the device) of every SAE's chunk: [S, m, d_in], a gathered copy."""
        assert self.x is not None
        return self.x.index_select(1, idx)

    def shuffled(self, perm: torch.Tensor) -> "Shuffled":
        """The chunk in the order perm [N], gathered only SAE by SAE when read."""
        assert self.x is not None
        return Shuffled(self.x, perm)


class Shuffled:
    """x [S, cap, d_in] read as x[:, perm] ([S, N, d_in]) without gathering all of it: indexing
    by SAE (an int or a slice) gathers just those SAEs' rows. Init and resampling read the
    whole chunk; a full copy of it is 9 GB in bf16 on the gpu profile."""

    def __init__(self, x: torch.Tensor, perm: torch.Tensor):
        self.x, self.perm = x, perm
        self.shape = torch.Size((x.shape[0], perm.shape[0], x.shape[2]))
        self.device = x.device

    def __getitem__(self, i: int | slice) -> torch.Tensor:
        return self.x[i].index_select(-2, self.perm)  # [N, d_in] or [s, N, d_in]


class Streams:
    """The stream operations of the hand-over; on a CPU (or overlap off) every one is a no-op
    and everything runs on the current stream. Tests swap in a recorder."""

    def __init__(self, device: torch.device, overlap: bool):
        self.on = overlap and device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.on else None

    def capturing(self) -> contextlib.AbstractContextManager:
        """The context that captures run in."""
        return torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext()

    def record(self) -> object | None:
        """An event at this point of the current stream."""
        if not self.on:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def wait(self, event: object | None) -> None:
        """The current stream waits for `event` (the host does not)."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)  # type: ignore[arg-type]


@dataclass
class Chunk:
    """A captured chunk: a buffer per engine group holding n >= chunk_tokens rows."""

    bufs: list[ChunkBuffer]
    n: int
    ready: object | None = None  # event on the side stream after the chunk's last write
    set_i: int = 0  # which buffer set


class ChunkCapture:
    """The chunks of `corpus` for engine groups `group_slots`, captured by `model`."""

    def __init__(self, model: LoadedModel, corpus: Corpus, cfg: TrainConfig,
                 group_slots: list[list[Slot]], overlap: bool | None = None,
                 streams: Streams | None = None):
        self.model, self.corpus, self.cfg = model, corpus, cfg
        self.dev = torch.device(model.device)
        self.slots = [s for g in group_slots for s in g]
        if overlap is None:
            overlap = overlap_default(self.dev)
        self.streams = streams or Streams(self.dev, overlap)
        # A chunk ends with the batch that fills it, so it can hold one batch beyond chunk_tokens.
        cap = cfg.chunk_tokens + cfg.model_batch * cfg.ctx_len
        n_sets = 2 if self.streams.on else 1
        self.sets = [[ChunkBuffer(g, cap) for g in group_slots] for _ in range(n_sets)]
        self.released: list[object | None] = [None] * n_sets  # per set: its last training queued

    def chunks(self, skip: int, todo: int) -> Iterator[Chunk]:
        """Each of `todo` chunks, after skipping `skip` chunks (done by earlier runs: tokenising
        only). A chunk's buffers are overwritten by the capture after the next one, once its
        training has been `release`d (with one set: by the next capture)."""
        with parallel_tokenizing():  # the host keeps ahead of a GPU
            yield from self._chunks(skip, todo)

    def _chunks(self, skip: int, todo: int) -> Iterator[Chunk]:
        cfg = self.cfg
        n_buf, seen, made, set_i = 0, 0, 0, 0
        for b in self.corpus.token_batches(self.model.tokenizer, cfg.model_batch, cfg.ctx_len):
            mask = b.content_mask()  # [batch, ctx] on the CPU: counting it waits for no device
            n = int(mask.sum())
            if seen < skip:
                n_buf += n
                if n_buf >= cfg.chunk_tokens:
                    seen += 1
                    n_buf = 0
                continue
            if made >= todo:
                return
            with self.streams.capturing():
                if n_buf == 0:  # the set's previous chunk must be trained before it is overwritten
                    self.streams.wait(self.released[set_i])
                rows = to_device(mask.reshape(-1).nonzero().squeeze(1), self.dev)  # [n] content
                acts = capture(self.model, to_device(b.input_ids, self.dev), self.slots,
                               attention_mask=to_device(b.attention_mask, self.dev))
                for buf in self.sets[set_i]:
                    buf.add(acts, rows, n_buf)
                del acts
                n_buf += n
                if n_buf < cfg.chunk_tokens:
                    continue
                ready = self.streams.record()
            yield Chunk(self.sets[set_i], n_buf, ready, set_i)
            n_buf, made, set_i = 0, made + 1, (set_i + 1) % len(self.sets)

    def acquire(self, chunk: Chunk) -> None:
        """Training (on the current stream) waits until `chunk` is written."""
        self.streams.wait(chunk.ready)

    def release(self, chunk: Chunk) -> None:
        """`chunk`'s training is queued: its buffers may be overwritten after it."""
        self.released[chunk.set_i] = self.streams.record()

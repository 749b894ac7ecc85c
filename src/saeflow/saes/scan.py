"""One resumable pass of a model over a corpus, feeding SAE activations to a consumer.

Shared by the feature index and the co-activation statistics: tokenise the corpus in seeded
batches, capture every needed hook point in one forward, encode each SAE, hand the activations
of the batch to `on_batch`, checkpoint the consumer's state atomically, and resume from it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import saeflow.saes.formats as sae_formats
from saeflow.errors import ScanError
from saeflow.lm.hookpoints import POSITIONS
from saeflow.lm.hooks import HookPoint, capture
from saeflow.lm.model import resolve_dtype
from saeflow.saes.pass_config import CorpusPassConfig, ScanSpec
from saeflow.store import atomic_path


def in_pass_order(slots) -> list:
    """`slots` by layer, then position: the order one forward reaches them."""
    return sorted(slots, key=lambda s: (s[1], POSITIONS.index(s[0])))


def pass_bytes(model, pack, slots, spec: ScanSpec) -> int:
    """A lower bound of one batch's memory in a pass: the float32 codes of every SAE, the
    captured inputs, and one [B, T, T] attention mask and score block (quadratic in ctx_len)."""
    tokens = spec.batch_size * spec.ctx_len
    codes = tokens * sum(pack.entries[s].d_sae for s in slots) * 4
    inputs = tokens * sum(pack.entries[s].d_in for s in slots) * 4
    attention = 2 * spec.batch_size * spec.ctx_len ** 2 * 4
    return codes + inputs + attention


def available_bytes() -> int | None:
    """Memory the OS can give now (MemAvailable; None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(model, pack, slots, spec: ScanSpec, error: type[Exception]) -> None:
    """Refuse a batch shape whose memory alone exceeds what the machine has (instead of being
    killed by the OS part-way); a GPU pass is bounded by the card, which torch reports."""
    need = pass_bytes(model, pack, slots, spec)
    have = (torch.cuda.mem_get_info(model.device)[0] if model.device.type == "cuda"
            else available_bytes())
    if have is not None and need > have:
        raise error(f"one batch of {spec.batch_size} x {spec.ctx_len} tokens over "
                    f"{len(slots)} SAEs needs at least {need / 2**30:.1f} GiB, more than the "
                    f"{have / 2**30:.1f} GiB available; lower --batch-size or --ctx-len")


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`. A host tensor goes to a GPU through pinned memory without blocking:
    a plain copy from pageable memory waits for the GPU's queued work (a host sync)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def add_at(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out[index[i]] += values[i] for every i, in place; returns `out`. The CPU adds in the
    order of i (index_add_); a GPU sorts the indices stably first (index_put_ with
    accumulate), so its float sums come out the same on every run, where index_add_'s
    atomics add in a varying order."""
    if out.device.type == "cpu":
        return out.index_add_(0, index, values)
    return out.index_put_((index,), values, accumulate=True)


def load_saes(pack, slots, device, dtype) -> dict:
    out = {}
    for slot in slots:
        info = pack.entries[slot]
        out[slot] = sae_formats.load_checked(info).to(device=device, dtype=dtype)
    return out


def resumable_state(state_file: Path, identity: dict, force: bool,
                    error: type[Exception] = ScanError) -> dict | None:
    """The saved state of a partial pass with this identity (None: start afresh). A partial pass
    of another setup is refused unless `force` (then it is ignored and overwritten)."""
    if not state_file.is_file():
        return None
    state = torch.load(state_file, weights_only=False)
    if state["identity"] == identity:
        return state
    if not force:
        what = [k for k in identity if state["identity"].get(k) != identity[k]]
        raise error(f"{state_file} is a partial pass over a different "
                    f"{' and '.join(what) or 'setup'}; refusing to resume against it "
                    f"(use --force to start over)")
    return None


def scan(model, pack, slots, spec: ScanSpec, state_file: Path, identity: dict,
         on_batch: Callable, get_state: Callable[[], dict], set_state: Callable[[dict], None],
         *, force: bool = False, progress: bool = True, desc: str = "scan",
         stop_after_batches: int | None = None, codes_on_device: bool = False,
         error: type[Exception] = ScanError) -> dict:
    """Run the pass; returns {"tokens": content tokens seen, "seconds": wall time, "saes": ...}.

    on_batch(z: {slot: [B, T, d_sae] float32}, batch: TokenBatch, content: [B, T] bool,
    acts: {slot: [B, T, d_in]} the SAEs' inputs on the model's device), with z on the CPU, or
    on the model's device when `codes_on_device` (the consumer's bookkeeping runs there;
    copying dense codes of every SAE to the host is what bounds a GPU pass).
    A state file of another identity is refused (unless `force`, which starts over).
    """
    from tqdm.auto import tqdm

    pack.check_model(model)
    slots = in_pass_order(slots)
    check_memory(model, pack, slots, spec, error)
    tok = model.tokenizer
    batches_done = tokens_done = 0
    seconds_before = 0.0  # pass time spent before an interruption (reported in the total)
    state = resumable_state(state_file, identity, force, error)
    if state is not None:
        set_state(state["consumer"])
        batches_done, tokens_done = state["batches"], state["tokens"]
        seconds_before = float(state.get("seconds", 0.0))
    if batches_done == 0 and spec.require_tokens:
        check_available(tok, spec, error)
    enc_dtype = resolve_dtype(spec.encoder_dtype, model.device)
    saes = load_saes(pack, slots, model.device, enc_dtype)

    def save():
        with atomic_path(state_file) as tmp:
            torch.save({"identity": identity, "batches": batches_done, "tokens": tokens_done,
                        "seconds": seconds_before + time.time() - t0, "consumer": get_state()},
                       tmp)

    t0 = time.time()
    bar = tqdm(total=spec.tokens, initial=tokens_done, desc=desc, unit="tok",
               disable=not progress, smoothing=0.05)
    last = time.perf_counter()
    for i, z, b, content, acts in encoded_batches(model, saes, slots, spec, start=batches_done,
                                                  codes_on_device=codes_on_device):
        on_batch(z, b, content, acts)
        n = int(content.sum())
        batches_done, tokens_done = i + 1, tokens_done + n
        bar.update(n)
        if time.perf_counter() - last > spec.checkpoint_every_s:
            save()
            last = time.perf_counter()
        if stop_after_batches is not None and batches_done >= stop_after_batches:
            save()
            bar.close()
            raise KeyboardInterrupt("stopped on request (stop_after_batches)")
    bar.close()
    save()
    return {"tokens": tokens_done, "seconds": seconds_before + time.time() - t0, "saes": saes}


def check_available(tok, spec: ScanSpec, error: type[Exception]) -> int:
    """The number of batches of the pass; `error` when the corpus is short of spec.tokens."""
    return batch_budgets(tok, spec, {"pass": spec.tokens}, error)["pass"]


def batch_budgets(tok, spec: ScanSpec, budgets: dict[str, int],
                  error: type[Exception] = ScanError, caps: set | frozenset = frozenset()
                  ) -> dict[str, int]:
    """{name: batches} for token budgets read from the front of one pass: a pass asked for T
    tokens reads the batches that start before T tokens were emitted, so a pass over
    max(budgets) holds each shorter pass as a prefix (the same batches, the same order).
    `error` when the corpus is short of a budget, unless its name is in `caps` (read up to
    it)."""
    starts, content = [], []  # per batch: tokens emitted before it, content tokens in it
    emitted = 0
    for b in spec.batches(tok, max(budgets.values())):
        starts.append(emitted)
        content.append(int(b.content_mask().sum()))
        emitted += int(b.attention_mask.sum())
    out = {}
    for name, tokens in budgets.items():
        n = sum(1 for s in starts if s < tokens)
        available = sum(content[:n])
        if available < 0.98 * tokens and name not in caps:
            where = "" if spec.split == "train" else f" ({spec.split} split)"
            raise error(f"the corpus {spec.corpus!r}{where} gives only {available} tokens, "
                        f"fewer than the {tokens} asked; ask for fewer or add sources")
        out[name] = n
    return out


@dataclass
class PassJob:
    """One consumer's share of a corpus pass: what it reads, its accumulators, where it
    checkpoints when it runs alone, and how it writes its results. Built by `index_job`,
    `stats_job` and `eval_job`; run alone by their stage, or with the others in one pass
    (saeflow.scale.shards.run_jobs).

    parts: {part name: (make_shard(shard index, device) -> accumulator, token budget)};
    finish(total: PassParts, seconds, saes) reads its parts (`total.parts[name]`,
    `total.tokens[name]`) and writes the results."""
    name: str
    identity: dict
    slots: list
    spec: ScanSpec
    parts: dict
    finish: Callable
    state_file: Path
    error: type[Exception] = ScanError


class PassParts:
    """Several consumers of one corpus pass (eval, index, statistics), each over its own
    prefix of the batches (`batch_budgets`), held as one shard accumulator of `sharded_scan`:
    the pass reads and encodes the corpus once for all of them.

    parts: {name: (make_shard(k, device), batches)}; `per` batches per shard, so that shard k
    knows the global index of its batches."""

    def __init__(self, parts: dict, per: int, k: int, device):
        self.limit = {name: n for name, (_, n) in parts.items()}
        self.parts = {name: make(k, device) for name, (make, n) in parts.items()}
        self.batch = k * per  # global index of this shard's next batch
        self.tokens = dict.fromkeys(self.parts, 0)  # content tokens each part has read

    def on_batch(self, z, b, content, acts=None) -> None:
        n = None
        for name, part in self.parts.items():
            if self.batch < self.limit[name]:
                part.on_batch(z, b, content, acts)
                n = int(content.sum()) if n is None else n
                self.tokens[name] += n
        self.batch += 1

    def state(self) -> dict:
        return {"batch": self.batch, "tokens": dict(self.tokens),
                "parts": {n: p.state() for n, p in self.parts.items()}}

    def load(self, st: dict) -> None:
        self.batch, self.tokens = st["batch"], dict(st["tokens"])
        for name, part in self.parts.items():
            part.load(st["parts"][name])

    def merge(self, other: "PassParts") -> None:
        for name, part in self.parts.items():
            part.merge(other.parts[name])
            self.tokens[name] += other.tokens[name]
        self.batch = max(self.batch, other.batch)


def encoded_batches(model, saes: dict, slots, spec: ScanSpec, *, start: int = 0,
                    stop: int | None = None, codes_on_device: bool = False):
    """(batch index, {slot: codes [B, T, d_sae]}, batch, content [B, T], {slot: inputs
    [B, T, d_in] on the model's device}) for the batches [start, stop) of the pass: one forward
    captures every slot, then each SAE encodes. The same batches for the same spec on any
    machine (the corpus order is a function of the seed).
    """
    points = [HookPoint(p, L) for p, L in slots]
    enc_dtype = next(iter(saes.values())).dtype if saes else torch.float32
    for i, b in enumerate(spec.batches(model.tokenizer)):
        if i < start:
            continue  # counted before an interruption, or another shard's
        if stop is not None and i >= stop:
            break
        acts = capture(model, b.input_ids, points, attention_mask=b.attention_mask)
        content = b.content_mask()
        with torch.inference_mode():
            z = {slot: saes[slot].encode(acts[pt].to(enc_dtype)).float()
                 for slot, pt in zip(slots, points)}
            if not codes_on_device:
                z = {slot: v.cpu() for slot, v in z.items()}
        yield i, z, b, content, {slot: acts[pt] for slot, pt in zip(slots, points)}
        del acts


def pass_identity(pack_fp: str, model, cfg: CorpusPassConfig) -> dict:
    """The identity of a corpus pass: pack, model, settings and the encoder dtype they resolve
    to on the model's device (a resume or merge in another dtype is refused with it)."""
    from saeflow.lm.model import dtype_name, resolve_encoder_dtype

    return {"pack": pack_fp, "model": model.name, "config": cfg.identity(),
            "encoder_dtype": dtype_name(resolve_encoder_dtype(cfg.encoder_dtype, model.device))}

"""The family loop: every (position, layer) SAE of a config trained from one pass of the model
over a corpus, into a pack.

The corpus is cut into chunks (chunks.py captures each into one preallocated buffer per engine,
[S, chunk capacity, d_in], the content tokens only). When a chunk is full (chunk_tokens), each
engine trains on it in batches of rows drawn by one shuffled permutation; then the next chunk
starts, which is where checkpoints are taken. So a resumed run replays exactly the same batches:
the corpus is deterministic and skipped chunks only need tokenising, not a forward pass. Nothing
in a forward batch or a step waits for the device, and a chunk's metrics are read only once the
next chunk's capture is queued, so on a GPU the host keeps the device fed (with SAEFLOW_OVERLAP=1
the capture runs on a side stream beside the training).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import torch

from saeflow._version import __version__
from saeflow.checks import flag
from saeflow.errors import ConfigError, TrainingError
from saeflow.ids import Slot
from saeflow.lm.corpora import Corpus
from saeflow.lm.model import (
    LoadedModel,
    dtype_name,
    parallel_tokenizing,
    resolve_encoder_dtype,
)
from saeflow.saes.packs import PACK_MANIFEST, Pack, load_pack, save_pack
from saeflow.saes.train import recipe
from saeflow.saes.train.chunks import ChunkBuffer, ChunkCapture, to_device
from saeflow.saes.train.config import TrainConfig
from saeflow.saes.train.recipe import Engine
from saeflow.saes.train.sparse import SAETrainer
from saeflow.saes.train.stacked import StackedTrainer
from saeflow.store import atomic_path

CKPT_FILE = "state.pt"


@dataclass
class TrainResult:
    pack: Pack
    wall_seconds: float
    tokens: int
    metrics: dict


def count_tokens(corpus: Corpus, tokenizer, cfg: TrainConfig, limit: int,
                 docs_per_call: int = 256) -> int:
    """Content tokens the corpus can give (stops counting at `limit`): every token of every
    training document is a content token of `token_batches` (BOS, separators and padding are
    not), so the documents are only tokenised, in large batches on every core, and never packed
    into rows."""
    n = 0
    docs: list[str] = []
    with parallel_tokenizing():
        for doc in corpus.documents("train"):
            docs.append(doc.text)
            if len(docs) < docs_per_call:
                continue
            n += sum(map(len, tokenizer(docs, add_special_tokens=False)["input_ids"]))
            docs = []
            if n >= limit:
                return n
        if docs:
            n += sum(map(len, tokenizer(docs, add_special_tokens=False)["input_ids"]))
    return n


def prepare_training(model, cfg: TrainConfig, out: Path, overwrite: bool
                     ) -> tuple[TrainConfig, dict, TrainResult | None]:
    """(a checked copy of cfg with its layers filled in, the run's identity, the finished result
    when `out` already holds this very pack). Refuses to write over another pack or a folder that
    is not a pack, unless `overwrite`: nothing is touched before the checks pass."""
    cfg = TrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})
    cfg.layers = cfg.layers if cfg.layers is not None else list(range(model.n_layers))
    cfg.validate(model)
    # "auto" dtypes become the concrete ones of this device here, once: the identity, the
    # checkpoint and every Ray group then carry the same dtype.
    cfg.encoder_dtype = dtype_name(resolve_encoder_dtype(cfg.encoder_dtype, model.device))
    cfg.model_dtype = dtype_name(resolve_encoder_dtype(cfg.model_dtype, model.device))
    ident = {"model": model.name, **cfg.identity()}
    if (out / PACK_MANIFEST).is_file() and not overwrite:
        existing = load_pack(out)
        if pack_identity(existing.provenance) == ident:
            return cfg, ident, TrainResult(existing, existing.provenance.get("wall_seconds", 0.0),
                                           existing.provenance.get("tokens", 0), {})
        raise FileExistsError(f"{out} holds a different pack; pass --overwrite to replace it, "
                              f"or choose another --out")
    if out.exists() and not (out / PACK_MANIFEST).is_file() and any(out.iterdir()) \
            and not overwrite:
        raise FileExistsError(f"{out} exists and is not a saeflow pack; refusing to write there "
                              f"(pass --overwrite, or choose another --out)")
    return cfg, ident, None


def pack_identity(provenance: dict) -> dict | None:
    """The training identity a pack records. Packs trained before dtypes were resolved in the
    identity say "auto" there; the dtypes they ran in are in the provenance beside it."""
    ident = provenance.get("train_config")
    if not isinstance(ident, dict):
        return None
    ident = dict(ident)
    for key, ran in (("encoder_dtype", "encoder_dtype"), ("model_dtype", "capture_dtype")):
        if ident.get(key) == "auto" and provenance.get(ran):
            ident[key] = provenance[ran]
    return ident


def check_resume(saved: dict | None, ident: dict, ckpt_dir: Path) -> None:
    """Refuse to resume a checkpoint of another run, naming a dtype difference plainly (a
    resume across dtypes would mix two numerics in one pack)."""
    if saved == ident:
        return
    saved = saved or {}
    for key in ("encoder_dtype", "model_dtype"):
        if key in saved and saved.get(key) != ident.get(key):
            raise TrainingError(
                f"{ckpt_dir} was trained with {key} {saved[key]}, but this run resolves "
                f"{ident.get(key)}; pass {flag(key)} {saved[key]} to resume it, or --overwrite "
                f"to start over")
    raise TrainingError(f"{ckpt_dir} holds a checkpoint of a different training run; delete it "
                        f"or pass --overwrite")


# --- engines ------------------------------------------------------------------------------------------
@dataclass
class EngineGroup:
    """The slots one engine trains, in the order of its stack."""

    slots: list[Slot]
    engine: Engine


def make_engines(model, cfg: TrainConfig, slots: list[Slot], steps_total: int, device,
                 enc_dtype: torch.dtype, family_slots=None) -> list[EngineGroup]:
    """One stacked engine per input width, or one sparse engine per slot ("auto": stacked on
    a GPU). Each SAE's seed is its place in `family_slots` (the whole family; default `slots`)."""
    engine = cfg.engine
    if engine == "auto":
        engine = "stacked" if torch.device(device).type == "cuda" else "sparse"
    seed = {Slot.of(s): cfg.seed * 100_003 + i for i, s in enumerate(family_slots or slots)}
    if engine == "sparse":
        return [EngineGroup([s], SAETrainer(model.width(s.position), cfg, steps_total, device,
                                            seed[s], enc_dtype)) for s in slots]
    by_width: dict[int, list[Slot]] = {}
    for s in slots:
        by_width.setdefault(model.width(s.position), []).append(s)
    return [EngineGroup(group, StackedTrainer(w, cfg, steps_total, device,
                                              [seed[s] for s in group], enc_dtype))
            for w, group in by_width.items()]


# --- checkpoints ----------------------------------------------------------------------------------------
def _load_checkpoint(ckpt_dir: Path, ident: dict, device, overwrite: bool) -> dict | None:
    """The checkpoint of this very run in ckpt_dir, if any. With `overwrite`, a checkpoint of
    another run is deleted; without, it is refused (check_resume)."""
    if (ckpt_dir / CKPT_FILE).is_file():
        state = torch.load(ckpt_dir / CKPT_FILE, map_location=device, weights_only=False)
        if overwrite and state.get("ident") != ident:
            shutil.rmtree(ckpt_dir)
            return None
        check_resume(state.get("ident"), ident, ckpt_dir)
        return state
    if ckpt_dir.exists() and overwrite:
        shutil.rmtree(ckpt_dir)
    return None


def _save_checkpoint(ckpt_dir: Path, *, ident: dict, chunk: int, gen: torch.Generator,
                     wall: float, groups: list[EngineGroup]) -> None:
    """state.pt: the run's identity, chunks done, the shuffle generator, wall time so far and
    each SAE's state keyed by its (position, layer) tuple."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    saes = {(s.position, s.layer): g.engine.state_dict(i)
            for g in groups for i, s in enumerate(g.slots)}
    with atomic_path(ckpt_dir / CKPT_FILE) as tmp:
        torch.save({"ident": ident, "chunk": chunk, "rng": gen.get_state(), "wall": wall,
                    "saes": saes}, tmp)


# --- the loop ---------------------------------------------------------------------------------------------
@dataclass
class _Schedule:
    """Chunks and steps of a run."""

    n_chunks: int
    steps_total: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> "_Schedule":
        n_chunks = math.ceil(cfg.tokens / cfg.chunk_tokens)
        return cls(n_chunks, n_chunks * (cfg.chunk_tokens // cfg.batch_size))


@contextlib.contextmanager
def _model_in(model: LoadedModel, dtype: torch.dtype) -> Iterator[None]:
    """The model in `dtype` for the capture; afterwards, whatever happened, exactly as it was
    (a dtype round trip would leave the caller's weights rounded). Buffers outside the state
    dict (Gemma's embed_scale and rotary inv_freq are non-persistent) are restored too: rounded
    to bf16 they shifted every later logit (clean CE 2.97499 -> 2.97488 on the quick run)."""
    orig = model.dtype
    if dtype == orig:
        yield
        return
    backup = {k: v.detach().to("cpu", copy=True) for k, v in model.hf.state_dict().items()}
    buffers = {k: v.detach().to("cpu", copy=True) for k, v in model.hf.named_buffers()}
    model.hf.to(dtype)
    try:
        yield
    finally:
        model.hf.to(orig)
        model.hf.load_state_dict(backup)
        with torch.no_grad():
            for k, v in model.hf.named_buffers():
                v.copy_(buffers[k])


def _train_chunk(groups: list[EngineGroup], bufs: list[ChunkBuffer], perm: torch.Tensor,
                 cfg: TrainConfig, steps_total: int, ckpt_dir: Path) -> None:
    """Each engine's SAEs trained on their chunk's rows in the shuffled order `perm` [N] (on
    the device): step by step, each batch gathered by its slice of perm. Only queued on a GPU:
    `_checked_metrics` reads the result."""
    for g, buf in zip(groups, bufs):
        t = g.engine
        # init and resampling see the whole shuffled chunk [S, N, d_in], as they always did,
        # gathered block by block of SAEs: never a second copy of the chunk
        if not t.initialised:
            t.init_from(buf.shuffled(perm))  # once per run
        if cfg.resample_dead and t.step_i < recipe.decay_start(cfg, steps_total):
            t.resample(buf.shuffled(perm))
        for b0 in range(0, perm.shape[0], cfg.batch_size):
            try:
                t.step(buf.rows(perm[b0:b0 + cfg.batch_size]))  # [S, B, d_in]
            except TrainingError as e:
                raise TrainingError(
                    f"{e} in the SAE at {g.slots[0].position} layer {g.slots[0].layer} (step "
                    f"{t.step_i}); stopped. The last good checkpoint is kept in {ckpt_dir}; try "
                    f"a lower --lr") from None


def _checked_metrics(groups: list[EngineGroup], ckpt_dir: Path) -> dict[Slot, dict]:
    """The SAEs' last metrics (one host sync per group), or a TrainingError if one diverged."""
    last: dict[Slot, dict] = {}
    for g in groups:
        t = g.engine
        for s, m in zip(g.slots, t.metrics()):
            if not math.isfinite(m["loss"]) or m["fvu"] > 1e3:
                raise TrainingError(
                    f"loss is {m['loss']} (FVU {m['fvu']:.3g}) in the SAE at {s.position} "
                    f"layer {s.layer} (step {t.step_i}); stopped. The last good checkpoint is "
                    f"kept in {ckpt_dir}; try a lower --lr")
            last[s] = m
    return last


def _mean_postfix(last_of: dict[Slot, dict]) -> dict[str, str]:
    lasts = list(last_of.values())
    return {"fvu": f"{sum(x['fvu'] for x in lasts) / len(lasts):.3f}",
            "l0": f"{sum(x['l0'] for x in lasts) / len(lasts):.1f}",
            "dead": f"{sum(x['dead'] for x in lasts) / len(lasts):.3f}"}


@dataclass
class _Run:
    """What the loop of one train_family call carries."""

    model: LoadedModel
    cfg: TrainConfig
    ident: dict
    slots: list[Slot]
    schedule: _Schedule
    groups: list[EngineGroup]
    ckpt_dir: Path
    gen: torch.Generator
    chunk_i: int = 0
    wall_before: float = 0.0


def _loop(run: _Run, corpus: Corpus, progress: bool,
          stop_after_chunks: int | None) -> dict[Slot, dict]:
    """Capture, chunk and train until the run's tokens are done, checkpointing every
    checkpoint_every_s seconds; the SAEs' last metrics. A chunk's metrics are read after the
    next chunk's capture is queued, so on a GPU that capture runs beside its training."""
    from tqdm.auto import tqdm

    cfg, n_chunks = run.cfg, run.schedule.n_chunks
    dev = torch.device(run.model.device)
    t_start = last_ckpt = time.perf_counter()
    last_of: dict[Slot, dict] = {}
    cap = ChunkCapture(run.model, corpus, cfg, [g.slots for g in run.groups])

    def save() -> None:
        _save_checkpoint(run.ckpt_dir, ident=run.ident, chunk=run.chunk_i, gen=run.gen,
                         wall=run.wall_before + time.perf_counter() - t_start, groups=run.groups)

    def finish(bar) -> None:
        """The last trained chunk's metrics checked; progress, stop and checkpoint."""
        nonlocal last_ckpt
        last_of.update(_checked_metrics(run.groups, run.ckpt_dir))
        run.chunk_i += 1
        bar.update(cfg.chunk_tokens)
        bar.set_postfix(**_mean_postfix(last_of))
        if stop_after_chunks is not None and stop_after_chunks <= run.chunk_i < n_chunks:
            save()
            raise KeyboardInterrupt("stop_after_chunks")
        if time.perf_counter() - last_ckpt > cfg.checkpoint_every_s and run.chunk_i < n_chunks:
            save()
            last_ckpt = time.perf_counter()

    with tqdm(total=n_chunks * cfg.chunk_tokens, initial=run.chunk_i * cfg.chunk_tokens,
              unit="tok", unit_scale=True, desc=f"training {len(run.slots)} SAEs",
              disable=not progress, smoothing=0.1) as bar:
        trained = False  # a chunk is trained whose metrics are not read yet
        for chunk in cap.chunks(skip=run.chunk_i, todo=n_chunks - run.chunk_i):
            if trained:
                finish(bar)
            # A full chunk: shuffle and train each SAE on exactly chunk_tokens of its n
            # tokens (the rest of the batch that filled it is dropped).
            perm = torch.randperm(chunk.n, generator=run.gen)[:cfg.chunk_tokens]  # [N], CPU
            perm = to_device(perm, dev)
            cap.acquire(chunk)
            _train_chunk(run.groups, chunk.bufs, perm, cfg, run.schedule.steps_total,
                         run.ckpt_dir)
            cap.release(chunk)
            trained = True
        if trained:
            finish(bar)
    if run.chunk_i < n_chunks:
        raise ConfigError(f"the corpus ran out after {run.chunk_i} of {n_chunks} chunks")
    run.wall_before += time.perf_counter() - t_start
    return last_of


def _write_pack(run: _Run, out: Path, corpus: Corpus, last_of: dict[Slot, dict],
                enc_dtype: torch.dtype, cap_dtype: torch.dtype) -> TrainResult:
    cfg, model = run.cfg, run.model
    tokens = run.schedule.n_chunks * cfg.chunk_tokens
    metrics = {s.folder_key(): last_of.get(s, {}) for s in run.slots}
    prov = {"trained_by": f"saeflow {__version__}", "model": model.name, "model_source": model.source,
            "corpus": corpus.describe(), "tokens": tokens, "seed": cfg.seed,
            "wall_seconds": round(run.wall_before, 1), "train_config": run.ident,
            "capture_dtype": str(cap_dtype).removeprefix("torch."),
            "engine": run.groups[0].engine.engine,
            "encoder_dtype": str(enc_dtype).removeprefix("torch."), "final_train_metrics": metrics}
    exported = {s: g.engine.export(i=i, metadata={"position": s.position, "layer": s.layer})
                for g in run.groups for i, s in enumerate(g.slots)}
    pack = save_pack(((s.position, s.layer, exported[s]) for s in run.slots), out,
                     model_name=model.name, d_model=model.d_model, n_layers=model.n_layers,
                     provenance=prov, overwrite=True)
    shutil.rmtree(run.ckpt_dir, ignore_errors=True)
    return TrainResult(pack, run.wall_before, tokens, metrics)


def train_family(model: LoadedModel, cfg: TrainConfig, out: str | os.PathLike,
                 overwrite: bool = False, progress: bool = True,
                 stop_after_chunks: int | None = None, family_slots=None) -> TrainResult:
    """Train every (position, layer) SAE of `cfg` from one pass over the corpus; write a pack.

    Resumes from OUT.ckpt/ when it holds a checkpoint of the same configuration.
    stop_after_chunks: stop (as if interrupted) after that many chunks, for tests.
    family_slots: when this call trains a group of a larger family (saeflow.scale), the
    family's (position, layer) list, so each SAE keeps the seed it has in the whole family.
    """
    out = Path(out)
    cfg, ident, done = prepare_training(model, cfg, out, overwrite)
    if done is not None:
        return done
    assert cfg.layers is not None  # prepare_training fills them in
    ckpt_dir = out.with_name(out.name + ".ckpt")
    corpus = Corpus.from_spec(cfg.corpus, seed=cfg.seed)
    enc_dtype = resolve_encoder_dtype(cfg.encoder_dtype, model.device)  # concrete already
    cap_dtype = resolve_encoder_dtype(cfg.model_dtype, model.device)
    slots = [Slot(p, L) for p in cfg.positions for L in cfg.layers]
    schedule = _Schedule.of(cfg)
    state = _load_checkpoint(ckpt_dir, ident, model.device, overwrite)
    if state is None:
        have = count_tokens(corpus, model.tokenizer, cfg, cfg.tokens)
        if have < cfg.tokens:
            raise ConfigError(f"the corpus {cfg.corpus!r} has only {have} training tokens, fewer "
                              f"than --tokens {cfg.tokens}; lower --tokens or add sources "
                              f"with --corpus")
    groups = make_engines(model, cfg, slots, schedule.steps_total, model.device, enc_dtype,
                          family_slots)
    run = _Run(model, cfg, ident, slots, schedule, groups, ckpt_dir,
               torch.Generator().manual_seed(cfg.seed))
    if state is not None:
        for g in groups:
            g.engine.load_state_dicts([state["saes"][s] for s in g.slots])
        run.gen.set_state(state["rng"].cpu())  # map_location moved it; a Generator wants CPU
        run.chunk_i, run.wall_before = state["chunk"], state["wall"]
    with _model_in(model, cap_dtype):
        last_of = _loop(run, corpus, progress, stop_after_chunks)
    return _write_pack(run, out, corpus, last_of, enc_dtype, cap_dtype)

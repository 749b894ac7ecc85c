"""The family loop: its preallocated chunk buffers and gathered batches train exactly the packs
of the loop they replaced (a frozen copy below), resume exactly, and wait for no device. With
overlap on (two buffer sets, a side stream, events), the stream calls go to a recorder that
models two CUDA streams: every write of a chunk happens before its training reads it, and every
training before the writes that later reuse its buffers."""
import collections
import contextlib
import functools
import math
import os
from dataclasses import replace

import pytest
import torch

from saeflow.ids import Slot
from saeflow.lm.corpora import Corpus
from saeflow.lm.hooks import capture
from saeflow.saes.train import TrainConfig, chunks, stacked, train_family
from saeflow.saes.train import family as fam


def tiny_cfg(**kw):
    base = dict(positions=["resid_post", "mlp_out"], layers=[0, 1], width=64, k=4, tokens=4096,
                batch_size=128, lr=3e-3, ctx_len=32, model_batch=8, chunk_tokens=1024,
                corpus="wiki", model_dtype="float32", encoder_dtype="float32",
                checkpoint_every_s=1e9)
    base.update(kw)
    return TrainConfig(**base)


# --- the loop before the buffers (frozen): per-batch lists, cat, [perm], stack -------------------
def _old_chunks(model, corpus, cfg, slots, skip, todo):
    n_buf, seen, made = 0, 0, 0
    buffers = {s: [] for s in slots}
    for b in corpus.token_batches(model.tokenizer, cfg.model_batch, cfg.ctx_len):
        if seen < skip:
            n_buf += int(b.content_mask().sum())
            if n_buf >= cfg.chunk_tokens:
                seen += 1
                n_buf = 0
            continue
        if made >= todo:
            return
        mask = b.content_mask()
        acts = capture(model, b.input_ids, slots, attention_mask=b.attention_mask)
        m = mask.to(model.device)
        for s in slots:
            buffers[s].append(acts[s][m])
        n_buf += int(mask.sum())
        if n_buf < cfg.chunk_tokens:
            continue
        yield buffers, n_buf
        buffers = {s: [] for s in slots}
        n_buf, made = 0, made + 1


def _old_loop(run, corpus, progress, stop_after_chunks):
    cfg, n_chunks, last_of = run.cfg, run.schedule.n_chunks, {}
    for buffers, n_buf in _old_chunks(run.model, corpus, cfg, run.slots, skip=run.chunk_i,
                                      todo=n_chunks - run.chunk_i):
        perm = torch.randperm(n_buf, generator=run.gen)[:cfg.chunk_tokens].to(run.model.device)
        for g in run.groups:
            t = g.engine
            x = torch.stack([torch.cat(buffers.pop(s))[perm] for s in g.slots])
            if not t.initialised:
                t.init_from(x)
            t.resample(x)
            for b0 in range(0, x.shape[1], cfg.batch_size):
                t.step(x[:, b0:b0 + cfg.batch_size])
            for s, m in zip(g.slots, t.metrics()):
                assert math.isfinite(m["loss"])
                last_of[s] = m
        run.chunk_i += 1
    run.wall_before = 1.0
    return last_of


def _assert_same_pack(a, b):
    assert sorted(a.entries) == sorted(b.entries)
    for slot in a.entries:
        ta, tb = a.sae(*slot).tensors(), b.sae(*slot).tensors()
        for name in ta:
            assert torch.equal(ta[name], tb[name]), (slot, name)
    assert a.provenance["final_train_metrics"] == b.provenance["final_train_metrics"]


CASES = {
    "sparse": dict(engine="sparse"),
    "stacked": dict(engine="stacked"),
    # chunks that end inside a batch (n_buf > chunk_tokens) and a short last step per chunk
    "uneven": dict(engine="stacked", chunk_tokens=1000, batch_size=96, tokens=5000),
    "resample": dict(engine="stacked", architecture="batchtopk", resample_dead=True,
                     dead_tokens=256),
    "resample_sparse": dict(engine="sparse", resample_dead=True, dead_tokens=256,
                            input_norm="scalar", model_dtype="bfloat16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_loop_trains_the_packs_of_the_old_loop_bit_for_bit(tiny_models, tmp_path,
                                                               monkeypatch, case):
    m = tiny_models["llama"]
    cfg = tiny_cfg(**CASES[case])
    revived = []
    if cfg.resample_dead:  # the case must really resample
        cls = fam.SAETrainer if cfg.engine == "sparse" else fam.StackedTrainer
        real = cls.resample
        monkeypatch.setattr(cls, "resample", lambda self, x: revived.append(real(self, x))
                            or revived[-1])
    new = train_family(m, cfg, tmp_path / "new", progress=False).pack
    with monkeypatch.context() as mp:
        mp.setattr(fam, "_loop", _old_loop)
        old = train_family(m, cfg, tmp_path / "old", progress=False).pack
    _assert_same_pack(new, old)
    assert not cfg.resample_dead or sum(revived) > 0


def test_init_and_resampling_read_the_chunk_sae_by_sae_and_train_the_same_pack(
        tiny_models, tmp_path, monkeypatch):
    """With blocks of one SAE, init and resampling never gather more than one SAE's rows of the
    chunk at a time, and the pack is still the old loop's, bit for bit."""
    m = tiny_models["llama"]
    cfg = tiny_cfg(engine="stacked", resample_dead=True, dead_tokens=256)
    monkeypatch.setattr(stacked, "INIT_BLOCK_BYTES", 1)
    widest = []
    real = chunks.Shuffled.__getitem__
    monkeypatch.setattr(chunks.Shuffled, "__getitem__",
                        lambda self, i: widest.append(real(self, i)) or widest[-1])
    new = train_family(m, cfg, tmp_path / "new", progress=False).pack
    with monkeypatch.context() as mp:
        mp.setattr(fam, "_loop", _old_loop)
        old = train_family(m, cfg, tmp_path / "old", progress=False).pack
    _assert_same_pack(new, old)
    assert widest and all(x.numel() == cfg.chunk_tokens * m.d_model for x in widest)


@pytest.mark.parametrize("engine", ["sparse", "stacked"])
def test_resume_is_bit_identical(tiny_models, tmp_path, engine):
    m = tiny_models["gemma3"]
    cfg = tiny_cfg(engine=engine, tokens=5000, chunk_tokens=1000, batch_size=96)
    full = train_family(m, cfg, tmp_path / "full", progress=False).pack
    with pytest.raises(KeyboardInterrupt):
        train_family(m, cfg, tmp_path / "part", progress=False, stop_after_chunks=2)
    resumed = train_family(m, cfg, tmp_path / "part", progress=False).pack
    _assert_same_pack(full, resumed)


def test_count_tokens_counts_the_content_tokens_of_the_batches(tiny_models, tmp_path):
    m = tiny_models["gemma3"]
    for i in range(40):
        (tmp_path / f"d{i}.txt").write_text(f"document {i}: " + "the quick brown fox " * (i % 7)
                                             + "def add(a, b): return a + b\n" * (i % 3))
    (tmp_path / "empty.txt").write_text("")
    corpus = Corpus.from_spec(str(tmp_path), seed=3)
    cfg = tiny_cfg()
    batches = sum(int(b.content_mask().sum())
                  for b in corpus.token_batches(m.tokenizer, cfg.model_batch, cfg.ctx_len))
    assert fam.count_tokens(corpus, m.tokenizer, cfg, 10**9, docs_per_call=7) == batches
    assert fam.count_tokens(corpus, m.tokenizer, cfg, 10**9) == batches
    assert batches // 2 <= fam.count_tokens(corpus, m.tokenizer, cfg, batches // 2,
                                            docs_per_call=3) < batches


def test_training_tokenises_on_every_core_and_leaves_the_setting_as_it_was(tiny_models,
                                                                          monkeypatch):
    """count_tokens and the chunks' batches tokenise with TOKENIZERS_PARALLELISM on; the
    process-wide setting (off) is back afterwards."""
    m = tiny_models["gemma3"]
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    seen = []

    class Recording:
        def __getattr__(self, name):
            return getattr(m.tokenizer, name)

        def __call__(self, *a, **kw):
            seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
            return m.tokenizer(*a, **kw)

    cfg = tiny_cfg()
    corpus = Corpus.from_spec("wiki", seed=0)
    n = fam.count_tokens(corpus, Recording(), cfg, 3000)
    assert n == fam.count_tokens(corpus, m.tokenizer, cfg, 3000)
    model = replace(m, tokenizer=Recording())
    cap = chunks.ChunkCapture(model, corpus, cfg, [[Slot("resid_post", 0)]])
    assert next(cap.chunks(skip=0, todo=1)).n >= cfg.chunk_tokens
    assert seen and set(seen) == {"true"}
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_chunk_buffer_gathers_the_content_rows_without_a_host_sync(tiny_models, test_device):
    """The buffer holds what boolean masking gave, in order; on a GPU (SAEFLOW_TEST_DEVICE=cuda)
    the positions' transfer, the writes and the batch gathers run in sync-debug 'error' mode."""
    m = tiny_models["gemma3"]
    dev = torch.device(m.device)
    slots = [Slot("resid_post", 0), Slot("mlp_out", 1)]
    batches = list(Corpus.from_spec("wiki", seed=0).token_batches(m.tokenizer, 4, 32))[:3]
    buf = chunks.ChunkBuffer(slots, capacity=3 * 4 * 32)
    expect, at = {s: [] for s in slots}, 0
    cuda = dev.type == "cuda"
    for b in batches:
        mask = b.content_mask()
        acts = capture(m, b.input_ids, slots, attention_mask=b.attention_mask)
        for s in slots:
            expect[s].append(acts[s][mask.to(dev)])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            rows = chunks.to_device(mask.reshape(-1).nonzero().squeeze(1), dev)
            buf.add(acts, rows, at)
            perm = chunks.to_device(torch.randperm(at + rows.shape[0]), dev)
            got = buf.rows(perm[:16])  # [S, 16, d]
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        at += rows.shape[0]
        ref = torch.stack([torch.cat(expect[s]) for s in slots])
        assert got.shape == (2, min(16, at), m.d_model)
        assert torch.equal(got, ref[:, perm[:16]])
    assert buf.x is not None and buf.x.dtype == m.dtype and buf.x.device.type == dev.type


def test_the_gpu_profile_and_the_pinned_profiles():
    """The gpu profile is the default recipe at GPU batch shapes on >= 20M tokens; the default
    and quick packs keep the cache folders (digests) they always had."""
    from saeflow.lm.corpus_spec import parse_corpus_spec
    from saeflow.saes.recipes import EMBEDDED_NAMES, PROFILES, embedded_pack_dir

    assert embedded_pack_dir("default").name == "embedded-default-e70f28753c"
    assert embedded_pack_dir("quick").name == "embedded-quick-88458d56a9"
    gpu, default = PROFILES["gpu"], PROFILES["default"]
    assert EMBEDDED_NAMES["embedded-gpu"] == "gpu"
    assert gpu.tokens >= 20_000_000 and gpu.width >= 4096 and gpu.k == 32
    same = ("positions", "layers", "architecture", "input_norm", "dim_cap", "aux_activation",
            "resample_dead", "warmup_frac", "decay_frac", "seed", "ctx_len")
    assert all(getattr(gpu, f) == getattr(default, f) for f in same)
    # the dead window is the default's 16 steps
    assert gpu.dead_tokens // gpu.batch_size == default.dead_tokens // default.batch_size
    names = {n for n, _ in parse_corpus_spec(gpu.corpus)}
    assert names == {"wiki", "python"}
    # the chunk buffer of the 54 SAEs (bf16, d 640) and the init's blocks (~5 float32 copies
    # of at most INIT_BLOCK_BYTES) stay well inside an 80 GB card, with overlap's second set
    rows = gpu.chunk_tokens + gpu.model_batch * gpu.ctx_len
    assert 2 * 54 * rows * 640 * 2 + 5 * stacked.INIT_BLOCK_BYTES < 30e9  # 2 sets: overlap
    assert replace(gpu).identity() == gpu.identity()


# --- overlap: the stream hand-over --------------------------------------------------------------
class RecordedStreams(chunks.Streams):
    """Two modelled streams ("main", "side") with vector clocks: an op's clock says which ops of
    each stream are known to be done before it runs; events carry the recording stream's clock
    and `wait` merges it in, as CUDA's stream semantics do."""

    def __init__(self):
        self.on, self.side = True, None
        self.current = "main"
        self.clock = {"main": collections.Counter(), "side": collections.Counter()}
        self.ops: list[tuple[str, str, int, dict]] = []  # (kind, stream, key, clock)

    @contextlib.contextmanager
    def capturing(self):
        before, self.current = self.current, "side"
        try:
            yield
        finally:
            self.current = before

    def op(self, kind: str, key: int) -> None:
        c = self.clock[self.current]
        c[self.current] += 1
        self.ops.append((kind, self.current, key, dict(c)))

    def record(self):
        self.op("record", -1)
        return dict(self.clock[self.current])

    def wait(self, event) -> None:
        if event is not None:
            c = self.clock[self.current]
            for s, n in event.items():
                c[s] = max(c[s], n)


def _before(a, b) -> bool:
    """Op a is done before op b starts (same stream in order, or through events)."""
    _, sa, _, ca = a
    return ca[sa] <= b[3].get(sa, 0)


def test_overlap_hand_over_is_race_free_and_trains_the_serial_pack(tiny_models, tmp_path,
                                                                   monkeypatch):
    m = tiny_models["llama"]
    cfg = tiny_cfg(engine="stacked", tokens=5000, chunk_tokens=1000, batch_size=96)
    serial = train_family(m, cfg, tmp_path / "serial", progress=False).pack

    rec = RecordedStreams()
    monkeypatch.setattr(fam, "ChunkCapture", functools.partial(chunks.ChunkCapture, streams=rec))
    sets: dict[int, int] = {}  # id(buffer set) -> set index
    captured = [0]  # chunks whose capture is queued (ready recorded)

    real_add, real_record = chunks.ChunkBuffer.add, rec.record

    def add(self, acts, rows, at):
        rec.op("write", captured[0])
        return real_add(self, acts, rows, at)

    def record():
        ev = real_record()
        if rec.current == "side":
            captured[0] += 1
        return ev

    real_train, real_check = fam._train_chunk, fam._checked_metrics
    trained = [0]

    def train(groups, bufs, *a):
        sets.setdefault(id(bufs), len(sets))
        rec.op("train", trained[0])
        real_train(groups, bufs, *a)
        trained[0] += 1

    def check(*a):
        rec.op("metrics", trained[0] - 1)
        return real_check(*a)

    monkeypatch.setattr(chunks.ChunkBuffer, "add", add)
    monkeypatch.setattr(rec, "record", record)
    monkeypatch.setattr(fam, "_train_chunk", train)
    monkeypatch.setattr(fam, "_checked_metrics", check)
    overlapped = train_family(m, cfg, tmp_path / "overlap", progress=False).pack
    _assert_same_pack(serial, overlapped)

    assert len(sets) == 2  # the chunks alternate between two buffer sets
    writes = [o for o in rec.ops if o[0] == "write"]
    trains = [o for o in rec.ops if o[0] == "train"]
    assert {o[1] for o in writes} == {"side"} and {o[1] for o in trains} == {"main"}
    n = len(trains)
    assert n == cfg.tokens // cfg.chunk_tokens
    for t in trains:
        c = t[2]
        # every write of chunk c is done before c trains ...
        assert all(_before(w, t) for w in writes if w[2] == c)
        # ... and c's training before chunk c + 2 overwrites the same buffers
        assert all(_before(t, w) for w in writes if w[2] == c + 2)
    # and the overlap is real: chunk c + 1's capture is queued before c's metrics are read
    order = [(o[0], o[2]) for o in rec.ops if o[0] in ("write", "metrics")]
    for c in range(n - 1):
        assert order.index(("write", c + 1)) < order.index(("metrics", c))

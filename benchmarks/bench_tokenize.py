"""The host's tokenising for training: `count_tokens` (the corpus check before training) and the
training batches (tokenise + pack into rows, no forward), with the tokenizer's parallelism off
(the process-wide setting, the baseline) and on (`parallel_tokenizing`, what training uses
now), alternated in one run on the gpu profile's corpus and shapes.

    .venv/bin/python benchmarks/bench_tokenize.py [--tokens 2M] [--repeats 2]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="2M")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", default="gpu")
    a = ap.parse_args()

    import torch

    from saeflow.lm.corpora import Corpus
    from saeflow.lm.corpus_spec import parse_tokens
    from saeflow.lm.model import load_model, parallel_tokenizing
    from saeflow.saes.recipes import PROFILES
    from saeflow.saes.train.family import count_tokens

    limit = parse_tokens(a.tokens)
    m = load_model("embedded")
    cfg = PROFILES[a.profile]
    print(f"{a.profile} profile corpus {cfg.corpus!r}, {limit} tokens, model batch "
          f"{cfg.model_batch} x {cfg.ctx_len}; torch threads {torch.get_num_threads()}")

    def batches() -> int:
        k = 0
        corpus = Corpus.from_spec(cfg.corpus, seed=cfg.seed)
        for b in corpus.token_batches(m.tokenizer, cfg.model_batch, cfg.ctx_len):
            k += int(b.content_mask().sum())
            if k >= limit:
                return k
        return k

    def count() -> int:
        return count_tokens(Corpus.from_spec(cfg.corpus, seed=cfg.seed), m.tokenizer, cfg, limit)

    import saeflow.saes.train.family as fam

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.repeats):
        for mode in ("off", "on"):
            # count_tokens turns parallelism on by itself: the baseline replaces that with a no-op
            fam.parallel_tokenizing = (parallel_tokenizing if mode == "on"
                                       else contextlib.nullcontext)
            for name, fn in (("count_tokens", count), ("batches", batches)):
                ctx = parallel_tokenizing() if mode == "on" and name == "batches" \
                    else contextlib.nullcontext()
                t = time.perf_counter()
                with ctx:
                    n = fn()
                times.setdefault((name, mode), []).append(n / (time.perf_counter() - t))
    for name in ("count_tokens", "batches"):
        off = statistics.median(times[(name, "off")])
        on = statistics.median(times[(name, "on")])
        print(f"{name:>12}: parallelism off {off:9,.0f} tok/s, on {on:9,.0f} tok/s: "
              f"on / off {on / off:.2f}x")


if __name__ == "__main__":
    main()

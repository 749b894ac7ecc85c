"""ΔCE / KL scoring of a spliced SAE: the current form (saes.evaluate.nll_and_kl: log-probabilities
in place, the clean distribution's exp and entropy once per batch, blockwise sums) against the
earlier log_softmax form, on the same real logits, in one run.

Both score the same held-out batch of the embedded model with one resid_post SAE spliced in
(the pack given, default: the embedded pack); the forward is shared, only the scoring differs.
Prints the time per SAE and batch of each, their ratio, and the largest difference of the
per-token NLL and KL.

    .venv/bin/python benchmarks/bench_splice.py [--pack embedded] [--rows 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def score_log_softmax(logits, clean_logp, tgt):
    """The earlier form: a log_softmax, an exp of the clean log-probabilities, temporaries."""
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(1, tgt[:, None])[:, 0]
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(1)
    return nll, kl


def score_current(logits, clean_p, neg_entropy, tgt):
    """saeflow's form (saes.evaluate.nll_and_kl); it turns `logits` into log-probabilities."""
    from saeflow.saes.evaluate import nll_and_kl

    return nll_and_kl(logits, clean_p, neg_entropy, tgt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", default="embedded")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--rows", type=int, default=8, help="text rows of 128 tokens per batch")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from saeflow import HookPoint, Hooks, load_model
    from saeflow.lm.corpora import DEFAULT_SPEC, Corpus
    from saeflow.saes.recipes import open_pack

    model = load_model("embedded")
    pack = open_pack(args.pack, model=model)
    sae = pack.sae("resid_post", args.layer, dtype=torch.float32)
    b = next(Corpus.from_spec(DEFAULT_SPEC, seed=0).token_batches(model.tokenizer, args.rows, 128,
                                                                  split="heldout"))
    mask = b.content_mask()
    tm = mask[:, 1:]
    tgt = b.input_ids[:, 1:][tm]

    def splice(a):
        out = a.clone()
        out[mask] = sae(a[mask].float()).to(a.dtype)
        return out
    with torch.inference_mode():
        clean_logp = torch.log_softmax(
            model.hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1][tm]
            .float(), -1)
        clean_p = clean_logp.exp()
        neg_entropy = (clean_p * clean_logp).sum(1, dtype=torch.float64)
        with Hooks(model, edits={HookPoint("resid_post", args.layer): splice}):
            logits = model.hf(input_ids=b.input_ids,
                              attention_mask=b.attention_mask).logits[:, :-1][tm].float()
        print(f"{tgt.numel()} target tokens x vocabulary {logits.shape[1]}; "
              f"{torch.get_num_threads()} threads")
        t_old, t_new = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ref = score_log_softmax(logits, clean_logp, tgt)
            t_old.append(time.perf_counter() - t)
            work = logits.clone()  # the new form works in place
            t = time.perf_counter()
            got = score_current(work, clean_p, neg_entropy, tgt)
            t_new.append(time.perf_counter() - t)
        t = time.perf_counter()
        with Hooks(model, edits={HookPoint("resid_post", args.layer): splice}):
            model.hf(input_ids=b.input_ids, attention_mask=b.attention_mask)
        t_fwd = time.perf_counter() - t
    old, new = statistics.median(t_old), statistics.median(t_new)
    print(f"log_softmax form: {old * 1e3:7.0f} ms   current form: {new * 1e3:7.0f} ms   "
          f"ratio {old / new:.2f}x   (the spliced forward itself: {t_fwd * 1e3:.0f} ms)")
    print(f"per SAE and batch: {(old + t_fwd) * 1e3:.0f} ms -> {(new + t_fwd) * 1e3:.0f} ms "
          f"({(old + t_fwd) / (new + t_fwd):.2f}x)")
    exact = torch.log_softmax(logits.double(), -1)
    clean64 = clean_logp.double()
    kl64 = (clean64.exp() * (clean64 - exact)).sum(1)
    for name, (nll, kl) in (("log_softmax form", ref), ("current form", got)):
        print(f"{name}: max |NLL - float64| {float((nll + exact.gather(1, tgt[:, None])[:, 0]).abs().max()):.1e}, "
              f"max |KL - float64| {float((kl - kl64).abs().max()):.1e}, "
              f"mean KL {float(kl.mean()):.5f} (float64 {float(kl64.mean()):.5f})")


if __name__ == "__main__":
    main()

"""ΔCE and KL of spliced SAEs (the expensive half of `saeflow eval`): the SAE's reconstruction
replaces the activation at its position on document tokens, and the next-token cross-entropy and
the KL divergence from the clean distribution are summed per piece (one document's tokens in one
text row), so that the 95% bootstrap intervals can resample whole documents or rows
(saeflow.intervals). A resid_post splice runs only the layers after its own (`from_layer`)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from saeflow.errors import CorpusError
from saeflow.intervals import bootstrap_ratio_ci, cluster_sums
from saeflow.lm.hooks import HookPoint, Hooks
from saeflow.lm.model import LoadedModel


def nll_and_kl(logits, clean_p, neg_entropy, tgt, rows: int = 128):
    """Per-token NLL of `tgt` and KL(clean || spliced) from the spliced logits [n, vocab]
    (float32; turned into log-probabilities in place), the clean probabilities [n, vocab] and
    sum p log p [n] (float64).

    The clean exp and entropy are computed once per batch, not per SAE, and the only temporary
    is a block of `rows` rows: the vocabulary is 262k on Gemma 3, so each full-size temporary
    is a GB at 1k tokens. The dot product is an elementwise product summed per block (torch's
    reduction, 4e-6 nats from float64 on real logits); a float32 matrix-vector product over the
    262k terms was off by up to 1e-2 nats per token (benchmarks/bench_splice.py)."""
    logits -= torch.logsumexp(logits, -1, keepdim=True)  # log q
    nll = -logits.gather(1, tgt[:, None])[:, 0]
    cross = torch.cat([(clean_p[i:i + rows] * logits[i:i + rows]).sum(1).double()
                       for i in range(0, len(logits), rows)])  # sum p log q
    return nll, (neg_entropy - cross).float()


def edited_output(output, edit):
    """A decoder layer's output object with its hidden states replaced by edit(hidden)."""
    if isinstance(output, tuple):
        return (edit(output[0]),) + output[1:]
    return edit(output)


@contextmanager
def from_layer(model: LoadedModel, layer: int, output):
    """Forward passes that start after decoder layer `layer`: that layer returns `output` (its
    clean output, edited) and the layers before it return it too without computing (their
    results are never read). The layers after it, the final norm and the LM head run as usual,
    on the same inputs as in a full forward with the edit hooked in, so the logits are the
    same; the layers up to `layer` are saved (half the body on average). Not for a model that
    other threads use at the same time (the layers' forward is replaced for the block)."""
    mods = [model.hook_module("resid_post", i) for i in range(layer + 1)]
    own = [m.__dict__.get("forward") for m in mods]

    def skip(*args, **kwargs):
        return output
    try:
        for m in mods:
            m.forward = skip
        yield
    finally:
        for m, f in zip(mods, own):
            if f is None:
                del m.forward
            else:
                m.forward = f


class _PieceSums:
    """Per-piece sums for the bootstrap: a piece is the scored tokens of one document in one
    text row (a row may hold several documents, a document may span rows and batches). Pieces
    sum up to documents or to rows, whichever the interval resamples."""

    def __init__(self, slots) -> None:
        self.row: list = []  # [pieces] global index of the row, per batch
        self.doc: list = []  # [pieces] document id (Corpus.document), per batch
        self.n: list = []  # [pieces] scored tokens
        self.clean: list = []  # [pieces] clean NLL
        self.ce: dict = {s: [] for s in slots}  # [pieces] spliced NLL, per SAE
        self.kl: dict = {s: [] for s in slots}
        self.rows_before = 0  # text rows of the batches before this one
        self._of: torch.Tensor | None = None  # [n_tgt] the piece of each target token
        self._count = 0

    def start_batch(self, tgt_mask: torch.Tensor, doc_ids: torch.Tensor, n_rows: int) -> None:
        """The pieces of a batch: its target tokens [rows, seq - 1] and their documents."""
        row_of = torch.nonzero(tgt_mask)[:, 0]  # [n_tgt] the row of each target token
        doc_of = doc_ids.to(tgt_mask.device)[:, 1:][tgt_mask]  # [n_tgt] its document
        pieces, self._of = torch.unique(torch.stack([row_of, doc_of], 1), dim=0,
                                        return_inverse=True)
        self._count = len(pieces)
        pieces = pieces.cpu().numpy()
        self.row.append(self.rows_before + pieces[:, 0])
        self.doc.append(pieces[:, 1])
        self.rows_before += n_rows

    def sums(self, v: torch.Tensor) -> np.ndarray:
        """[n_tgt] per-token values -> [pieces] sums (float64)."""
        assert self._of is not None
        return torch.zeros(self._count, dtype=torch.float64, device=v.device).index_add_(
            0, self._of, v.double()).cpu().numpy()

    def result(self, totals: dict, n_tok: int, clean_total: float, ci_by: str) -> dict:
        """Mean CE and KL per SAE with their 95% intervals, resampling documents or rows."""
        rows_p, docs_p = np.concatenate(self.row), np.concatenate(self.doc)
        keys = docs_p if ci_by == "document" else rows_p
        _, n_c, clean_c = cluster_sums(keys, np.concatenate(self.n), np.concatenate(self.clean))
        per_sae = {}
        for s, v in totals.items():
            _, ce_c, kl_c = cluster_sums(keys, np.concatenate(self.ce[s]),
                                         np.concatenate(self.kl[s]))
            per_sae[s] = {"ce": v["ce"] / n_tok, "kl": v["kl"] / n_tok,
                          "delta_ce_ci": bootstrap_ratio_ci(ce_c - clean_c, n_c),
                          "kl_ci": bootstrap_ratio_ci(kl_c, n_c)}
        return {"tokens": n_tok, "clean_ce": clean_total / n_tok, "per_sae": per_sae,
                "documents": len(np.unique(docs_p)), "rows": len(np.unique(rows_p))}


def _clean_forward(model: LoadedModel, ids, am, resid_layers: list[int]):
    """The clean logits [rows, seq, vocab], and each spliced residual layer's output, so that a
    resid_post splice runs only the layers after its own (from_layer)."""
    clean_out: dict[int, object] = {}
    handles = [model.hook_module("resid_post", L).register_forward_hook(
        lambda mod, args, out, L=L: clean_out.__setitem__(L, out))
        for L in resid_layers]
    try:
        logits = model.hf(input_ids=ids, attention_mask=am).logits
    finally:
        for h in handles:
            h.remove()
    return logits, clean_out


def _spliced_logits(model: LoadedModel, slot, sae, ids, am, mask, clean_out: dict):
    """The logits [rows, seq, vocab] with the SAE's reconstruction at `slot` on the content
    tokens (`mask` [rows, seq])."""

    def splice(act):
        out = act.clone()
        out[mask] = sae(act[mask].float()).to(act.dtype)
        return out
    if slot[0] == "resid_post":
        with from_layer(model, slot[1], edited_output(clean_out[slot[1]], splice)):
            return model.hf(input_ids=ids, attention_mask=am).logits
    with Hooks(model, edits={HookPoint(*slot): splice}):
        return model.hf(input_ids=ids, attention_mask=am).logits


def splice_ce(pack, model, slots, sae_of, data, ce_tokens, batch, ctx_len, progress,
               ci_by: str = "document"):
    from tqdm.auto import tqdm
    dev = model.device
    totals = {s: {"ce": 0.0, "kl": 0.0} for s in slots}
    clean_total, n_tok = 0.0, 0
    pieces = _PieceSums(slots)
    bar = tqdm(total=ce_tokens, unit="tok", desc=f"eval: splice {len(slots)} SAEs",
               disable=not progress)
    # each row costs len(slots) + 1 forwards with the LM head: never more rows than asked
    batch = max(1, min(batch, -(-ce_tokens // ctx_len)))
    resid_layers = sorted({L for p, L in slots if p == "resid_post"})
    with torch.inference_mode():
        for b in data.token_batches(model.tokenizer, batch, ctx_len, split="heldout"):
            ids = b.input_ids.to(dev)
            am = b.attention_mask.to(dev)
            mask = b.content_mask().to(dev)
            tgt_mask = mask[:, 1:]  # predict document tokens only
            tgt = ids[:, 1:][tgt_mask]
            if tgt.numel() == 0:
                pieces.rows_before += ids.shape[0]
                continue
            clean_logits, clean_out = _clean_forward(model, ids, am, resid_layers)
            clean_logp = torch.log_softmax(clean_logits[:, :-1][tgt_mask].float(), -1)
            del clean_logits
            clean_p = clean_logp.exp()  # [n_tgt, vocab]
            neg_entropy = (clean_p * clean_logp).sum(1, dtype=torch.float64)  # [n_tgt]
            pieces.start_batch(tgt_mask, b.doc_ids, ids.shape[0])
            clean_nll = -clean_logp.gather(1, tgt[:, None])[:, 0]
            clean_total += float(clean_nll.sum())
            pieces.n.append(pieces.sums(torch.ones_like(clean_nll)))
            pieces.clean.append(pieces.sums(clean_nll))
            for s in slots:
                logits = _spliced_logits(model, s, sae_of(s), ids, am, mask, clean_out)
                logits = logits[:, :-1][tgt_mask].float()
                nll, kl = nll_and_kl(logits, clean_p, neg_entropy, tgt)
                del logits
                totals[s]["ce"] += float(nll.sum())
                totals[s]["kl"] += float(kl.sum())
                pieces.ce[s].append(pieces.sums(nll))
                pieces.kl[s].append(pieces.sums(kl))
            n_tok += tgt.numel()
            bar.update(tgt.numel())
            if n_tok >= ce_tokens:
                break
    bar.close()
    if n_tok == 0:
        raise CorpusError("the held-out split gave no tokens to score")
    return pieces.result(totals, n_tok, clean_total, ci_by)

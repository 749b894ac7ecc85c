"""Quality of every SAE of a pack on held-out text.

Pass 1 (one forward per batch, all SAEs): FVU and mean L0 on `tokens` held-out tokens; the
firing counts go on to `dead_tokens` (50k by default), so that the dead fraction (never active on
those tokens) and the dense fraction (active on more than 10% of them) are not an artefact of a
short sample: a latent that fires once in 20k tokens is alive, and 5k tokens would call it dead.
Pass 2 (one forward per SAE per batch): the SAE's reconstruction replaces the activation at its
position, on document tokens (BOS and separators keep their own activations, as SAEs are
trained without them); we report the change of next-token cross-entropy (ΔCE) and the KL
divergence from the clean next-token distribution, each with a 95% bootstrap interval by
document: whole source documents are resampled with replacement, each with all its scored
tokens (Corpus.token_batches packs several documents into a row and splits long ones across
rows; every token carries its document's id). Resampling rows instead treats the pieces of one
document as independent and leaves out the variation between documents, which dominates: on the
embedded model ΔCE at resid layer 6 moved from 0.37 to 0.43-0.57 between samples of a few
thousand tokens, far outside a row interval of +-0.05 (issue 25).

FVU alone can be fooled: in Gemma's residual stream a few "massive" dimensions carry most of
the variance, so an SAE that only reconstructs them scores well. `fvu_rest` leaves those
dimensions out (they are named in `massive_dims`: each carries at least 10% of the variance,
or 1000x the median dimension's).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saeflow.errors import ConfigError, CorpusError
from saeflow.lm.corpora import DEFAULT_SPEC, Corpus
from saeflow.lm.hooks import HookPoint, Hooks, capture
from saeflow.lm.model import LoadedModel
from saeflow.saes.packs import Pack

DENSE_FRACTION = 0.10
KEEP_IN_MEMORY_BYTES = 4 << 30  # below this, all SAEs stay loaded for the whole evaluation
# A dimension is massive when it alone carries this share of the variance, or its variance is
# this many times the median dimension's. On the embedded model's residual stream that picks
# 2 / 10 / 2 / 1 dimensions at layers 0 / 3 / 6 / 9 (one carries 95% of the variance at layer 0).
MASSIVE_SHARE = 0.10
MASSIVE_FACTOR = 1000.0
BOOTSTRAP_SAMPLES = 2000
CI_UNITS = ("document", "row")  # what the ΔCE / KL bootstrap resamples
DEAD_TOKENS = 50_000  # held-out tokens on which the dead and dense fractions are counted


def massive_dims(var: torch.Tensor, share: float = MASSIVE_SHARE,
                 factor: float = MASSIVE_FACTOR) -> list[int]:
    """Indices of the dimensions (variance [d]) that carry at least `share` of the total
    variance, or whose variance is at least `factor` x the median dimension's."""
    total, med = float(var.sum()), float(var.median())
    if total <= 0:
        return []
    # a large share alone is no outlier in a small or flat space: it must stand out, too
    big = (var >= share * total) & (var >= 10 * med)
    if med > 0:
        big |= var >= factor * med
    return torch.nonzero(big).flatten().tolist()


def bootstrap_ratio_ci(num: "np.ndarray", den: "np.ndarray", samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of sum(num) / sum(den) when the clusters [R] (documents, or
    rows) are resampled with replacement; num and den are per-cluster sums."""

    R = len(num)
    if R < 2:
        v = float(num.sum() / max(den.sum(), 1e-12))
        return v, v
    idx = np.random.default_rng(seed).integers(0, R, size=(samples, R))
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def cluster_sums(keys: "np.ndarray", *values: "np.ndarray") -> tuple["np.ndarray", ...]:
    """(unique keys [C] sorted, then each of `values` summed per key [C]) from per-item keys
    [n] and values [n]: the per-document sums of per-token (or per-piece) values."""
    uniq, inv = np.unique(np.asarray(keys), return_inverse=True)
    return (uniq, *(np.bincount(inv, weights=np.asarray(v, dtype=np.float64),
                                minlength=len(uniq)) for v in values))


def cluster_ratio_ci(keys: "np.ndarray", num: "np.ndarray", den: "np.ndarray",
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% cluster-bootstrap interval of sum(num) / sum(den): items (tokens, or per-document
    pieces of a row) with equal `keys` are summed into one cluster, and clusters are resampled
    whole."""
    _, n, d = cluster_sums(keys, num, den)
    return bootstrap_ratio_ci(n, d, samples, seed)


def ci_method(unit: str, samples: int = BOOTSTRAP_SAMPLES) -> str:
    return f"bootstrap by {unit}, {samples} resamples"


@dataclass
class _Acc:
    sse: float = 0.0
    sum_sq: float = 0.0
    n: int = 0
    l0_sum: float = 0.0
    x_sum: torch.Tensor | None = None  # [d] float64
    sq_dim: torch.Tensor | None = None  # [d] float64: sum of x^2 per dimension
    sse_dim: torch.Tensor | None = None  # [d] float64: sum of squared error per dimension
    fire: torch.Tensor | None = None  # [d_sae] count of tokens where the latent fired


def evaluate_pack(pack: Pack, model: LoadedModel, tokens: int = 8192, ce_tokens: int = 1024,
                  corpus: str = DEFAULT_SPEC, seed: int = 0, batch: int = 8,
                  ctx_len: int = 128, progress: bool = True,
                  dead_tokens: int = DEAD_TOKENS, ce_positions: list[str] | None = None,
                  ci_by: str = "document") -> dict:
    """Return {"saes": [row per SAE], "clean_ce": float, ...} on the held-out split.

    FVU / L0 on `tokens` held-out tokens; dead and dense fractions on max(tokens, dead_tokens);
    ΔCE / KL on `ce_tokens`, splicing the SAEs at `ce_positions` (default: all; every spliced
    SAE costs a full forward with the LM head per token, so this is the expensive part). SAEs at
    other positions get None for ΔCE and KL. Their 95% intervals resample whole documents
    (ci_by "document"; "row" resamples the fixed-length text rows, which understates the
    spread); ce_documents, ce_tokens and ce_ci_method record what they rest on."""
    from tqdm.auto import tqdm

    if ci_by not in CI_UNITS:
        raise ConfigError(f"ci_by must be one of {', '.join(CI_UNITS)}, got {ci_by!r}")
    pack.check_model(model)
    slots = sorted(pack.entries)
    have = sorted({s[0] for s in slots})
    missing = sorted(set(ce_positions or []) - set(have))
    if missing:  # before any pass over the text
        raise ConfigError(f"no SAE of the pack is at --ce-positions {', '.join(missing)}; the "
                          f"pack has {', '.join(have)}")
    ce_positions = ce_positions or None  # empty: all
    points = [HookPoint(p, L) for p, L in slots]
    dev = model.device
    total = sum(2 * pack.entries[s].d_in * pack.entries[s].d_sae * 4 for s in slots)
    # Loading every SAE once beats re-reading them from disk for every batch.
    saes = {s: pack.sae(*s, device=dev, dtype=torch.float32) for s in slots} \
        if total <= KEEP_IN_MEMORY_BYTES else None

    def sae_of(s):
        return saes[s] if saes is not None else pack.sae(*s, device=dev, dtype=torch.float32)

    data = Corpus.from_spec(corpus, seed=seed)
    acc = {s: _Acc() for s in slots}
    limit = max(tokens, dead_tokens)
    bar = tqdm(total=limit, unit="tok", desc="eval: reconstruction + firing", disable=not progress)
    seen = 0
    with torch.inference_mode():
        for b in data.token_batches(model.tokenizer, batch, ctx_len, split="heldout"):
            mask = b.content_mask().to(dev)
            acts = capture(model, b.input_ids, points, attention_mask=b.attention_mask)
            full = seen < tokens  # past `tokens`, only the firing counts go on
            for s, pt in zip(slots, points):
                x = acts[pt][mask].float()  # [n, d]
                sae = sae_of(s)
                z = sae.encode(x)
                a = acc[s]
                cnt = (z > 0).sum(0)
                a.fire = cnt if a.fire is None else a.fire + cnt
                if not full:
                    continue
                err = sae.decode(z) - x
                a.sse += float(err.pow(2).sum())
                a.sum_sq += float(x.pow(2).sum())
                xd = x.double()
                for name, v in (("x_sum", xd.sum(0)), ("sq_dim", xd.pow(2).sum(0)),
                                ("sse_dim", err.double().pow(2).sum(0))):
                    cur = getattr(a, name)
                    setattr(a, name, v if cur is None else cur + v)
                a.n += x.shape[0]
                a.l0_sum += float(cnt.sum())
            n_new = int(mask.sum())
            seen += n_new
            bar.update(n_new)
            if seen >= limit:
                break
    bar.close()
    if seen == 0:
        raise CorpusError("the held-out split gave no tokens")

    # Pass 2: splicing.
    spliced = [s for s in slots if ce_positions is None or s[0] in ce_positions]
    ce = _splice_ce(pack, model, spliced, sae_of, data, ce_tokens, batch, ctx_len, progress,
                    ci_by)
    rows = []
    for s in slots:
        a = acc[s]
        assert a.x_sum is not None and a.sq_dim is not None and a.sse_dim is not None \
            and a.fire is not None  # every slot saw tokens (seen > 0)
        var = a.sum_sq - float(a.x_sum.pow(2).sum()) / a.n
        var_dim = (a.sq_dim - a.x_sum.pow(2) / a.n).cpu()  # [d]
        massive = massive_dims(var_dim)
        rest = torch.ones(len(var_dim), dtype=torch.bool)
        rest[massive] = False
        fvu_rest = float(a.sse_dim.cpu()[rest].sum() / var_dim[rest].sum().clamp_min(1e-12))
        freq = a.fire.float() / seen
        info = pack.entries[s]
        pc = ce["per_sae"].get(s)
        rows.append({
            "position": s[0], "layer": s[1], "d_sae": info.d_sae,
            "architecture": info.architecture,
            "fvu": a.sse / max(var, 1e-12),
            "fvu_rest": fvu_rest,
            "massive_dims": massive,
            "l0": a.l0_sum / a.n,
            "dead_fraction": float((a.fire == 0).float().mean()),
            "dense_fraction": float((freq > DENSE_FRACTION).float().mean()),
            "delta_ce": None if pc is None else pc["ce"] - ce["clean_ce"],
            "delta_ce_ci": None if pc is None else pc["delta_ce_ci"],
            "kl": None if pc is None else pc["kl"],
            "kl_ci": None if pc is None else pc["kl_ci"],
            "tokens": a.n,
            "dead_tokens": seen,
        })
    return {"pack": str(pack.root), "model": model.name, "tokens": acc[slots[0]].n,
            "dead_tokens": seen,
            "ce_tokens": ce["tokens"], "ce_documents": ce["documents"], "ce_rows": ce["rows"],
            "ce_ci_method": ci_method(ci_by), "ce_positions": ce_positions,
            "clean_ce": ce["clean_ce"], "saes": rows}


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


def _splice_ce(pack, model, slots, sae_of, data, ce_tokens, batch, ctx_len, progress,
               ci_by: str = "document"):
    from tqdm.auto import tqdm
    dev = model.device
    totals = {s: {"ce": 0.0, "kl": 0.0} for s in slots}
    clean_total, n_tok, rows_before = 0.0, 0, 0
    # For the bootstrap, sums per piece: the scored tokens of one document in one text row (a
    # row may hold several documents, a document may span rows and batches). Pieces sum up to
    # documents or to rows, whichever the interval resamples.
    piece_row: list = []  # [pieces] global index of the row
    piece_doc: list = []  # [pieces] document id (Corpus.document)
    piece_n: list = []
    piece_clean: list = []
    piece_ce: dict = {s: [] for s in slots}
    piece_kl: dict = {s: [] for s in slots}
    bar = tqdm(total=ce_tokens, unit="tok", desc=f"eval: splice {len(slots)} SAEs",
               disable=not progress)
    # each row costs len(slots) + 1 full forwards with the LM head: never more rows than asked
    batch = max(1, min(batch, -(-ce_tokens // ctx_len)))
    with torch.inference_mode():
        for b in data.token_batches(model.tokenizer, batch, ctx_len, split="heldout"):
            ids = b.input_ids.to(dev)
            am = b.attention_mask.to(dev)
            mask = b.content_mask().to(dev)
            tgt_mask = mask[:, 1:]  # predict document tokens only
            tgt = ids[:, 1:][tgt_mask]
            if tgt.numel() == 0:
                rows_before += ids.shape[0]
                continue
            clean_logp = torch.log_softmax(
                model.hf(input_ids=ids, attention_mask=am).logits[:, :-1][tgt_mask].float(), -1)
            clean_p = clean_logp.exp()  # [n_tgt, vocab]
            neg_entropy = (clean_p * clean_logp).sum(1, dtype=torch.float64)  # [n_tgt]
            row_of = torch.nonzero(tgt_mask)[:, 0]  # [n_tgt] the row of each target token
            doc_of = b.doc_ids.to(dev)[:, 1:][tgt_mask]  # [n_tgt] the target token's document
            pieces, piece_of = torch.unique(torch.stack([row_of, doc_of], 1), dim=0,
                                            return_inverse=True)
            n_pieces = len(pieces)
            pieces = pieces.cpu().numpy()
            piece_row.append(rows_before + pieces[:, 0])
            piece_doc.append(pieces[:, 1])
            rows_before += ids.shape[0]

            def per_piece(v):  # [n_tgt] -> [pieces] sums
                return torch.zeros(n_pieces, dtype=torch.float64, device=dev).index_add_(
                    0, piece_of, v.double()).cpu().numpy()
            clean_nll = -clean_logp.gather(1, tgt[:, None])[:, 0]
            clean_total += float(clean_nll.sum())
            piece_n.append(per_piece(torch.ones_like(clean_nll)))
            piece_clean.append(per_piece(clean_nll))
            for s in slots:
                sae = sae_of(s)

                def splice(act, sae=sae):
                    out = act.clone()
                    out[mask] = sae(act[mask].float()).to(act.dtype)
                    return out
                with Hooks(model, edits={HookPoint(*s): splice}):
                    logits = model.hf(input_ids=ids,
                                      attention_mask=am).logits[:, :-1][tgt_mask].float()
                nll, kl = nll_and_kl(logits, clean_p, neg_entropy, tgt)
                del logits
                totals[s]["ce"] += float(nll.sum())
                totals[s]["kl"] += float(kl.sum())
                piece_ce[s].append(per_piece(nll))
                piece_kl[s].append(per_piece(kl))
            n_tok += tgt.numel()
            bar.update(tgt.numel())
            if n_tok >= ce_tokens:
                break
    bar.close()
    if n_tok == 0:
        raise CorpusError("the held-out split gave no tokens to score")
    rows_p, docs_p = np.concatenate(piece_row), np.concatenate(piece_doc)
    keys = docs_p if ci_by == "document" else rows_p
    _, n_c, clean_c = cluster_sums(keys, np.concatenate(piece_n), np.concatenate(piece_clean))
    per_sae = {}
    for s, v in totals.items():
        _, ce_c, kl_c = cluster_sums(keys, np.concatenate(piece_ce[s]),
                                     np.concatenate(piece_kl[s]))
        per_sae[s] = {"ce": v["ce"] / n_tok, "kl": v["kl"] / n_tok,
                      "delta_ce_ci": bootstrap_ratio_ci(ce_c - clean_c, n_c),
                      "kl_ci": bootstrap_ratio_ci(kl_c, n_c)}
    return {"tokens": n_tok, "clean_ce": clean_total / n_tok, "per_sae": per_sae,
            "documents": len(np.unique(docs_p)), "rows": len(np.unique(rows_p))}


def format_table(result: dict) -> str:
    dead_n = result.get("dead_tokens", result["tokens"])
    docs = result.get("ce_documents")
    method = result.get("ce_ci_method", "bootstrap by text row")  # earlier eval.json: by row
    lines = [f"pack {result['pack']} on {result['model']}: FVU/L0 on {result['tokens']} held-out "
             f"tokens, dead/dense on {dead_n}; ΔCE/KL on {result['ce_tokens']}"
             f"{'' if docs is None else f' tokens of {docs} documents'} (95% intervals, "
             f"{method}); clean CE {result['clean_ce']:.4f}",
             f"{'position':<11}{'layer':>5} {'d_sae':>7} {'FVU':>7} {'FVUrest':>7} {'L0':>7} "
             f"{'dead':>6} {'dense':>6} {'ΔCE [95% CI]':>26} {'KL':>8}  massive dims"]
    nan = float("nan")
    for r in result["saes"]:
        lo, hi = r.get("delta_ce_ci") or (nan, nan)
        r = {**r, "delta_ce": nan if r["delta_ce"] is None else r["delta_ce"],
             "kl": nan if r["kl"] is None else r["kl"]}
        lines.append(f"{r['position']:<11}{r['layer']:>5} {r['d_sae']:>7} {r['fvu']:>7.3f} "
                     f"{r.get('fvu_rest', float('nan')):>7.3f} {r['l0']:>7.1f} "
                     f"{r['dead_fraction']:>6.3f} {r['dense_fraction']:>6.3f} "
                     f"{r['delta_ce']:>8.4f} [{lo:>7.4f}, {hi:>7.4f}] {r['kl']:>8.4f}  "
                     f"{','.join(map(str, r.get('massive_dims', []))) or '-'}")
    return "\n".join(lines)

"""What a feature writes: its decoder direction through the unembedding (logit lens), the
token strings, and a short automatic label from the evidence of the index."""
from __future__ import annotations

import math

import numpy as np
import torch

from saeflow.lm.model import bf16_is_faster


# --- logit lens -----------------------------------------------------------------------------
def unembed_directions(model, dirs: torch.Tensor, W_U: torch.Tensor | None = None,
                       keep_dtype: bool = False) -> torch.Tensor:
    """Residual directions [n, d_model] -> logits [n, vocab] through the final norm's gain.

    The norm's 1/rms (or 1/std) factor is a positive scalar per token and does not change the
    ranking; LayerNorm's centring does, so it is applied. Gemma's gain is (1 + w). `W_U`
    [vocab, d_model] may be passed in another dtype (logit_lens casts it once, not per block);
    the logits come back in float32, or in W_U's dtype with `keep_dtype`.
    """
    norm = model.module(model.arch.final_norm)
    x = dirs.to(device=norm.weight.device, dtype=torch.float32)  # directions may live on the CPU
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(dim=-1, keepdim=True)
    w = norm.weight.detach().float()
    gain = (1.0 + w) if model.arch.family in ("gemma2", "gemma3") else w
    if W_U is None:
        W_U = model.hf.get_output_embeddings().weight.detach()  # [vocab, d_model]
    x = (x * gain).to(device=W_U.device, dtype=W_U.dtype)
    return x @ W_U.T if keep_dtype else (x @ W_U.T).float()


def logit_lens(model, dirs: torch.Tensor, n: int = 10, block: int = 4096,
               vocab_block: int = 16384):
    """Top and bottom n tokens of each direction: (top_ids, top_vals, bot_ids, bot_vals) [N, n].

    Tiled over the vocabulary with a running top-n, so the [vocab, d_model] unembedding is read
    once per `block` directions (small blocks make it memory-bound). It is cast once: to bf16
    where bf16 matmuls are faster (GPUs, CPUs with AVX-512 BF16), else kept in fp32 (a CPU
    without bf16 units emulates them, much slower than fp32).
    """

    W_U = model.hf.get_output_embeddings().weight.detach()  # [vocab, d_model]
    fast_bf16 = dirs.shape[0] >= 64 and bf16_is_faster(W_U.device)
    W_U = W_U.to(torch.bfloat16 if fast_bf16 else torch.float32)
    V = W_U.shape[0]
    outs: list[list[torch.Tensor]] = [[], [], [], []]
    for i in range(0, dirs.shape[0], block):
        b = min(block, dirs.shape[0] - i)
        top_v = torch.full((b, n), -float("inf"))
        bot_v = torch.full((b, n), float("inf"))
        top_i = torch.zeros(b, n, dtype=torch.long)
        bot_i = torch.zeros(b, n, dtype=torch.long)
        for j in range(0, V, vocab_block):
            # In W_U's dtype: converting a bf16 block to float32 cost more than its top-k, and
            # the selected values are the same (bf16 -> float32 is exact).
            logits = unembed_directions(model, dirs[i:i + b], W_U[j:j + vocab_block],
                                        keep_dtype=True).cpu()
            m = min(n, logits.shape[1])  # [b, vb] -> merge its top/bottom m into the running n
            tv, ti = logits.topk(m, dim=1)
            bv, bi = logits.topk(m, dim=1, largest=False)
            tv, bv = tv.float(), bv.float()
            top_v, sel = torch.cat([top_v, tv], 1).topk(n, dim=1)
            top_i = torch.cat([top_i, ti + j], 1).gather(1, sel)
            bot_v, sel = torch.cat([bot_v, bv], 1).topk(n, dim=1, largest=False)
            bot_i = torch.cat([bot_i, bi + j], 1).gather(1, sel)
        for o, t in zip(outs, (top_i, top_v, bot_i, bot_v)):
            o.append(t)
    return tuple(torch.cat(o) for o in outs)


# --- labels ---------------------------------------------------------------------------------
def token_strings(tokenizer, ids) -> dict[int, str]:
    """Readable text of each token id (decoded one at a time, so spaces and bytes show)."""
    return {int(i): tokenizer.decode([int(i)]) for i in sorted(set(int(i) for i in ids) - {-1})}


def auto_label(center_ids: list[int], weights: list[float], logit_ids: list[int],
               strings: dict[int, str], doc_freq: np.ndarray, n_docs_tokens: int,
               n_words: int = 3) -> tuple[str, list[str]]:
    """A short label from the evidence: the most characteristic activating tokens (count in the
    top contexts, weighted by activation, times inverse corpus frequency), then the top logit
    tokens. Returns (label, characteristic tokens)."""
    score: dict[str, float] = {}
    for i, w in zip(center_ids, weights):
        if i < 0:
            continue
        raw = strings.get(i, "")
        # Whitespace tokens are real evidence (a feature may fire on the space before a year):
        # show them visibly instead of dropping them.
        s = raw.strip() or raw.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
        if not s:
            continue
        idf = math.log((1 + n_docs_tokens) / (1 + float(doc_freq[i]))) + 1.0
        score[s] = score.get(s, 0.0) + w * idf
    words = [w for w, _ in sorted(score.items(), key=lambda x: -x[1])[:n_words]]
    outs = []
    for i in logit_ids:
        s = strings.get(i, "").strip()
        if s and s not in outs and s not in words:
            outs.append(s)
        if len(outs) == 2:
            break
    label = (", ".join(repr(w)[1:-1] for w in words) if words else
             "(never active)" if not any(i >= 0 for i in center_ids) else "(unreadable tokens)")
    if outs:
        label += " → " + ", ".join(repr(w)[1:-1] for w in outs)
    return label, words

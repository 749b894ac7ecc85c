"""Sampling with and without a steering plan: our own loop over the KV cache.

Our own loop (not `generate()` of transformers) because each call needs its own random
generator (so concurrent calls are reproducible), a token counter for plans restricted to token
positions, and a per-token callback for streaming.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict
from typing import Callable

import torch

from saeflow.errors import GenerationError
from saeflow.lm.hooks import Hooks
from saeflow.steering.config import (
    DEFAULT_PROMPT,
    MAX_NEW_TOKENS,
    MAX_SAMPLES,
    STEER_SAMPLING,
    SamplingConfig,
)
from saeflow.steering.edits import CallScope, plan_edits
from saeflow.steering.plans import SteeringPlan
from saeflow.steering.typical import typical_activations

__all__ = ["DEFAULT_PROMPT", "MAX_NEW_TOKENS", "MAX_SAMPLES", "STEER_SAMPLING", "SamplingConfig",
           "context_length", "decode", "encode_prompt", "generate", "sample", "steer"]


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def encode_prompt(model, prompt: str, cfg: SamplingConfig) -> torch.Tensor:
    """prompt -> input ids [1, P] (with BOS where the tokenizer adds one); refuses a prompt that
    leaves no room for max_new_tokens in the model's context."""
    if not isinstance(prompt, str):
        raise GenerationError("the prompt must be text")
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise GenerationError("the prompt is empty and the tokenizer adds no BOS token")
    ctx = context_length(model)
    if ids.shape[1] + cfg.max_new_tokens > ctx:
        raise GenerationError(f"the prompt has {ids.shape[1]} tokens; with max_new_tokens "
                              f"{cfg.max_new_tokens} that exceeds the model's context of {ctx}")
    return ids


def _sample(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """logits [n, vocab] (float32, cpu) -> next token [n]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        p_sorted, order = probs.sort(dim=-1, descending=True)
        before = p_sorted.cumsum(-1) - p_sorted  # mass of the tokens ranked above each one
        p_sorted = torch.where(before < cfg.top_p, p_sorted, 0.0)  # keeps the top token always
        probs = torch.zeros_like(probs).scatter_(-1, order, p_sorted)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def sample(model, input_ids: torch.Tensor, cfg: SamplingConfig, edits_for=None,
           on_token: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Sample cfg.n continuations of input_ids [1, P] as one batch -> new tokens [n, <= max].

    `edits_for(scope)` returns the hook edits of this call (see plans.plan_edits); the scope is
    given the ids of every forward, so special tokens (BOS, EOS, ...) are never edited.
    `on_token(step, tokens [n])` is called after each step (streaming). Sequences that reached
    EOS are padded with EOS."""
    eos = model.tokenizer.eos_token_id
    scope = CallScope.for_model(model)
    edits = edits_for(scope) if edits_for is not None else None
    gen = torch.Generator().manual_seed(int(cfg.seed))
    device = model.device
    cur = input_ids.to(device).repeat(cfg.n, 1)  # [n, P]
    done = torch.zeros(cfg.n, dtype=torch.bool)
    out, past = [], None
    hooks = Hooks(model, edits=edits) if edits else nullcontext()
    with torch.inference_mode(), scope, hooks:
        for step in range(cfg.max_new_tokens):
            scope.set_inputs(cur)  # its special tokens stay unedited
            res = model.hf(input_ids=cur, past_key_values=past, use_cache=True, logits_to_keep=1)
            scope.seen += cur.shape[1]
            past = res.past_key_values
            nxt = _sample(res.logits[:, -1].float().cpu(), cfg, gen)  # [n]
            if eos is not None:
                nxt = torch.where(done, torch.tensor(eos), nxt)
                done |= nxt == eos
            out.append(nxt)
            if on_token is not None:
                on_token(step, nxt)
            if bool(done.all()):
                break
            cur = nxt[:, None].to(device)
    return torch.stack(out, 1) if out else torch.zeros(cfg.n, 0, dtype=torch.long)


def decode(model, tokens: torch.Tensor) -> list[str]:
    """[n, T] -> n texts, each cut at its first EOS."""
    eos = model.tokenizer.eos_token_id
    texts = []
    for row in tokens.tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        texts.append(model.tokenizer.decode(row, skip_special_tokens=True))
    return texts


def generate(model, prompt: str, cfg: SamplingConfig, plan: SteeringPlan | None = None,
             pack=None, typical=None, on_token=None, force: bool = False) -> list[str]:
    """n continuations of `prompt`, steered by `plan` when given."""
    cfg.check(force)
    ids = encode_prompt(model, prompt, cfg)
    edits_for = None
    if plan is not None:
        plan.check(pack, force=force)
        if plan.op == "add" and typical is None:
            typical = typical_activations(pack, plan.slots(), model=model)

        def edits_for(scope):
            return plan_edits(plan, pack, scope, typical, device=model.device)
    return decode(model, sample(model, ids, cfg, edits_for, on_token))


def steer(model, pack, plan: SteeringPlan, prompt: str, cfg: SamplingConfig, *,
          run=None, force: bool = False) -> dict:
    """Default and steered completions of `prompt` with the same seed, side by side."""
    cfg.check(force)
    plan.check(pack, force=force)
    encode_prompt(model, prompt, cfg)  # refuse before any generation
    typical = None
    if plan.op == "add":
        typical = typical_activations(pack, plan.slots(), run=run, model=model)
    t0 = time.perf_counter()
    default = generate(model, prompt, cfg, force=force)
    t1 = time.perf_counter()
    steered = generate(model, prompt, cfg, plan, pack, typical, force=force)
    t2 = time.perf_counter()
    return {"prompt": prompt, "sampling": asdict(cfg), "plan": plan.to_dict(),
            "default": default, "steered": steered,
            "seconds": {"default": round(t1 - t0, 2), "steered": round(t2 - t1, 2)}}

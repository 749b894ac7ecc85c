"""Optional feature explanations by an LLM behind any OpenAI-compatible chat endpoint.

The offline label (index.auto_label) is built from the evidence alone. Users who have an LLM
server (OpenAI, vLLM, llama.cpp's server, Ollama, ...) can ask it for a one-line explanation of
each feature from the same evidence: the top contexts with the activating token marked and the
per-token activations, plus the logit lens. Results go to RUN/index/explanations.parquet, one
row per feature, and are shown and searched beside the automatic labels.

HTTP goes through saeflow.llm (urllib, the standard library): one POST to {url}/chat/completions per
feature, retried on 429 / 5xx. The file is rewritten atomically every few features, so a killed
run keeps what it finished and the next run skips those features.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from saeflow.errors import ExplainError, FeatureIndexError
from saeflow.features.explain_config import ExplainerConfig
from saeflow.features.tables import EXPLANATIONS, open_index, open_index_with_lens
from saeflow.ids import parse_feature
from saeflow.llm import post_chat
from saeflow.store import atomic_path

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You explain features of a sparse autoencoder trained on a language model's activations. "
    "You get text excerpts where the feature fires; the token where it fires most is marked "
    "<<like this>>, and the numbers in [brackets] after tokens are the feature's activation "
    "there. You also get the tokens the feature's direction promotes in the output. Reply with "
    "one short phrase (at most 12 words) that says what the feature responds to. No preamble.")


def feature_prompt(row: dict, n_examples: int) -> str:
    """The evidence for one feature (a FeatureIndex.feature row) as plain text."""
    lines = [f"Feature {row['id']}."]
    examples = row.get("examples") or []
    if not examples:
        lines.append("It never fired on the indexed text.")
    for e in examples[:n_examples]:
        peak = max((a for a in e["acts"] if a is not None), default=0.0) or 1.0
        parts = []
        for i, (tok, act) in enumerate(zip(e["tokens"], e["acts"])):
            if tok is None:
                continue
            tok = tok.replace("\n", "\\n")
            if i == e["center"]:
                tok = f"<<{tok}>>"
            if act and act > 0.1 * peak:
                tok += f"[{act:.2g}]"
            parts.append(tok)
        lines.append(f"- ({e['activation']:.3g}) " + "".join(parts))
    promoted = [t["token"] for t in row.get("logit_top") or []]
    if promoted:
        lines.append("Promoted output tokens: " + ", ".join(repr(t) for t in promoted))
    return "\n".join(lines)


def request_explanation(cfg: ExplainerConfig, prompt: str) -> str:
    """One chat completion; the first line of the reply, trimmed."""
    reply = post_chat(cfg, {"model": cfg.model, "temperature": cfg.temperature,
                        "max_tokens": cfg.max_tokens,
                        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                     {"role": "user", "content": prompt}]})
    try:
        text = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ExplainError(f"the explainer's reply is not a chat completion: "
                           f"{json.dumps(reply)[:200]}") from None
    text = (text or "").strip().splitlines()[0].strip().strip('"') if (text or "").strip() else ""
    return text[:200]


def select_features(index, features: list[str] | None = None, layers: list[int] | None = None,
                    positions: list[str] | None = None, limit: int | None = 100) -> list[str]:
    """Feature ids to explain: the ones named, else the active features of the chosen layers and
    positions, densest first, at most `limit`."""

    if features:
        for f in features:
            L, p, i = parse_feature(f)
            index.feature(L, p, i)  # raises a clear error for unknown slots and indices
        return [str(f) for f in features]
    return index.active_ids(layers, positions, limit)


def _write(root: Path, rows: list[dict]) -> None:
    table = pa.table({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "layer": pa.array([r["layer"] for r in rows], pa.int16()),
        "position": pa.array([r["position"] for r in rows], pa.string()),
        "feature": pa.array([r["feature"] for r in rows], pa.int32()),
        "explanation": pa.array([r["explanation"] for r in rows], pa.string()),
        "llm": pa.array([r["llm"] for r in rows], pa.string()),
        "created": pa.array([r["created"] for r in rows], pa.float64()),
    })
    with atomic_path(root / EXPLANATIONS) as tmp:
        pq.write_table(table, tmp)  # pyarrow's default compression (snappy), as always


def explain_features(run: str | os.PathLike, cfg: ExplainerConfig, features: list[str] | None = None,
                     *, layers: list[int] | None = None, positions: list[str] | None = None,
                     limit: int | None = 100, force: bool = False, progress: bool = True
                     ) -> dict[str, str]:
    """Ask the endpoint for an explanation of each selected feature of RUN's index; features
    already explained are skipped unless `force`. Returns {feature id: explanation}."""
    from tqdm.auto import tqdm

    index = open_index(run)
    wanted = select_features(index, features, layers, positions, limit)
    path = index.root / EXPLANATIONS
    rows = {}
    if path.is_file():
        rows = {r["id"]: r for r in pq.read_table(path).to_pylist()}
    todo = [f for f in wanted if force or f not in rows]
    if todo:  # the promoted tokens are evidence: the logit lens needs the index's model
        try:
            index = open_index_with_lens(run)
        except FeatureIndexError as e:
            log.warning("explaining without the logit lens: %s", e)
    done = 0
    try:
        for fid in tqdm(todo, desc="explain", unit="feature", disable=not progress):
            L, p, i = parse_feature(fid)
            row = index.feature(L, p, i)
            text = request_explanation(cfg, feature_prompt(row, cfg.n_examples))
            rows[fid] = {"id": fid, "layer": L, "position": p, "feature": i, "explanation": text,
                         "llm": cfg.model, "created": time.time()}
            done += 1
            if done % cfg.save_every == 0:
                _write(index.root, list(rows.values()))
    finally:
        if done:
            _write(index.root, list(rows.values()))
    return {f: rows[f]["explanation"] for f in wanted if f in rows}

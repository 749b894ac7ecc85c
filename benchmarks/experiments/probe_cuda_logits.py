"""Probe: do CPU and a second device give the same logits for the same model and batch?

Bisects the forward paths saeflow uses (plain, with an attention mask, right padding, after a
bf16 round trip, after an early-stopped capture, eager vs sdpa attention). Prints one line
per path with the max |logit difference| against CPU fp32 and the CE of each.

    python benchmarks/experiments/probe_cuda_logits.py [MODEL] [--device cuda]
MODEL: a model folder, 'embedded', or 'tiny' (a random tiny Gemma 3 made on the spot).
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="tiny")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ctx", type=int, default=128)
    a = ap.parse_args()
    from saeflow.lm.hooks import HookPoint, capture
    from saeflow.lm.model import load_model

    spec = a.model
    if spec == "tiny":
        from fixtures import make_model_dir
        spec = str(make_model_dir("gemma3", Path(tempfile.mkdtemp()) / "g3"))
    ref = load_model(spec, device="cpu", progress=False)
    dev = load_model(spec, device=a.device, progress=False)
    from saeflow.lm.model import tokenizer_adds_bos

    print(f"tokenizer prepends BOS: {tokenizer_adds_bos(ref.tokenizer)}")
    if a.model == "tiny":  # random tokens: the tiny model knows no language anyway
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, min(ref.vocab_size, 5000), (4, a.ctx), generator=g)
        ids[:, 0] = ref.tokenizer.bos_token_id or 2
    else:  # held-out text, packed as saeflow's eval packs it
        from saeflow.lm.corpora import Corpus

        batch = next(Corpus.from_spec("wiki=0.8,python=0.2", seed=0).token_batches(
            ref.tokenizer, 4, a.ctx, split="heldout"))
        ids = batch.input_ids
    mask = torch.ones_like(ids)
    mask[-1, a.ctx // 2:] = 0  # a right-padded last row, as the corpus makes

    def run(m, **kw):
        with torch.inference_mode():
            out = m.hf(input_ids=ids.to(m.device), **{k: v.to(m.device) for k, v in kw.items()})
        return out.logits.float().cpu()

    def ce(lg, valid):
        t = ids[:, 1:][valid[:, 1:].bool()]
        return float(torch.nn.functional.cross_entropy(lg[:, :-1][valid[:, 1:].bool()], t))

    base = {"plain": run(ref), "mask": run(ref, attention_mask=mask)}
    full = torch.ones_like(ids)

    def report(name, lg, key):
        valid = mask if key == "mask" else full
        sel = valid.bool()
        diff = float((lg - base[key])[sel].abs().max())
        print(f"{name:<34} max|dlogit| {diff:9.4g}  CE {ce(lg, valid):.4f} (cpu {ce(base[key], valid):.4f})",
              flush=True)

    print(f"torch {torch.__version__}, device {a.device}, tf32 matmul "
          f"{torch.backends.cuda.matmul.allow_tf32 if a.device.startswith('cuda') else '-'}, "
          f"attn {dev.hf.config._attn_implementation}")
    report("plain", run(dev), "plain")
    report("attention_mask (right pad)", run(dev, attention_mask=mask), "mask")
    capture(dev, ids, [HookPoint("resid_post", 0)], attention_mask=mask)
    report("after capture(stop_early)", run(dev, attention_mask=mask), "mask")
    dev.hf.to(torch.bfloat16)
    report("bf16", run(dev, attention_mask=mask), "mask")
    dev.hf.to(torch.float32)
    report("fp32 after bf16 round trip", run(dev, attention_mask=mask), "mask")
    dev.hf.config._attn_implementation = "eager"
    for mod in dev.hf.modules():
        if hasattr(mod, "config") and hasattr(mod.config, "_attn_implementation"):
            mod.config._attn_implementation = "eager"
    report("eager attention", run(dev, attention_mask=mask), "mask")


if __name__ == "__main__":
    main()

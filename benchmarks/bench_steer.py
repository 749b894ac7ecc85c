"""Generation throughput with a 20-feature steering plan vs plain generation, in one run.

    .venv/bin/python benchmarks/bench_steer.py [--n 4 --max-new-tokens 32 --repeats 3]

The plan is cumulative-shaped: 20 residual features spread over every layer of the embedded
pack (one or two per layer), in add mode (one precomputed vector added per hooked layer) and in
rescale mode (each hooked layer also encodes its SAE to read the current activations). Runs
alternate plain / add / rescale, `repeats` times, and report medians, so background load
affects all three alike. Target: add-mode throughput >= 0.9 of plain.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    from saeflow.lm.model import load_model
    from saeflow.saes.recipes import open_pack
    from saeflow.steering.generate import SamplingConfig, generate
    from saeflow.steering.plans import Intervention, SteeringPlan, typical_activations

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--features", type=int, default=20)
    args = ap.parse_args()
    model = load_model("embedded")
    pack = open_pack("embedded", model=model)
    layers = pack.layers("resid_post")
    g = torch.Generator().manual_seed(0)
    ivs = [Intervention(layers[i % len(layers)], "resid_post",
                        int(torch.randint(pack.info("resid_post", 0).d_sae, (1,), generator=g)),
                        2.0) for i in range(args.features)]
    plans = {"add": SteeringPlan("add", ivs),
             "rescale": SteeringPlan("rescale", [Intervention(i.layer, i.position, i.feature, 0.0)
                                                 for i in ivs])}
    typical = typical_activations(pack, plans["add"].slots(), model=model)
    # eos never stops a run early: greedy on a fixed prompt, same length for every run
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, n=args.n, temperature=1.0, seed=0)
    generate(model, "I think", SamplingConfig(4, 1))  # warm-up
    times = {"plain": [], "add": [], "rescale": []}
    for _ in range(args.repeats):
        for name in times:
            t = time.perf_counter()
            generate(model, "I think", cfg, plans.get(name), pack if name != "plain" else None,
                     typical)
            times[name].append(time.perf_counter() - t)
    tokens = args.n * args.max_new_tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "torch_threads": torch.get_num_threads(), "features": args.features,
        "hooked_layers": len(plans["add"].slots()), "batch": args.n,
        "new_tokens_per_sample": args.max_new_tokens,
        "plain_tokens_per_s": round(tokens / med["plain"], 1),
        "add_tokens_per_s": round(tokens / med["add"], 1),
        "rescale_tokens_per_s": round(tokens / med["rescale"], 1),
        "add_vs_plain": round(med["plain"] / med["add"], 3),
        "rescale_vs_plain": round(med["plain"] / med["rescale"], 3),
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()}}, indent=2))


if __name__ == "__main__":
    main()

"""Write a random saeflow pack of a given shape (e.g. Gemma Scope's), for flow benchmarks.

    .venv/bin/python benchmarks/make_random_pack.py OUT [--layers 26 --d 2304 --width 16384
        --positions resid_post,mlp_out,attn_out --dtype bfloat16]

Gemma Scope 2B's shape at width 16k in bf16 is 78 SAEs, about 11.8 GB.
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--d", type=int, default=2304)
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--positions", default="resid_post,mlp_out,attn_out")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    from saeflow.saes.packs import save_pack
    from saeflow.saes.sae import random_sae

    dtype = getattr(torch, args.dtype)
    positions = args.positions.split(",")
    saes = ((p, L, random_sae(args.d, args.width, "jumprelu", seed=1000 * L + i, dtype=dtype))
            for L in range(args.layers) for i, p in enumerate(positions))
    pack = save_pack(saes, args.out, model_name=f"random-{args.layers}x{args.d}x{args.width}",
                     d_model=args.d, n_layers=args.layers, progress=True, overwrite=True)
    print(f"wrote {len(pack)} SAEs to {pack.root}")


if __name__ == "__main__":
    main()

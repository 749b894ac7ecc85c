"""Peak memory of the first chunk's init (input scales, geometric medians) and of one resampling
pass: the whole shuffled chunk gathered and cast to float32 at once (before, the baseline)
against blocks of SAEs read from the chunk buffer (now), in the same run.

Each side runs in its own process on the same [S, N, d] bf16 chunk buffer; the figure is the
peak resident memory (VmHWM, reset after the buffer is filled) above the filled buffer. On a
CPU the block budget is scaled to the chunk (--blocks: how many blocks the chunk makes; the gpu
profile's 18 GB float32 chunk makes 17 blocks of 1 GiB).

    .venv/bin/python benchmarks/bench_init_memory.py --saes 54 --tokens 8192 --d 640
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

GPU_PROFILE = dict(saes=54, tokens=131_072, d=640)


def _peak_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def child(side: str, saes: int, tokens: int, d: int, blocks: int) -> dict:
    import torch

    from saeflow.ids import Slot
    from saeflow.saes.train import StackedTrainer, TrainConfig, chunks, stacked

    torch.set_num_threads(1)
    cfg = TrainConfig(width=64, k=4, tokens=tokens * 4, batch_size=1024, input_norm="dim",
                      dim_cap=10.0, resample_dead=True, dead_tokens=1024)
    g = torch.Generator().manual_seed(0)
    slots = [Slot("resid_post", i) for i in range(saes)]
    buf = chunks.ChunkBuffer(slots, tokens)
    buf.x = (torch.randn(saes, tokens, d, generator=g) * 2 + 1).to(torch.bfloat16)
    perm = torch.randperm(tokens, generator=g)
    stacked.INIT_BLOCK_BYTES = max(1, saes * tokens * d * 4 // blocks)
    t = StackedTrainer(d, cfg, 100, "cpu", list(range(saes)), torch.float32)
    t.since_fired.fill_(2048)  # every latent dead: resampling reads every SAE's rows
    base = _rss_kb()
    _reset_peak()
    if side == "before":
        t.init_from(buf.rows(perm).float())
        init_kb = _peak_kb() - base
        _reset_peak()
        t.resample(buf.rows(perm))
    else:
        t.init_from(buf.shuffled(perm))
        init_kb = _peak_kb() - base
        _reset_peak()
        t.resample(buf.shuffled(perm))
    resample_kb = _peak_kb() - base
    return {"init_mb": init_kb / 1024, "resample_mb": resample_kb / 1024,
            "median": t.b_dec.detach().sum().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saes", type=int, default=54)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d", type=int, default=640)
    ap.add_argument("--blocks", type=int, default=17)
    ap.add_argument("--child", choices=["before", "after"])
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.saes, a.tokens, a.d, a.blocks)))
        return
    chunk_mb = a.saes * a.tokens * a.d * 2 / 2**20
    print(f"chunk buffer [{a.saes}, {a.tokens}, {a.d}] bf16: {chunk_mb:.0f} MB; "
          f"init blocks: {a.blocks}")
    res = {}
    for side in ("before", "after"):
        out = subprocess.run([sys.executable, __file__, "--child", side, "--saes", str(a.saes),
                              "--tokens", str(a.tokens), "--d", str(a.d),
                              "--blocks", str(a.blocks)],
                             check=True, capture_output=True, text=True).stdout
        res[side] = json.loads(out.strip().splitlines()[-1])
        r = res[side]
        print(f"{side:>6}: init peak +{r['init_mb']:.0f} MB ({r['init_mb'] / chunk_mb:.2f}x the "
              f"chunk), resampling peak +{r['resample_mb']:.0f} MB "
              f"({r['resample_mb'] / chunk_mb:.2f}x)")
    b, n = res["before"], res["after"]
    print(f"ratio before/after: init {b['init_mb'] / max(n['init_mb'], 1):.1f}x, resampling "
          f"{b['resample_mb'] / max(n['resample_mb'], 1):.1f}x; same medians: "
          f"{b['median'] == n['median']}")
    gb = GPU_PROFILE["saes"] * GPU_PROFILE["tokens"] * GPU_PROFILE["d"] * 2 / 1e9
    print(f"gpu profile chunk buffer (bf16, without the extra model batch): {gb:.1f} GB; "
          f"init before ~{b['init_mb'] / chunk_mb * gb:.0f} GB beside it, now "
          f"~{n['init_mb'] / chunk_mb * gb:.1f} GB at this block ratio")


if __name__ == "__main__":
    main()

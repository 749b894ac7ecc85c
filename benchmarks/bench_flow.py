"""Feature-flow matching at scale, against the machine's GEMM ceiling and a naive reference.

    .venv/bin/python benchmarks/bench_flow.py gemmascope [--layers 26 --d 2304 --width 16384]
    .venv/bin/python benchmarks/bench_flow.py widepack [--layers 26 --d 2304 --width 131072]
    .venv/bin/python benchmarks/bench_flow.py embedded
    .venv/bin/python benchmarks/bench_flow.py wide --width 131072 [--rows 2048]

gemmascope: the full flow matching (R_L vs R_{L-1}, M_L, A_L, both directions, plus the null
    samples) of a random pack of Gemma Scope's shape, through `compute_layer`. The unit rows are
    generated slot by slot where the matching runs (`--dicts host`: on the host, so the transfers
    are timed; generation excluded either way). Prints wall time, achieved GFLOP/s, the GEMM
    ceiling of the tile shape the matching used (a plain matmul of that shape and dtype on the
    same device, timed in the same run) and the ratio to it, the bf16 check (how often bf16
    ranking + fp32 re-scoring gives the exact top-k sets, on one pair), the naive reference
    (full similarity matrix in numpy, then argsort; one pair, times the pairs) and peak RSS.
    `--baseline-src DIR` also times an older checkout's library (DIR/src) on the same pack in a
    child process (pack on the host there: that is how it read its dictionaries) and prints
    current / baseline.
widepack: the same at width 131072 (26 layers x 3 positions, d 2304), the pack generated in bf16
    on the matching device, timed end to end (generation included); the bf16 check on the
    first 8192 rows of one pair. --layers/--width/--d shrink it for a dry run on a CPU.
embedded: `run_flow` on the embedded pack with an empty cache (so everything is computed).
wide: one slice of a very wide pair read from safetensors files on disk (streamed): `--rows`
    rows of A against all of B, in a child process so its peak RSS is its own; the full pair
    time is extrapolated from the slice and said to be.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def gemm_ceiling(block_a: int, block_b: int, d: int, dtype=torch.float32, reps: int = 6,
                 device="cpu") -> float:
    """GFLOP/s of a plain matmul of one tile's shape on `device` (the achievable ceiling)."""
    a = torch.randn(block_a, d, device=device).to(dtype)
    b = torch.randn(block_b, d, device=device).to(dtype)
    reps = reps * 4 if torch.device(device).type == "cuda" else reps
    a @ b.T
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b.T
    _sync(device)
    return 2 * block_a * block_b * d * reps / (time.perf_counter() - t) / 1e9


def naive_pair(A: torch.Tensor, B: torch.Tensor, k: int) -> float:
    """Full similarity matrix in numpy, then argsort per row and per column (the baseline)."""
    t = time.perf_counter()
    a = A.numpy() / np.linalg.norm(A.numpy(), axis=1, keepdims=True)
    b = B.numpy() / np.linalg.norm(B.numpy(), axis=1, keepdims=True)
    S = a @ b.T
    np.argsort(-S, axis=1)[:, :k]
    np.argsort(-S, axis=0)[:k]
    return time.perf_counter() - t


def _pack(args, device, dtype):
    """(the layer plans, directions(slot)): unit rows [width, d] of a random pack, generated
    on `device` in `dtype`, the same for a slot in any process (seeded by its name)."""
    from saeflow.flow.inputs import LayerSlots
    from saeflow.flow.match import TensorDirections
    from saeflow.ids import Slot

    def directions(slot):
        g = torch.Generator(device=device).manual_seed(zlib.crc32(str(Slot(*slot)).encode()))
        W = torch.randn(args.width, args.d, generator=g, device=device)
        W = (W / W.norm(dim=1, keepdim=True)).to(dtype)
        return TensorDirections(W, normalized=True, label=str(Slot(*slot)))

    plans = [LayerSlots(L, Slot("resid_post", L),
                        {"res": Slot("resid_post", L - 1) if L else None,
                         "mlp": Slot("mlp_out", L), "attn": Slot("attn_out", L)})
             for L in range(args.layers)]
    return plans, directions


def _match_pack(args, cfg, plans, directions) -> tuple[float, float]:
    """(matching seconds, generation seconds) of the whole pack, layer by layer."""
    from saeflow.flow.compute import compute_layer

    dev = cfg.resolved_device()
    gen_s, held = 0.0, {}
    t0 = time.perf_counter()
    for p in plans:
        tg = time.perf_counter()
        held = {s: held.get(s) or directions(s) for s in [p.resid, *p.preds.values()] if s}
        _sync(dev)
        gen_s += time.perf_counter() - tg
        compute_layer(None, p, cfg, directions=lambda s, drop=None: held[s])
        print(f"  layer {p.layer}: {time.perf_counter() - t0:.1f}s", flush=True)
    _sync(dev)
    return time.perf_counter() - t0 - gen_s, gen_s


def _bf16_check(A, B, args, kw) -> dict:
    """How often bf16 ranking + fp32 re-scoring gives the exact top-k sets, on one pair."""
    from saeflow.flow.match import top_k_pairs

    ex = top_k_pairs(A, B, k=args.k, cols=True, **kw)
    fa = top_k_pairs(A, B, k=args.k, cols=True, precision="bf16", **kw)
    same = lambda x, y: float((x.sort(1).values == y.sort(1).values).all(1).float().mean())
    return {"bf16_rows_with_exact_topk_set": round(same(ex.row_indices, fa.row_indices), 5),
            "bf16_cols_with_exact_topk_set": round(same(ex.col_indices, fa.col_indices), 5),
            "bf16_top1_identical": round(float((ex.row_indices[:, 0] ==
                                                fa.row_indices[:, 0]).float().mean()), 5)}


def bench_gemmascope(args) -> dict:
    from saeflow.flow.config import FlowConfig

    wide = args.mode == "widepack"
    cfg = FlowConfig(k=args.k, precision=args.precision, block_a=args.block_a,
                     block_b=args.block_b, null_samples=args.null_samples, device=args.device)
    dev = cfg.resolved_device()
    tile = tuple(min(b, args.width) for b in cfg.blocks())  # the tile shape the matching runs
    where = torch.device("cpu") if args.dicts == "host" else dev
    gen_dtype = torch.bfloat16 if wide else torch.float32
    print(f"matching on {dev}" + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda"
                                  else "") + f", tiles {tile[0]} x {tile[1]}, pack on {where}",
          flush=True)
    plans, directions = _pack(args, where, gen_dtype)
    n_pairs = sum(1 for p in plans for s in p.preds.values() if s)
    flops = n_pairs * (2 * args.width * args.width * args.d
                       + 2 * args.null_samples * args.width * args.d)
    t0 = time.perf_counter()
    wall, gen_s = _match_pack(args, cfg, plans, directions)
    end_to_end = time.perf_counter() - t0
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    ceiling = gemm_ceiling(*tile, args.d, dtype, device=dev)
    res = {"case": f"{'wide' if wide else 'gemmascope'}-shaped random pack", "layers": args.layers,
           "d": args.d, "width": args.width, "pairs": n_pairs, "k": args.k,
           "precision": args.precision, "device": str(dev), "pack_on": f"{where} ({gen_dtype})",
           "tile": list(tile), "wall_s": round(wall, 2),
           ("generation_s_included" if wide else "generation_s_excluded"): round(gen_s, 2),
           "gflops_achieved": round(flops / wall / 1e9, 1),
           "gflops_ceiling": round(ceiling, 1),
           "ratio_to_ceiling": round(flops / wall / 1e9 / ceiling, 4),
           "gflops_effective_two_directions": round(2 * flops / wall / 1e9, 1),
           "peak_rss_mb": round(peak_rss_mb())}
    if wide:
        res["end_to_end_s"] = round(end_to_end, 2)
    if args.precision == "bf16" and not args.no_check:
        from saeflow.flow.match import TensorDirections

        A, B = directions(("resid_post", 1)), directions(("resid_post", 0))
        if wide:  # the first 8192 rows of A: the exact fp32 pass over a whole pair is long
            A = TensorDirections(A.W[:8192], normalized=True)
        res.update(_bf16_check(A, B, args, cfg.match_kw()))
    if args.baseline_src:
        res.update(_baseline(args, res))
    if not args.skip_naive and not wide:
        res.update(_naive(args, n_pairs, wall))
    return res


def _baseline(args, res: dict) -> dict:
    """The same pack matched by an older checkout's library (DIR/src), in a child process."""
    src = Path(args.baseline_src).resolve() / "src"
    cmd = [sys.executable, __file__, args.mode, "--layers", str(args.layers), "--d", str(args.d),
           "--width", str(args.width), "--k", str(args.k), "--precision", args.precision,
           "--device", args.device, "--null-samples", str(args.null_samples), "--skip-naive",
           "--no-check", "--dicts", "host"]
    for flag, value in (("--block-a", args.block_a), ("--block-b", args.block_b)):
        if value:
            cmd += [flag, str(value)]
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        return {"baseline_error": out.stderr.strip().splitlines()[-1:]}
    base = json.loads(out.stdout[out.stdout.index("{"):])
    return {"baseline": {"src": str(src), "pack_on": base["pack_on"], "tile": base["tile"],
                         "wall_s": base["wall_s"], "gflops_achieved": base["gflops_achieved"],
                         "ratio_to_ceiling": base["ratio_to_ceiling"]},
            "speedup_vs_baseline": round(base["wall_s"] / res["wall_s"], 2)}


def _naive(args, n_pairs: int, wall: float) -> dict:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(args.width, args.d, generator=g)
    B = torch.randn(args.width, args.d, generator=g)
    naive = naive_pair(A, B, args.k)
    return {"naive_one_pair_s": round(naive, 1),
            "naive_all_pairs_s_extrapolated": round(naive * n_pairs, 1),
            "speedup_vs_naive": round(naive * n_pairs / wall, 2),
            "naive_similarity_matrix_mb": round(args.width * args.width * 4 / 2**20),
            "peak_rss_mb_after_naive": round(peak_rss_mb())}


def bench_embedded(args) -> dict:
    from saeflow.flow.compute import run_flow
    from saeflow.flow.config import FlowConfig
    from saeflow.saes.recipes import open_pack

    pack = open_pack("embedded")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SAEFLOW_CACHE"] = tmp  # empty cache: nothing reused
        t = time.perf_counter()
        run = run_flow(pack, Path(tmp) / "run", FlowConfig(k=args.k, precision=args.precision),
                       progress=False, plots=False)
        first = time.perf_counter() - t
        t = time.perf_counter()
        run_flow(pack, Path(tmp) / "run2", FlowConfig(k=args.k, precision=args.precision),
                 progress=False, plots=False)
        again = time.perf_counter() - t
        n = sum(sum(c.values()) for c in run.class_counts().values())
    return {"case": "embedded pack (18 layers x 3 positions, width 4096, d 640)",
            "precision": args.precision, "first_run_s": round(first, 1),
            "second_run_s_cached": round(again, 2), "residual_features": n,
            "peak_rss_mb": round(peak_rss_mb())}


def _write_wide(path: Path, n: int, d: int, seed: int, chunk: int = 65536) -> None:
    """A bf16 safetensors file holding W_dec [n, d], written in chunks (1M x 2304 never sits in
    memory). The header follows the safetensors layout: u64 length, JSON, 8-byte aligned data."""
    if path.is_file():
        return
    header = {"W_dec": {"dtype": "BF16", "shape": [n, d], "data_offsets": [0, n * d * 2]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for i in range(0, n, chunk):
            block = torch.randn(min(chunk, n - i), d, generator=g).to(torch.bfloat16)
            f.write(block.view(torch.int16).numpy().tobytes())
    os.replace(tmp, path)


def bench_wide(args) -> dict:
    if args.child:
        from saeflow.flow.match import SafetensorsRows, top_k_pairs

        A = SafetensorsRows(args.child[0], "W_dec")
        B = SafetensorsRows(args.child[1], "W_dec")
        rows = min(args.rows, A.n)
        A.n = rows  # the first `rows` rows of A
        t = time.perf_counter()
        m = top_k_pairs(A, B, k=args.k, cols=True, block_a=args.block_a or 1024, block_b=args.block_b or 4096,
                        precision=args.precision, memory_budget=args.memory_mb << 20)
        dt = time.perf_counter() - t
        print(json.dumps({"slice_s": dt, "rows": rows, "n_b": B.n, "peak_rss_mb": peak_rss_mb(),
                          "top1_mean": float(m.row_values[:, 0].mean())}))
        return {}
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    fa, fb = folder / f"a_{args.rows}.safetensors", folder / f"b_{args.width}.safetensors"
    t = time.perf_counter()
    _write_wide(fa, min(args.width, args.rows), args.d, 1)
    _write_wide(fb, args.width, args.d, 2)
    write_s = time.perf_counter() - t
    cmd = [sys.executable, __file__, "wide", "--child", str(fa), str(fb), "--rows", str(args.rows),
           "--k", str(args.k), "--block-a", str(args.block_a or 1024), "--block-b", str(args.block_b or 4096),
           "--precision", args.precision, "--memory-mb", str(args.memory_mb)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
    child = json.loads(out[-1])
    full_pair_s = child["slice_s"] * args.width / child["rows"]
    return {"case": f"one pair, width {args.width}, d {args.d}, streamed from bf16 safetensors",
            "precision": args.precision, "rows_measured": child["rows"],
            "slice_s": round(child["slice_s"], 1),
            "full_pair_s_extrapolated": round(full_pair_s, 1),
            "gemmascope_26_layers_3_positions_extrapolated_h": round(full_pair_s * 77 / 3600, 1),
            "peak_rss_mb": round(child["peak_rss_mb"]), "files_written_s": round(write_s, 1),
            "b_file_gb": round(fb.stat().st_size / 1e9, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["gemmascope", "widepack", "embedded", "wide"])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--d", type=int, default=2304)
    ap.add_argument("--width", type=int, default=None,
                    help="default: 16384; widepack: 131072")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                    help="default: fp32; widepack: bf16")
    ap.add_argument("--block-a", type=int, default=None, help="default: 1024 CPU, 8192 GPU")
    ap.add_argument("--block-b", type=int, default=None, help="default: 4096 CPU, 16384 GPU")
    ap.add_argument("--dicts", default="device", choices=["device", "host"],
                    help="gemmascope: where the pack is generated (host: transfers are timed)")
    ap.add_argument("--baseline-src", default=None,
                    help="gemmascope/widepack: also time an older checkout (DIR/src) on the pack")
    ap.add_argument("--no-check", action="store_true", help="skip the bf16 exactness check")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    ap.add_argument("--null-samples", type=int, default=2048)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--rows", type=int, default=2048, help="wide: rows of A measured")
    ap.add_argument("--memory-mb", type=int, default=512)
    ap.add_argument("--dir", default="/tmp/saeflow-bench-wide")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.width = args.width or (131072 if args.mode == "widepack" else 16384)
    args.precision = args.precision or ("bf16" if args.mode == "widepack" else "fp32")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    res = {"gemmascope": bench_gemmascope, "widepack": bench_gemmascope,
           "embedded": bench_embedded, "wide": bench_wide}[args.mode](args)
    if res:
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

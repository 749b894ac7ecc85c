"""`saeflow ...`: a thin command line over the Python API."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --- info ---------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from .models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    a = model.anatomy()
    a["load_seconds"] = round(model.load_seconds, 2)
    if args.json:
        _print_json(a)
        return 0
    print(f"model       {a['model']}  ({a['source']})")
    print(f"family      {a['family']}  [{a['hf_class']}, model_type {a['model_type']}]")
    print(f"layers      {a['n_layers']}    d_model {a['d_model']}    vocab {a['vocab_size']}    "
          f"heads {a['n_heads']} x {a['d_head']}")
    print(f"dtype       {a['dtype']} on {a['device']}    loaded in {a['load_seconds']:.1f}s")
    print("hook points (HF module.site  |  TransformerLens name  |  width)")
    for layer in a["layers"]:
        print(f"  layer {layer['layer']}")
        for pos, hp in layer["hook_points"].items():
            print(f"    {pos:<11} {hp['hf_name']:<52} {hp['tl_name']:<28} {hp['width']}")
    return 0


# --- pack ---------------------------------------------------------------------------------
def _open_pack(args, model=None):
    from .recipes import open_pack

    return open_pack(args.path, model=model, position=getattr(args, "position", None),
                     width=getattr(args, "width", None), l0=getattr(args, "l0", None))


def cmd_train(args) -> int:
    from .models import load_model
    from .train import TrainConfig, parse_tokens, train_family
    from .hookpoints import parse_layers

    model = load_model(args.model, device=args.device)
    cfg = TrainConfig(positions=[p.strip() for p in args.positions.split(",") if p.strip()],
                      layers=parse_layers(args.layers, model.n_layers), width=args.width, k=args.k,
                      architecture=args.architecture, tokens=parse_tokens(args.tokens),
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, ctx_len=args.ctx_len,
                      corpus=args.corpus, chunk_tokens=args.chunk_tokens,
                      model_dtype=args.model_dtype, encoder_dtype=args.encoder_dtype,
                      checkpoint_every_s=args.checkpoint_every)
    res = train_family(model, cfg, args.out, overwrite=args.overwrite)
    print(f"wrote {len(res.pack)} SAEs to {res.pack.root} ({res.tokens} tokens, "
          f"{res.wall_seconds / 60:.1f} min)")
    return 0


def cmd_pack_eval(args) -> int:
    from .evaluate import evaluate_pack, format_table
    from .models import load_model
    from .train import parse_tokens

    model_spec = args.model or ("embedded" if args.path.startswith("embedded") else None)
    if model_spec is None:
        raise ValueError("pack eval needs --model (the model the pack was made for)")
    model = load_model(model_spec, device=args.device)
    pack = _open_pack(args, model=model)
    res = evaluate_pack(pack, model, tokens=parse_tokens(args.tokens),
                        ce_tokens=parse_tokens(args.ce_tokens), corpus=args.corpus)
    if args.json:
        _print_json(res)
    else:
        print(format_table(res))
    return 0


def cmd_pack_inspect(args) -> int:
    pack = _open_pack(args)
    n_layers = args.n_layers
    if args.model:
        from .models import load_model

        model = load_model(args.model, device="cpu")
        n_layers = model.n_layers
        pack.check_model(model)
    d = pack.describe(n_layers)
    if args.verify:
        d["verify_problems"] = pack.verify()
    if args.json:
        _print_json(d)
        return 0
    print(f"pack        {d['root']}")
    print(f"format      {d['source_format']}    model {d['model'] or '?'}    "
          f"d_model {d['d_model'] or '?'}    layers {d['n_layers'] or '?'}")
    print(f"SAEs        {d['n_saes']} at positions {', '.join(d['positions'])}")
    print(f"  {'position':<11}{'layer':>5}  {'d_in':>6}  {'d_sae':>7}  {'arch':<9} {'dtype':<9} "
          f"{'format':<12} path")
    for r in d["saes"]:
        print(f"  {r['position']:<11}{r['layer']:>5}  {r['d_in']:>6}  {r['d_sae']:>7}  "
              f"{r['architecture']:<9} {r['dtype']:<9} {r['format']:<12} {r['path']}")
    for c in d["choices"]:
        print(f"  note: {c}")
    if d["missing"]:
        by_pos: dict[str, list[int]] = {}
        for m in d["missing"]:
            by_pos.setdefault(m["position"], []).append(m["layer"])
        print(f"incomplete: {len(d['missing'])} slot(s) missing")
        for p, ls in by_pos.items():
            print(f"  {p}: layers {_ranges(ls)}")
    else:
        print("complete: every layer has an SAE at every position present")
    if args.verify:
        probs = d["verify_problems"]
        print("verify: OK" if not probs else "verify: " + "; ".join(probs))
        return 1 if probs else 0
    return 0


def _ranges(xs: list[int]) -> str:
    xs, out, i = sorted(xs), [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def cmd_pack_convert(args) -> int:
    from .packs import convert_pack

    pack = _open_pack(args)
    out = convert_pack(pack, args.out, model_name=args.model_name, n_layers=args.n_layers,
                       overwrite=args.force, progress=True)
    print(f"wrote saeflow pack with {len(out)} SAEs to {out.root}")
    return 0


def cmd_pack_fetch(args) -> int:
    from .hub import fetch

    pack = fetch(args.release, out=args.out, layers=args.layers, width=args.width, l0=args.l0,
                 positions=args.positions, mirror=args.mirror, overwrite=args.force,
                 ids=args.ids.split(",") if args.ids else None)
    print(f"fetched {len(pack)} SAEs into saeflow pack {pack.root}")
    return 0


# --- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="saeflow", description=__doc__)
    p.add_argument("--version", action="version", version=f"saeflow {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    info = sub.add_parser("info", help="load a model and print its anatomy and hook points")
    info.add_argument("--model", default="embedded",
                      help="'embedded', an HF folder, a hub id, or a .gguf file")
    info.add_argument("--device", default=None, help="cuda, mps or cpu (default: automatic)")
    info.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    tr = sub.add_parser("train", help="train an SAE family from one pass over a corpus")
    tr.add_argument("--model", default="embedded")
    tr.add_argument("--positions", default="resid_post,mlp_out,attn_out")
    tr.add_argument("--layers", default="all", help="all, 0-5, or 1,3,7")
    tr.add_argument("--width", type=int, default=4096)
    tr.add_argument("--k", type=int, default=32)
    tr.add_argument("--architecture", default="topk", choices=["topk", "batchtopk"])
    tr.add_argument("--tokens", default="300k")
    tr.add_argument("--batch-size", type=int, default=1024, help="tokens per SAE step")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--ctx-len", type=int, default=128)
    tr.add_argument("--corpus", default="wiki=0.8,python=0.2",
                    help="sources with text shares: wiki, python, PATH, hf:NAME")
    tr.add_argument("--chunk-tokens", type=int, default=8192,
                    help="tokens shuffled together; checkpoints fall between chunks")
    tr.add_argument("--model-dtype", default="auto", help="capture dtype: auto, float32, bfloat16")
    tr.add_argument("--encoder-dtype", default="auto", help="encoder matmul: auto, float32, bfloat16")
    tr.add_argument("--checkpoint-every", type=float, default=180.0, help="seconds")
    tr.add_argument("--device", default=None)
    tr.add_argument("--out", required=True)
    tr.add_argument("--overwrite", action="store_true", help="replace a different pack at --out")
    tr.set_defaults(func=cmd_train)

    pack = sub.add_parser("pack", help="inspect, convert, evaluate and fetch SAE families")
    psub = pack.add_subparsers(dest="pack_cmd", required=True)

    def selectors(sp):
        sp.add_argument("--position", default=None,
                        help="position for SAEs whose files do not say it (Gemma Scope npz)")
        sp.add_argument("--width", default=None, help="variant to take, e.g. 16k")
        sp.add_argument("--l0", default=None, help="variant to take, e.g. 82 or medium")

    ins = psub.add_parser("inspect", help="list the SAEs of a family and the missing slots")
    ins.add_argument("path")
    selectors(ins)
    ins.add_argument("--model", default=None, help="check against this model (d_in, layers)")
    ins.add_argument("--n-layers", type=int, default=None, help="layers the family should cover")
    ins.add_argument("--verify", action="store_true", help="re-hash files against pack.json")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_pack_inspect)

    conv = psub.add_parser("convert", help="write any supported family as a saeflow pack")
    conv.add_argument("path")
    conv.add_argument("out")
    selectors(conv)
    conv.add_argument("--model-name", default=None)
    conv.add_argument("--n-layers", type=int, default=None)
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    conv.set_defaults(func=cmd_pack_convert)

    ev = psub.add_parser("eval", help="FVU, L0, dead/dense fractions, ΔCE and KL per SAE")
    ev.add_argument("path", help="a pack path, or 'embedded' / 'embedded-quick'")
    selectors(ev)
    ev.add_argument("--model", default=None, help="default: embedded for the embedded packs")
    ev.add_argument("--tokens", default="8k", help="held-out tokens for FVU/L0/dead/dense")
    ev.add_argument("--ce-tokens", default="1k", help="held-out tokens for ΔCE/KL (costly)")
    ev.add_argument("--corpus", default="wiki=0.8,python=0.2")
    ev.add_argument("--device", default=None)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_pack_eval)

    fet = psub.add_parser("fetch", help="download a published family (needs the hub)")
    fet.add_argument("release", help="e.g. gemma-scope-2b-pt-res-canonical, "
                     "gemma-scope-2-270m-pt-res, a SAELens release, or a hub repo owner/name")
    fet.add_argument("--layers", default="all", help="e.g. 0-25 or 3,6,9")
    fet.add_argument("--width", default=None, help="e.g. 16k")
    fet.add_argument("--l0", default=None, help="e.g. 82, medium; default: canonical choice")
    fet.add_argument("--positions", default=None,
                     help="Gemma Scope 2: comma list of resid_post,mlp_out,attn_z")
    fet.add_argument("--ids", default=None,
                     help="SAELens release: comma list of SAE ids, e.g. blocks.8.hook_resid_pre")
    fet.add_argument("--out", default=None, help="pack dir (default: cache/packs/RELEASE)")
    fet.add_argument("--mirror", default=None,
                     help="read from a local directory laid out like the hub (also "
                          "$SAEFLOW_HUB_MIRROR)")
    fet.add_argument("--force", action="store_true")
    fet.set_defaults(func=cmd_pack_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError, ImportError,
            RuntimeError) as e:  # RuntimeError: TrainingError, HubError
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"saeflow: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`saeflow train` and `saeflow pack inspect|convert|eval|fetch`: SAE families."""
from __future__ import annotations

from saeflow.cli.common import (
    add_corpus_pass,
    add_device,
    add_json,
    add_scale,
    add_selectors,
    model_and_pack,
    open_pack_from_args,
    print_json,
    scale_from_args,
)
from saeflow.cli.options import (
    add_config_options,
    command,
    config_from_args,
    signature_default,
)

TRAIN_PASS = ["tokens", "corpus", "seed", "ctx_len", "encoder_dtype", "model_dtype"]
EVAL_OPTIONS = ["tokens", "dead_tokens", "ce_tokens", "ce_positions", "corpus"]  # of EvalConfig


def cmd_train(args) -> int:
    from saeflow.lm.model import load_model
    from saeflow.saes.train import TrainConfig, train_family

    scale = scale_from_args(args)
    model = load_model(args.model, device=args.device)
    cfg = config_from_args(TrainConfig, args)
    for layer in cfg.layers or []:
        model.check_layer(layer)
    if scale.distributed:
        from saeflow.scale.train import train_family_on_ray

        res = train_family_on_ray(model, cfg, args.out, scale, overwrite=args.overwrite)
    else:
        res = train_family(model, cfg, args.out, overwrite=args.overwrite)
    print(f"wrote {len(res.pack)} SAEs to {res.pack.root} ({res.tokens} tokens, "
          f"{res.wall_seconds / 60:.1f} min)")
    return 0


def cmd_pack_eval(args) -> int:
    from saeflow.pipeline.config import EvalConfig
    from saeflow.saes.evaluate import evaluate_pack, format_table

    cfg = config_from_args(EvalConfig, args)
    model, pack = model_and_pack(args, "pack eval")
    res = evaluate_pack(pack, model, **{name: getattr(cfg, name) for name in EVAL_OPTIONS})
    if args.json:
        print_json(res)
    else:
        print(format_table(res))
    return 0


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    xs, out, i = sorted(xs), [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def cmd_pack_inspect(args) -> int:
    from saeflow.cli.common import optional_model

    model = optional_model(args.model)
    pack = open_pack_from_args(args, model=model, strict=False)  # list what `load` refuses too
    n_layers = args.n_layers
    if model is not None:
        n_layers = model.n_layers
        pack.check_model(model)
    # The checks `load` and `convert` make, on every SAE (it reads the weights, one SAE at a
    # time); those that fail are listed as REFUSED below.
    problems = pack.verify()
    d = pack.describe(n_layers)
    if args.verify:
        d["verify_problems"] = problems
    if args.json:
        print_json(d)
        return 1 if d["refused"] else 0
    print(f"pack        {d['root']}")
    print(f"format      {d['source_format']}    model {d['model'] or '?'}    "
          f"d_model {d['d_model'] or '?'}    layers {d['n_layers'] or '?'}")
    print(f"SAEs        {d['n_saes']} at positions {', '.join(d['positions'])}")
    print(f"  {'position':<11}{'layer':>5}  {'d_in':>6}  {'d_sae':>7}  {'arch':<9} {'dtype':<9} "
          f"{'format':<12} path")
    for r in d["saes"]:
        print(f"  {r['position']:<11}{r['layer']:>5}  {r['d_in']:>6}  {r['d_sae']:>7}  "
              f"{r['architecture']:<9} {r['dtype']:<9} {r['format']:<12} {r['path']}")
        for o in r.get("options") or []:
            print(f"      option: {o}")
    for c in d["choices"]:
        print(f"  note: {c}")
    for r in d["refused"]:
        print(f"  REFUSED: {r['path']}: {r['why']}")
    if d["missing"]:
        by_pos: dict[str, list[int]] = {}
        for m in d["missing"]:
            by_pos.setdefault(m["position"], []).append(m["layer"])
        print(f"incomplete: {len(d['missing'])} slot(s) missing")
        for p, ls in by_pos.items():
            print(f"  {p}: layers {_ranges(ls)}")
    elif d["n_saes"]:
        print("complete: every layer has an SAE at every position present")
    if d["refused"]:
        print(f"{len(d['refused'])} SAE(s) above cannot be loaded exactly; other commands refuse "
              f"this family until they are removed")
    if args.verify:
        probs = d["verify_problems"]
        print("verify: OK" if not probs else "verify: FAILED\n  " + "\n  ".join(probs))
        return 1 if probs else 0
    return 1 if d["refused"] else 0


def cmd_pack_convert(args) -> int:
    from saeflow.saes.packs import convert_pack

    pack = open_pack_from_args(args)
    out = convert_pack(pack, args.out, model_name=args.model_name, n_layers=args.n_layers,
                       overwrite=args.force, progress=True)
    print(f"wrote saeflow pack with {len(out)} SAEs to {out.root}")
    return 0


def cmd_pack_fetch(args) -> int:
    from saeflow.saes.hub import fetch

    pack = fetch(args.release, out=args.out, layers=args.layers, width=args.width, l0=args.l0,
                 positions=args.positions, mirror=args.mirror, overwrite=args.force,
                 ids=args.ids.split(",") if args.ids else None)
    print(f"fetched {len(pack)} SAEs into saeflow pack {pack.root}")
    return 0


def _train_options(tr) -> None:
    from saeflow.saes.train.config import TrainConfig

    add_corpus_pass(tr, TrainConfig, fields=TRAIN_PASS, model_default="embedded")
    g = tr.add_argument_group("the SAEs and their training")
    add_config_options(g, TrainConfig, skip=tuple(TRAIN_PASS),
                       flags={"checkpoint_every_s": ["--checkpoint-every", "--checkpoint-every-s"]})
    tr.add_argument("--out", required=True, help="the pack folder to write")
    tr.add_argument("--overwrite", action="store_true", help="replace a different pack at --out")
    add_scale(tr, only=["workers", "ray_address", "retries"])
    tr.set_defaults(func=cmd_train)


def _inspect_options(ins) -> None:
    ins.add_argument("path")
    add_selectors(ins, variant_seed=True)
    ins.add_argument("--model", default=None, help="check against this model (d_in, layers)")
    ins.add_argument("--n-layers", type=int, default=None, help="layers the family should cover")
    ins.add_argument("--verify", action="store_true",
                     help="also print every problem found (the checks are the ones load and "
                          "convert make: cfg against tensor headers, dtypes, k, finite weights, "
                          "hashes in pack.json) and end with verify: OK / FAILED")
    add_json(ins)
    ins.set_defaults(func=cmd_pack_inspect)


def _convert_options(conv) -> None:
    conv.add_argument("path")
    conv.add_argument("out")
    add_selectors(conv, variant_seed=True)
    conv.add_argument("--model-name", default=None)
    conv.add_argument("--n-layers", type=int, default=None)
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    conv.set_defaults(func=cmd_pack_convert)


def _eval_options(ev) -> None:
    from saeflow.pipeline.config import EvalConfig

    ev.add_argument("path", help="a pack path, or 'embedded' / 'embedded-quick'")
    add_selectors(ev)
    ev.add_argument("--model", default=None, help="default: embedded for the embedded packs")
    add_config_options(ev, EvalConfig, only=EVAL_OPTIONS)
    add_device(ev)
    add_json(ev)
    ev.set_defaults(func=cmd_pack_eval)


def _fetch_options(fet) -> None:
    from saeflow.saes.hub import fetch

    fet.add_argument("release", help="e.g. gemma-scope-2b-pt-res-canonical, "
                     "gemma-scope-2-270m-pt-res, a SAELens release, or a hub repo owner/name")
    fet.add_argument("--layers", default=signature_default(fetch, "layers"),
                     help="e.g. 0-25 or 3,6,9")
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


def _pack_commands(pack) -> None:
    psub = pack.add_subparsers(dest="pack_cmd", required=True)
    command(psub, "inspect", "list the SAEs of a family and the missing slots", _inspect_options)
    command(psub, "convert", "write any supported family as a saeflow pack", _convert_options)
    command(psub, "eval", "FVU, L0, dead/dense fractions, ΔCE and KL per SAE", _eval_options)
    command(psub, "fetch", "download a published family (needs the hub)", _fetch_options)


def register(sub) -> None:
    command(sub, "train", "train an SAE family from one pass over a corpus", _train_options)
    command(sub, "pack", "inspect, convert, evaluate and fetch SAE families", _pack_commands)

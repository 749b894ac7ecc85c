"""`saeflow info`: the model's anatomy and hook points."""
from __future__ import annotations

from saeflow.cli.common import add_device, add_json, print_json
from saeflow.cli.options import command


def cmd_info(args) -> int:
    from saeflow.lm.model import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    a = model.anatomy()
    a["load_seconds"] = round(model.load_seconds, 2)
    if args.json:
        print_json(a)
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
            print(f"    {pos:<11} {hp['hf_name']:<52} {hp['tl_name'] or '-':<28} {hp['width']}")
    return 0


def _info_options(info) -> None:
    info.add_argument("--model", default="embedded",
                      help="'embedded', an HF folder, a hub id, or a .gguf file")
    add_device(info)
    info.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    add_json(info)
    info.set_defaults(func=cmd_info)


def register(sub) -> None:
    command(sub, "info", "load a model and print its anatomy and hook points", _info_options)

"""What several wings share: JSON output, opening a pack from the options, the model a command
needs, the pack-variant selectors, and the option group of a pass over a corpus."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from saeflow.cli.options import add_config_options, config_from_args
from saeflow.errors import UsageError

CORPUS_PASS_FIELDS = ["tokens", "corpus", "seed", "batch_size", "ctx_len", "encoder_dtype"]


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def add_json(p: argparse.ArgumentParser, help: str = "print JSON instead of text") -> None:
    p.add_argument("--json", action="store_true", help=help)


def add_device(p) -> None:
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: automatic)")


def add_selectors(sp: argparse.ArgumentParser, variant_seed: bool = False) -> None:
    """Which SAEs of a published family to take, for formats that hold several variants."""
    g = sp.add_argument_group("variant selection (published families)")
    g.add_argument("--position", default=None,
                   help="position for SAEs whose files do not say it (Gemma Scope npz)")
    g.add_argument("--width", default=None, help="variant to take, e.g. 16k")
    g.add_argument("--l0", default=None, help="variant to take, e.g. 82 or medium")
    if variant_seed:  # commands with a sampling --seed do not get this one
        g.add_argument("--seed", type=int, default=None, dest="variant_seed",
                       help="sparsify multi-seed run: the seed to take (default: the lowest)")
    g.add_argument("--best", action="store_true",
                   help="sparsify save_best run: take best/ (default: the final checkpoint)")
    g.add_argument("--family", default=None,
                   help="model family for HF hook names (gemma3, llama, ...); --model sets it")


def add_corpus_pass(sp: argparse.ArgumentParser, cls, *, fields: list[str] | None = None,
                    model_default: str | None = None) -> None:
    """The option group of a pass of the model over a corpus, generated from `cls`."""
    g = sp.add_argument_group("a pass over a corpus")
    g.add_argument("--model", default=model_default,
                   help="'embedded', an HF folder, a hub id, or a .gguf file" +
                   ("" if model_default else " (default: embedded for the embedded packs)"))
    add_device(g)
    have = {f.name for f in dataclasses.fields(cls)}
    names = [f for f in (fields or CORPUS_PASS_FIELDS) if f in have]
    add_config_options(g, cls, only=names)


def add_pass_arguments(p: argparse.ArgumentParser, cls, writes: str) -> None:
    """The arguments of a command that runs the model and a pack over a corpus and writes into
    RUN/`writes`."""
    p.add_argument("path", help="a pack path, or 'embedded' / 'embedded-quick'")
    add_selectors(p)
    p.add_argument("--out", required=True, help=f"RUN directory (writes RUN/{writes}/)")
    add_corpus_pass(p, cls)
    add_scale(p)


def add_scale(p: argparse.ArgumentParser, only: list[str] | None = None) -> None:
    """--workers, --ray-address, --retries, --shard-tokens (saeflow.scale.ScaleConfig)."""
    from saeflow.scale import ScaleConfig

    g = p.add_argument_group("scale-out on Ray (pip install 'saeflow[ray]'; docs/scale.md)")
    add_config_options(g, ScaleConfig, only=only)


def scale_from_args(args):
    """The ScaleConfig of the options (workers 0: in this process, Ray not imported). With
    workers, Ray is reached here, first: a bad address fails before the model loads."""
    from saeflow.scale import ScaleConfig

    cfg = config_from_args(ScaleConfig, args)
    if cfg.distributed:
        from saeflow.scale.ray_backend import connect

        connect(cfg)
    return cfg


def open_pack_from_args(args, model=None, strict: bool = True):
    from saeflow.saes.recipes import EMBEDDED_NAMES, open_pack

    if args.path in EMBEDDED_NAMES:
        return open_pack(args.path, model=model)
    family = getattr(args, "family", None) or (model.arch.family if model is not None else None)
    return open_pack(args.path, model=model, position=getattr(args, "position", None),
                     width=getattr(args, "width", None), l0=getattr(args, "l0", None),
                     family=family, seed=getattr(args, "variant_seed", None),
                     best=getattr(args, "best", False), strict=strict)


def model_spec(pack_spec: str, model: str | None, stage: str) -> str:
    """--model, or the embedded model for the embedded packs."""
    model = model or ("embedded" if pack_spec.startswith("embedded") else None)
    if model is None:
        raise UsageError(f"{stage} needs --model (the model the pack was made for)")
    return model


def model_and_pack(args, stage: str):
    """The model (--model, or the embedded one for the embedded packs) and the pack PATH."""
    from saeflow.lm.model import load_model

    model = load_model(model_spec(args.path, args.model, stage), device=args.device)
    return model, open_pack_from_args(args, model=model)


def load_model_and_pack(args, stage: str):
    """The same for commands that name the pack with --pack."""
    from saeflow.lm.model import load_model
    from saeflow.saes.recipes import open_pack

    model = load_model(model_spec(args.pack, args.model, stage), device=args.device)
    return model, open_pack(args.pack, model=model)


def optional_model(spec: str | None):
    """A CPU model when --model was given (for mapped positions such as attn_z), else None."""
    if not spec:
        return None
    from saeflow.lm.model import load_model

    return load_model(spec, device="cpu")

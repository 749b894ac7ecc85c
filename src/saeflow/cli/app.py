"""`saeflow run` (the main job) and `saeflow serve` (the web app)."""
from __future__ import annotations

import argparse
import shlex

from saeflow.app import DEFAULT_HOST, DEFAULT_PORT
from saeflow.cli.common import add_scale, scale_from_args
from saeflow.cli.options import add_overrides, command, given_overrides, parse_str_list

RUN_OVERRIDES = ["model", "pack", "corpus", "index_tokens", "stats_tokens", "device"]
SERVE_HOST_HELP = "bind address; anything but localhost is reachable from other machines"


def cmd_run(args) -> int:
    from saeflow.app.server import serve
    from saeflow.pipeline.config import PROFILES, PipelineConfig
    from saeflow.pipeline.stages import run_pipeline

    # The settings first (their rules refuse bad values), then Ray, then the stages.
    cfg = PipelineConfig.from_flat(PROFILES[args.profile], **given_overrides(args, RUN_OVERRIDES))
    scale = scale_from_args(args)
    run_pipeline(args.out, cfg, only=args.only, skip=args.skip, force=args.force,
                 command="saeflow " + " ".join(shlex.quote(a) for a in args.argv),
                 scale=scale)
    if args.serve:
        serve(args.out, port=args.port, model=cfg.model)
    return 0


def cmd_serve(args) -> int:
    from saeflow.app.server import serve

    serve(args.run, host=args.host, port=args.port, pack=args.pack, model=args.model,
          open_browser=args.open)
    return 0


def parse_port(text: str) -> int:
    """A TCP port to listen on: 1..65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a number in 1..65535, not {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number in 1..65535, not {port}")
    return port


def _port_option(p) -> None:
    p.add_argument("--port", type=parse_port, default=DEFAULT_PORT,
                   help="port of the web app")


def _run_options(rn) -> None:
    from saeflow.pipeline.config import FLAT, FLAT_HELP, PROFILES, PipelineConfig

    rn.add_argument("--out", required=True, help="the RUN directory")
    rn.add_argument("--profile", default="default", choices=list(PROFILES),
                    help="quick: the small pack and small samples (under 10 min on 2 cores)")
    g = rn.add_argument_group("overrides of the profile")
    add_overrides(g, PipelineConfig, RUN_OVERRIDES, helps=FLAT_HELP,
                  paths={name: FLAT[name][0] for name in RUN_OVERRIDES})
    rn.add_argument("--only", type=parse_str_list, default=None,
                    help="comma-separated stages to run")
    rn.add_argument("--skip", type=parse_str_list, default=None,
                    help="comma-separated stages to leave out")
    rn.add_argument("--force", action="store_true", help="rerun the chosen stages")
    add_scale(rn)
    rn.add_argument("--serve", action="store_true", help="start the web app when done")
    _port_option(rn)
    rn.set_defaults(func=cmd_run)


def _serve_options(sv) -> None:
    sv.add_argument("run", help="RUN from `saeflow flow` / `index` / `stats`")
    _port_option(sv)
    sv.add_argument("--host", default=DEFAULT_HOST, help=SERVE_HOST_HELP)
    sv.add_argument("--pack", default=None, help="default: the pack the run's flow was made from")
    sv.add_argument("--model", default=None,
                    help="the model, for steering and the prompt view (default: embedded for "
                         "runs of the embedded model)")
    sv.add_argument("--open", action="store_true", help="open the browser")
    sv.set_defaults(func=cmd_serve)


def register(sub) -> None:
    command(sub, "run", "the main job end to end: pack, eval, flow, index, stats, validate, "
            "sweep, report (resumable; then --serve)", _run_options)
    command(sub, "serve", "the web app and JSON API over a RUN (127.0.0.1 by default)",
            _serve_options)

"""`saeflow ...`: a thin command line over the Python API. Each wing module registers its
commands; their options are generated from the library's config dataclasses and signatures."""
from __future__ import annotations

import argparse
import sys

from saeflow._version import __version__
from saeflow.cli import app, evolution, features, flow, lm, saes, steering
from saeflow.errors import SaeflowError

WINGS = (lm, saes, flow, features, evolution, steering, app)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saeflow", description=__doc__)
    p.add_argument("--version", action="version", version=f"saeflow {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    for wing in WINGS:
        wing.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (SaeflowError, OSError) as e:  # a user's error, one line; anything else is a bug
        print(f"saeflow: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

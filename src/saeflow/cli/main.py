"""`saeflow ...`: a thin command line over the Python API. Each wing module registers its
commands; their options are generated from the library's config dataclasses and signatures.

Bad input of any kind (an option, a file, a full disk) ends with one line on stderr and exit
status 2, before anything is written where possible; a traceback means a bug in saeflow."""
from __future__ import annotations

import errno
import sys

from saeflow._version import __version__
from saeflow.cli import app, evolution, features, flow, lm, saes, steering
from saeflow.cli.options import Parser, check_configs, one_line
from saeflow.errors import SaeflowError

WINGS = (lm, saes, flow, features, evolution, steering, app)
USAGE_ERROR = 2  # the exit status of every bad input (argparse's own, kept for all of them)


def build_parser() -> Parser:
    p = Parser(prog="saeflow", description=__doc__)
    p.add_argument("--version", action="version", version=f"saeflow {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)  # subparsers are Parsers too
    for wing in WINGS:
        wing.register(sub)
    return p


def os_error_line(e: OSError) -> str:
    """An OSError as one line that says what to do (a full disk above all)."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device{where}; nothing half-written was kept: free some "
                f"space (or choose another --out / $SAEFLOW_CACHE) and rerun the same command")
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"cannot write or read{where}: {e.strerror}; choose a writable --out"
    return one_line(e)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_configs(args)  # every config's own rules, before anything loads or writes
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SaeflowError as e:  # a user's error, one line; anything else is a bug
        print(f"saeflow: error: {one_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as e:
        print(f"saeflow: error: {os_error_line(e)}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())

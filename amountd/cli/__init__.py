"""The `amountd` command: list, watch, serve, subscribe, status, fleet (docs/protocol.md
and the README).

One module per command group: local.py (list, watch), serve.py (serve, its settings),
remote.py (subscribe, status: the client side only), fleet.py (fleet); below them
args.py (shared flags and their checks), run.py (the loop, signals, output) and
constants.py (a leaf). Heavy modules (anyio, msgspec, the sources, the server) are
imported inside the commands, so `--help` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import AmountdError
from . import fleet, local, remote, serve
from .args import Parser, add_common

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    top = Parser(add_help=False)
    add_common(top)
    common = Parser(add_help=False)  # the commands' copy of the global flags
    add_common(common, defaults=False)
    parser = Parser(
        prog="amountd",
        description="Follow Linux mount tables: fanotify mount events (Linux 6.15+) "
        "or /proc/PID/mountinfo polling, as a command, a server, or a Python API.",
        epilog="Exit status: 0 done (count reached, timeout, namespace ended, SIGINT/SIGTERM); "
        "1 failure at run time; 2 bad usage.",
        parents=[top],
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # In this order in --help: list, watch, serve, subscribe, status, fleet.
    local.add_commands(sub, common)
    serve.add_commands(sub, common)
    remote.add_commands(sub, common)
    fleet.add_commands(sub, common)
    return parser


def _version() -> str:
    from ..constants import __version__

    return f"amountd {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    from ..interrupt import arm

    arm()  # before anything heavy: SIGINT/SIGTERM at any moment end us with status 0
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except AmountdError as e:
        if args.debug:
            raise
        print(f"amountd: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (`amountd watch | head`): that is a normal end.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return rc

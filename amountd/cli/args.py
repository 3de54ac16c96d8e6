"""The command line's shared flags, their types and checks, below every command group.

Only argparse and the standard library at import time: `amountd --help` builds every
parser, and must not pay for the event loop or msgspec (the commands import those).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..constants import DEFAULT_SOCKET
from ..errors import AmountdError, UsageError
from .constants import COLUMN_NAMES, FILTER_FLAGS

__all__ = [
    "Parser",
    "add_common",
    "add_filters",
    "add_ns",
    "add_output_flags",
    "add_server_address",
    "add_source",
    "at_least_0",
    "at_least_1",
    "filter_of",
    "hostport",
    "make_view",
    "positive_int",
    "seconds",
    "server_address",
    "socket_path",
]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"amountd: {message}\n(see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {n}")
    return n


def seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(s) or s < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return s


def add_common(p: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """The global flags. They go before or after the command: the command's copy has no
    defaults (argparse.SUPPRESS), so it cannot overwrite a value given before it."""
    p.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio" if defaults else argparse.SUPPRESS,
        help="event loop to run on (default: asyncio)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="show tracebacks for failures",
    )


def add_ns(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ns",
        metavar="PID|NSPATH",
        help="the mount namespace of process PID, or a namespace file (default: our own)",
    )


def add_filters(p: argparse.ArgumentParser, *, actions: bool) -> None:
    p.add_argument(
        "-t",
        "--types",
        metavar="TYPES",
        help="only these filesystem types, comma-separated; a 'no' prefix negates (notmpfs)",
    )
    p.add_argument("--under", metavar="PATH", help="only PATH itself and mounts below it")
    if actions:
        p.add_argument(
            "--action",
            metavar="LIST",
            help="only these actions: mount,umount,move,remount,propagation",
        )


def add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        default="auto",
        metavar="auto|fanotify|listmount|mountinfo",
        help="where changes come from (default: auto = fanotify on Linux 6.15+, else "
        "listmount on 6.8+, else mountinfo, saying why)",
    )


def _sweep_number(check: Callable[[float], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return check(float(text))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e} (got {text!r})") from None

    return parse


def add_sweep_flags(p: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """--sweep-interval and --sweep-budget (`watch`; `serve`, whose settings flags
    default to None so that the settings file applies)."""
    from ..sweep import SWEEP_BUDGET, SWEEP_INTERVAL, check_budget, check_interval

    p.add_argument(
        "--sweep-interval",
        type=_sweep_number(check_interval),
        default=SWEEP_INTERVAL if defaults else None,
        metavar="SECONDS",
        help="fanotify, listmount: sweep every mount this often for propagation changes, "
        f"which the kernel reports nowhere (default: {SWEEP_INTERVAL:g})",
    )
    p.add_argument(
        "--sweep-budget",
        type=_sweep_number(check_budget),
        default=SWEEP_BUDGET if defaults else None,
        metavar="FRACTION",
        help="fanotify, listmount: the share of one CPU the sweeps that find remounts "
        f"may take (default: {SWEEP_BUDGET:g})",
    )


def add_output_flags(p: argparse.ArgumentParser, *, tree: bool = False) -> None:
    """findmnt's output flags: -o/--output, -n, -r, -P (and list's --tree)."""
    p.add_argument(
        "-o",
        "--output",
        metavar="LIST",
        help="columns to print, comma-separated; +LIST adds to the default. Columns: "
        + ", ".join(COLUMN_NAMES),
    )
    p.add_argument("-n", "--noheadings", action="store_true", help="do not print a header line")
    style = p.add_mutually_exclusive_group()
    style.add_argument(
        "-r",
        "--raw",
        action="store_true",
        help="raw output: one space between cells, blanks and backslashes escaped as \\xNN",
    )
    style.add_argument(
        "-P", "--pairs", action="store_true", help='KEY="value" pairs, quoted for a shell'
    )
    if tree:
        p.add_argument(
            "--tree", action="store_true", help="the mounts as a tree, as findmnt shows them"
        )


def make_view(args: argparse.Namespace, default: Sequence[str], stream: Any = None) -> Any:
    """The columns and style asked for, fitted to stdout if it is a terminal."""
    from ..columns import Style, View, parse_columns

    try:
        columns = parse_columns(getattr(args, "output", None), default)
    except ValueError as e:
        raise UsageError(str(e)) from None
    style = (
        Style.PAIRS
        if getattr(args, "pairs", False)
        else Style.RAW
        if getattr(args, "raw", False)
        else Style.TABLE
    )
    out = stream if stream is not None else sys.stdout
    width: int | None = None
    tty = False
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        tty = False
    if tty:
        import shutil

        width = shutil.get_terminal_size().columns
    return View(
        columns,
        style=style,
        headings=not getattr(args, "noheadings", False),
        width=width if style is Style.TABLE else None,
        color=tty and not os.environ.get("NO_COLOR"),
        with_notes=getattr(args, "output", None) is None,
    )


def filter_of(args: argparse.Namespace) -> Any:
    """The filter flags as a Filter; UsageError naming the flag for anything that is
    not one (an empty value too: `--action ""` is a mistake, not "every action")."""
    from ..filter import Filter, FilterError, parse_actions, parse_types
    from ..model import fspath

    action = getattr(args, "action", None)
    try:
        actions = parse_actions(action) if action is not None else None
        types = parse_types(args.types) if args.types is not None else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    under = fspath(os.fsencode(args.under)) if args.under is not None else None
    try:
        return Filter(actions=actions, fstypes=types, under=under)
    except FilterError as e:
        raise UsageError(f"bad {FILTER_FLAGS.get(e.field, e.field)}: {e.reason}") from None


def _count(text: str, *, minimum: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < minimum:
        raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {n}")
    return n


def at_least_1(text: str) -> int:
    return _count(text, minimum=1)


def at_least_0(text: str) -> int:
    return _count(text, minimum=0)


def socket_path(text: str) -> str:
    """--unix PATH: a path, not an empty word (which would mean the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give the socket's path")
    if "\0" in text:
        raise argparse.ArgumentTypeError("a path cannot hold a NUL byte")
    return text


def hostport(text: str) -> str:
    from ..config import parse_hostport

    try:
        parse_hostport(text, default_host=None, port_zero=True)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_server_address(p: argparse.ArgumentParser) -> None:
    """Where a client command finds the server (subscribe, status)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--unix",
        metavar="PATH",
        type=socket_path,
        help=f"the server's Unix socket (default: {DEFAULT_SOCKET})",
    )
    where.add_argument("--tcp", metavar="HOST:PORT", type=hostport, help="the server's TCP address")
    p.add_argument("--tls", action="store_true", help="--tcp over TLS (system CAs)")
    p.add_argument("--tls-ca", metavar="FILE", help="--tcp over TLS, trusting this CA certificate")
    p.add_argument("--token-file", metavar="FILE", help="send this file's content as the token")
    p.add_argument(
        "--server-uid",
        metavar="UID|USER",
        type=_uid,
        help="also trust a Unix socket served by this user (by default only a server "
        "running as root or as you is trusted: another user could have replaced the socket)",
    )


def _uid(text: str) -> int:
    if text.isdigit():
        return int(text)
    import pwd

    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no user named {text!r}") from None


def server_address(args: argparse.Namespace) -> tuple[str, str | None, Any]:
    """(url, token, ssl context) from add_server_address's flags."""
    from ..tokens import read_token

    if (args.tls or args.tls_ca) and args.tcp is None:
        raise UsageError("--tls/--tls-ca apply to --tcp HOST:PORT")
    if args.tcp is not None:
        url = f"{'tls' if args.tls or args.tls_ca else 'tcp'}://{args.tcp}"
    else:
        url = f"unix:{os.path.abspath(args.unix or DEFAULT_SOCKET)}"
    token = read_token(args.token_file) if args.token_file else None
    ssl_context = None
    if args.tls_ca:
        import ssl

        try:
            ssl_context = ssl.create_default_context(cafile=args.tls_ca)
        except (OSError, ssl.SSLError) as e:
            raise AmountdError(f"cannot load the CA certificate {args.tls_ca}: {e}") from None
    return url, token, ssl_context

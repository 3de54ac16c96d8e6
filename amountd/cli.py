"""The `amountd` command: list, watch, serve, subscribe (docs/protocol.md and the README).

Heavy modules (anyio, the sources) are imported inside the commands, so `--help` and
usage errors answer at once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import IO, Any, NoReturn

from .errors import AmountdError, UsageError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"amountd: {message}\n(see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {n}")
    return n


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(s) or s < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return s


def _add_common(p: argparse.ArgumentParser, *, defaults: bool = True) -> None:
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


def _add_ns(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ns",
        metavar="PID|NSPATH",
        help="the mount namespace of process PID, or a namespace file (default: our own)",
    )


def _add_filters(p: argparse.ArgumentParser, *, actions: bool) -> None:
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


def _add_source(p: argparse.ArgumentParser) -> None:
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
    from .sweep import SWEEP_BUDGET, SWEEP_INTERVAL, check_budget, check_interval

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


COLUMN_NAMES = [
    "ACTION",
    "TARGET",
    "SOURCE",
    "FSTYPE",
    "OPTIONS",
    "VFS-OPTIONS",
    "FS-OPTIONS",
    "PROPAGATION",
    "ID",
    "UNIQ-ID",
    "PARENT",
    "OLD-TARGET",
    "OLD-OPTIONS",
    "NS",
    "PID",
    "COMM",
    "TIME",
    "CONTAINER",
]
"""amountd.columns.COLUMNS's names, here so that --help does not import msgspec."""


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
    from .columns import Style, View, parse_columns

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


def build_parser() -> argparse.ArgumentParser:
    top = _Parser(add_help=False)
    _add_common(top)
    common = _Parser(add_help=False)  # the commands' copy of the global flags
    _add_common(common, defaults=False)
    parser = _Parser(
        prog="amountd",
        description="Follow Linux mount tables: fanotify mount events (Linux 6.15+) "
        "or /proc/PID/mountinfo polling, as a command, a server, or a Python API.",
        epilog="Exit status: 0 done (count reached, timeout, namespace ended, SIGINT/SIGTERM); "
        "1 failure at run time; 2 bad usage.",
        parents=[top],
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "list",
        parents=[common],
        help="print the mount table once",
        description="Print a mount namespace's table once, as findmnt does: columns "
        'chosen with -o, a tree with --tree, raw or KEY="value" output, or one JSON '
        "snapshot frame. With --all-namespaces, every mount namespace on the host, each "
        "with what runs in it (the container, from a process's cgroup).",
    )
    p.add_argument("--json", action="store_true", help="one snapshot frame as JSON")
    _add_ns(p)
    p.add_argument(
        "--all-namespaces",
        action="store_true",
        help="every mount namespace on the host (JSON: one snapshot frame each)",
    )
    _add_filters(p, actions=False)
    _add_source(p)
    add_output_flags(p, tree=True)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "watch",
        parents=[common],
        help="print mount changes as they happen",
        description="Print each change to a mount namespace's table as it happens "
        "(mount, umount, move, remount, propagation), one line each, flushed at once: "
        "fanotify mount events (Linux 6.15+), else mountinfo polling.",
    )
    p.add_argument("--json", action="store_true", help="one JSON frame per line")
    _add_source(p)
    _add_ns(p)
    p.add_argument("--snapshot", action="store_true", help="print the table first")
    _add_filters(p, actions=True)
    p.add_argument("--count", type=_positive_int, metavar="N", help="exit after N events")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="exit after SECONDS")
    p.add_argument(
        "--unlimited-queue",
        action="store_true",
        help="fanotify: an unbounded kernel queue (real root only; a stalled reader pins memory)",
    )
    add_sweep_flags(p)
    add_output_flags(p)
    p.set_defaults(func=_cmd_watch)

    from .server_cli import add_commands

    add_commands(sub, common)
    from .fleet.cli import add_fleet_command

    add_fleet_command(sub, common)
    return parser


def _version() -> str:
    from . import __version__

    return f"amountd {__version__}"


_FILTER_FLAGS = {"actions": "--action", "fstypes": "-t/--types", "under": "--under"}


def _filter(args: argparse.Namespace) -> Any:
    """The filter flags as a Filter; UsageError naming the flag for anything that is
    not one (an empty value too: `--action ""` is a mistake, not "every action")."""
    from .filter import Filter, FilterError, parse_actions, parse_types
    from .model import fspath

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
        raise UsageError(f"bad {_FILTER_FLAGS.get(e.field, e.field)}: {e.reason}") from None


class Output:
    """Frames to stdout, one line each, flushed at once (a pipe reader sees them live)."""

    def __init__(self, json: bool, stream: IO[bytes] | None = None, view: Any = None) -> None:
        from .model import encode_json

        self.json = json
        self.stream = stream if stream is not None else sys.stdout.buffer
        self._header = False
        self._encode = encode_json  # bound here: a frame's path is the hot path
        self._render: Any = None
        if not json:
            from .cgroups import ContainerLookup
            from .columns import DEFAULT_WATCH, View
            from .render import Renderer

            if view is None:
                view = View(DEFAULT_WATCH, with_notes=True)
            lookup = ContainerLookup() if "CONTAINER" in view.columns else None
            self._render = Renderer(view, lookup)

    def _write(self, data: bytes) -> None:
        self.stream.write(data)
        self.stream.flush()

    def header(self) -> None:
        if not self.json and not self._header:
            self._header = True
            line = self._render.header()
            if line is not None:
                self._write(line.encode("utf-8", "surrogateescape") + b"\n")

    def frame(self, frame: Any) -> None:
        if self.json:
            self._write(self._encode(frame) + b"\n")
            return
        from .model import End, Ready, Resync

        self.header()
        rows = self._render.lines(frame)
        if rows:
            self._write("\n".join(rows).encode("utf-8", "surrogateescape") + b"\n")
        elif isinstance(frame, Ready):
            if frame.reason:
                print(f"amountd: {frame.reason}", file=sys.stderr, flush=True)
        elif isinstance(frame, Resync):
            print(f"amountd: resync ({frame.reason})", file=sys.stderr, flush=True)
        elif isinstance(frame, End):
            print(f"amountd: {frame.reason}", file=sys.stderr, flush=True)


def _cmd_list(args: argparse.Namespace) -> int:
    from .cgroups import container_of_pid
    from .columns import DEFAULT_LIST
    from .container import Container
    from .filter import filter_mounts
    from .model import Snapshot, encode_json
    from .ns import all_namespaces, resolve_ns
    from .render import list_lines
    from .sources import read_table

    if args.all_namespaces and args.ns:
        raise UsageError("--ns and --all-namespaces exclude each other")
    flt = _filter(args)
    view = None if args.json else make_view(args, DEFAULT_LIST)
    spaces = all_namespaces() if args.all_namespaces else [resolve_ns(args.ns)]
    out = sys.stdout.buffer
    lines: list[str] = []
    for ns in spaces:
        try:
            mounts = read_table(args.source, ns).mounts()
        except AmountdError as e:
            if not args.all_namespaces:
                raise
            print(f"amountd: skipping {ns.label}: {e}", file=sys.stderr)
            continue  # it ended while we listed, or we may not read it
        if not flt.is_empty:
            mounts = filter_mounts(flt, mounts)
        container = container_of_pid(ns.pid)
        if args.json:
            snap = Snapshot(seq=0, ns_id=ns.ns_id, mounts=mounts, container=container)
            out.write(encode_json(snap) + b"\n")
            continue
        if args.all_namespaces and not args.noheadings and not args.pairs and not args.raw:
            what = f", {container.short}" if container is not None else ""
            lines.append(f"# mount namespace {ns.ns_id} ({ns.label}{what}): {len(mounts)} mounts")
        assert view is not None

        def container_of(_ns_id: int, c: Container | None = container) -> Container | None:
            return c

        lines.extend(list_lines(view, mounts, tree=args.tree, container_of=container_of))
    if lines:
        out.write("\n".join(lines).encode("utf-8", "surrogateescape") + b"\n")
    out.flush()
    return 0


async def run_until_signal(body: Callable[[], Any], timeout: float | None) -> None:
    """Run `body` until it returns, `timeout` passes, or SIGINT/SIGTERM arrives."""
    import signal

    import anyio

    from .interrupt import rearm

    async with anyio.create_task_group() as tg:

        async def signals() -> None:
            try:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                    async for _ in received:
                        tg.cancel_scope.cancel()
                        return
            finally:
                rearm()  # asyncio restored Python's defaults on the way out

        tg.start_soon(signals)
        with anyio.move_on_after(timeout):
            await body()
        tg.cancel_scope.cancel()


def _cmd_watch(args: argparse.Namespace) -> int:
    from contextlib import aclosing

    from .api import frames_of
    from .columns import DEFAULT_WATCH
    from .ns import resolve_ns
    from .sources import open_source
    from .sweep import SweepSettings

    flt = _filter(args)
    out = Output(args.json, view=None if args.json else make_view(args, DEFAULT_WATCH))

    async def body() -> None:
        # The source's frames printed by this one task: no second task and channel
        # between them (the API's cancel-safe stream), whose hand-over would be a
        # loop turn per change.
        async with (
            open_source(
                args.source,
                resolve_ns(args.ns),
                unlimited_queue=args.unlimited_queue,
                sweep=SweepSettings(args.sweep_interval, args.sweep_budget),
            ) as src,
            aclosing(frames_of(src, snapshot=args.snapshot, filter=flt)) as frames,
        ):
            await print_frames(frames, out, args.count)

    run(lambda: run_until_signal(body, args.timeout), args.backend)
    return 0


async def print_frames(frames: AsyncIterator[Any], out: Output, count: int | None) -> None:
    """Print frames until the stream ends or `count` events were printed."""
    from .model import Event

    n = 0
    async for frame in frames:
        out.frame(frame)
        if isinstance(frame, Event):
            n += 1
            if count is not None and n >= count:
                return


def _leaves(eg: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def run(fn: Callable[[], Any], backend: str) -> None:
    """Run on the chosen loop; a task group's lone failure comes out as itself."""
    import anyio

    from .interrupt import rearm

    try:
        anyio.run(fn, backend=backend)
    except BaseExceptionGroup as eg:
        leaves = _leaves(eg)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    finally:
        rearm()  # a signal receiver inside may have restored Python's defaults


def main(argv: Sequence[str] | None = None) -> int:
    from .interrupt import arm

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

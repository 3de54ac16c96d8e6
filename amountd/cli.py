"""The `amountd` command: list, watch, serve, subscribe (docs/protocol.md and the README).

Heavy modules (anyio, the sources) are imported inside the commands, so `--help` and
usage errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .cliargs import (
    COLUMN_NAMES,
    Parser,
    add_common,
    add_filters,
    add_ns,
    add_output_flags,
    add_source,
    filter_of,
    make_view,
    positive_int,
    seconds,
)
from .errors import AmountdError, UsageError

__all__ = ["COLUMN_NAMES", "build_parser", "main"]


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
    add_ns(p)
    p.add_argument(
        "--all-namespaces",
        action="store_true",
        help="every mount namespace on the host (JSON: one snapshot frame each)",
    )
    add_filters(p, actions=False)
    add_source(p)
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
    add_source(p)
    add_ns(p)
    p.add_argument("--snapshot", action="store_true", help="print the table first")
    add_filters(p, actions=True)
    p.add_argument("--count", type=positive_int, metavar="N", help="exit after N events")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS", help="exit after SECONDS")
    p.add_argument(
        "--unlimited-queue",
        action="store_true",
        help="fanotify: an unbounded kernel queue (real root only; a stalled reader pins memory)",
    )
    add_output_flags(p)
    p.set_defaults(func=_cmd_watch)

    from .server_cli import add_commands

    add_commands(sub, common)
    from .fleet.cli import add_fleet_command

    add_fleet_command(sub, common)
    return parser


def _version() -> str:
    from .constants import __version__

    return f"amountd {__version__}"


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
    flt = filter_of(args)
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


def _cmd_watch(args: argparse.Namespace) -> int:
    from contextlib import aclosing

    from .api import frames_of
    from .clirun import Output, print_frames, run, run_until_signal
    from .columns import DEFAULT_WATCH
    from .ns import resolve_ns
    from .sources import open_source

    flt = filter_of(args)
    out = Output(args.json, view=None if args.json else make_view(args, DEFAULT_WATCH))

    async def body() -> None:
        # The source's frames printed by this one task: no second task and channel
        # between them (the API's cancel-safe stream), whose hand-over would be a
        # loop turn per change.
        async with (
            open_source(
                args.source, resolve_ns(args.ns), unlimited_queue=args.unlimited_queue
            ) as src,
            aclosing(frames_of(src, snapshot=args.snapshot, filter=flt)) as frames,
        ):
            await print_frames(frames, out, args.count)

    run(lambda: run_until_signal(body, args.timeout), args.backend)
    return 0


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

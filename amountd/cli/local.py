"""`amountd list` and `amountd watch`: a namespace's table, and its changes, read here
(no server), printed as findmnt does or as JSON frames."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import AmountdError, UsageError
from .args import (
    add_filters,
    add_ns,
    add_output_flags,
    add_source,
    add_sweep_flags,
    filter_of,
    make_view,
    positive_int,
    seconds,
)

__all__ = ["add_commands"]


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `list` and `watch` to the `amountd` parser's subcommands."""
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
    add_sweep_flags(p)
    add_output_flags(p)
    p.set_defaults(func=_cmd_watch)


def _cmd_list(args: argparse.Namespace) -> int:
    from ..cgroups import container_of_pid
    from ..columns import DEFAULT_LIST
    from ..container import Container
    from ..filter import filter_mounts
    from ..model import Snapshot, encode_json
    from ..ns import all_namespaces, resolve_ns
    from ..render import list_lines
    from ..sources import read_table

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

    from ..api import frames_of
    from ..columns import DEFAULT_WATCH
    from ..ns import resolve_ns
    from ..sources import open_source
    from ..sweep import SweepSettings
    from .run import Output, print_frames, run, run_until_signal

    flt = filter_of(args)
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

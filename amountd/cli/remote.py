"""`amountd subscribe` and `amountd status`: clients of a running `amountd serve`
(docs/protocol.md and the README).

The client side only: nothing here imports the server, the broker or the sources
(tests/test_import_cycles.py checks it). Registered by amountd.cli.build_parser(); the
heavy modules are imported inside the commands so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import UsageError
from .args import (
    add_filters,
    add_output_flags,
    add_server_address,
    at_least_0,
    at_least_1,
    filter_of,
    make_view,
    positive_int,
    seconds,
    server_address,
)

__all__ = ["add_commands"]


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `subscribe` and `status` to the `amountd` parser's subcommands."""
    p = sub.add_parser(
        "subscribe",
        parents=[common],
        help="print mount changes from a running `amountd serve`",
        description="The output of `amountd watch`, from a running `amountd serve`.",
    )
    add_server_address(p)
    p.add_argument("--json", action="store_true", help="one JSON frame per line")
    p.add_argument("--snapshot", action="store_true", help="print the table first")
    p.add_argument(
        "--since",
        type=at_least_0,
        metavar="SEQ",
        help="resume after event SEQ (replayed if the server still holds it, else a resync)",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="when the connection drops, reconnect and resume where it stopped",
    )
    add_filters(p, actions=True)
    p.add_argument("--count", type=positive_int, metavar="N", help="exit after N events")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS", help="exit after SECONDS")
    add_output_flags(p)
    add_subscribe_scope(p)
    p.set_defaults(func=_cmd_subscribe)

    add_status_command(sub, common)


def add_subscribe_scope(p: argparse.ArgumentParser) -> None:
    """subscribe's namespace filters: --ns ID, --pid PID, --container ID|PREFIX."""
    p.add_argument(
        "--ns",
        dest="ns_ids",
        metavar="NS_ID",
        type=at_least_0,
        action="append",
        help="only this mount namespace (its ID, as the NS column shows); repeatable",
    )
    p.add_argument(
        "--pid",
        dest="pids",
        metavar="PID",
        type=at_least_1,
        action="append",
        help="only the mount namespace of process PID (resolved by the server); repeatable",
    )
    p.add_argument(
        "--container",
        dest="containers",
        metavar="ID|PREFIX",
        action="append",
        help="only namespaces whose container ID (or pod UID) starts with this, or "
        "RUNTIME:PREFIX (docker:3f2a); repeatable",
    )


def subscribe_scope(args: argparse.Namespace, flt: Any) -> Any:
    """The filter with subscribe's --ns/--pid/--container added."""
    import msgspec

    changes: dict[str, Any] = {}
    if getattr(args, "ns_ids", None):
        changes["namespaces"] = list(args.ns_ids)
    if getattr(args, "pids", None):
        changes["pids"] = list(args.pids)
    if getattr(args, "containers", None):
        if any(not c.strip() for c in args.containers):
            raise UsageError("--container needs an ID, a prefix, or RUNTIME:PREFIX")
        changes["containers"] = list(args.containers)
    return msgspec.structs.replace(flt, **changes) if changes else flt


def _cmd_subscribe(args: argparse.Namespace) -> int:
    from ..columns import DEFAULT_WATCH
    from .run import Output, print_frames, run, run_until_signal

    url, token, ssl_context = server_address(args)
    flt = subscribe_scope(args, filter_of(args))
    out = Output(args.json, view=None if args.json else make_view(args, DEFAULT_WATCH))

    async def body() -> None:
        from ..client import connect

        async with connect(
            url,
            snapshot=args.snapshot,
            since=args.since,
            filter=flt,
            format="msgpack",
            reconnect=args.reconnect,
            token=token,
            ssl_context=ssl_context,
            server_uid=args.server_uid,
            keep_table=True,  # after a resync: what changed, not the whole table
        ) as frames:
            await print_frames(frames, out, args.count)

    run(lambda: run_until_signal(body, args.timeout), args.backend)
    return 0


def add_status_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """`amountd status`: one `status` frame from a running server."""
    p = sub.add_parser(
        "status",
        parents=[common],
        help="show a running server's state",
        description="Ask a running `amountd serve` for its state: its source and "
        "namespaces, its subscribers and how far behind each is, the sequence number, "
        "counts and uptime. For root, members of the socket's group, and token holders.",
    )
    add_server_address(p)
    p.add_argument("--json", action="store_true", help="the `status` frame as one JSON object")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up after SECONDS (default: 10)",
    )
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from .run import run

    url, token, ssl_context = server_address(args)

    async def body() -> None:
        from ..model import encode_json
        from ..status import format_status, query_status

        st = await query_status(
            url,
            token=token,
            ssl_context=ssl_context,
            timeout=args.timeout,
            server_uid=args.server_uid,
        )
        if args.json:
            sys.stdout.buffer.write(encode_json(st) + b"\n")
        else:
            sys.stdout.write(format_status(st) + "\n")
        sys.stdout.flush()

    run(body, args.backend)
    return 0

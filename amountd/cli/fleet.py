"""`amountd fleet`: the rows of `amountd watch`, with a HOST column, for every host
that publishes to NATS (`amountd serve --publish`). Registered by
amountd.cli.build_parser(); nats-py is imported only when the command runs."""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

from ..errors import UsageError
from .args import add_filters, filter_of, positive_int, seconds

__all__ = ["FleetOutput", "add_commands"]

_W_HOST = 12


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `fleet` to the `amountd` parser's subcommands."""
    p = sub.add_parser(
        "fleet",
        parents=[common],
        help="print mount changes of every host that publishes to NATS",
        description="The output of `amountd watch` with a HOST column, read from NATS "
        "JetStream (the stream AMOUNTD and the bucket amountd_mounts) that "
        "`amountd serve --publish` writes. asyncio only.",
    )
    p.add_argument(
        "--nats",
        metavar="URL",
        action="append",
        help="a NATS server (default: nats://127.0.0.1:4222); again for a cluster",
    )
    p.add_argument(
        "--host", metavar="GLOB", default="*", help="only hosts whose ID matches (default: *)"
    )
    p.add_argument(
        "--snapshot", action="store_true", help="print every host's table first (from the bucket)"
    )
    p.add_argument("--json", action="store_true", help="one JSON frame per line, with `host`")
    add_filters(p, actions=True)
    p.add_argument("--count", type=positive_int, metavar="N", help="exit after N events")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS", help="exit after SECONDS")
    p.set_defaults(func=_cmd_fleet)


class FleetOutput:
    """Fleet frames to stdout, one line each, flushed at once."""

    def __init__(self, json: bool, stream: IO[bytes] | None = None) -> None:
        self.json = json
        self.stream = stream if stream is not None else sys.stdout.buffer
        self._header = False

    def _write(self, data: bytes) -> None:
        self.stream.write(data)
        self.stream.flush()

    def frame(self, f: Any) -> None:
        from ..fleet.consumer import fleet_json
        from ..model import End, Event, Resync, Snapshot
        from ..render import HEADER, event_line, mount_line

        if self.json:
            self._write(fleet_json(f) + b"\n")
            return
        if not self._header:
            self._header = True
            self._write(f"{'HOST':<{_W_HOST}} {HEADER}\n".encode())
        host = f"{f.host:<{_W_HOST}} "
        frame = f.frame
        if isinstance(frame, Event):
            self._write((host + event_line(frame)).encode("utf-8", "surrogateescape") + b"\n")
        elif isinstance(frame, Snapshot):
            rows = [host + mount_line(m, "present") for m in frame.mounts]
            if rows:
                self._write("\n".join(rows).encode("utf-8", "surrogateescape") + b"\n")
        elif isinstance(frame, Resync):
            print(f"amountd: {f.host}: resync ({frame.reason})", file=sys.stderr, flush=True)
        elif isinstance(frame, End):
            print(f"amountd: {f.host}: {frame.reason}", file=sys.stderr, flush=True)


def _cmd_fleet(args: argparse.Namespace) -> int:
    from .run import run, run_until_signal

    if args.backend != "asyncio":
        raise UsageError("amountd fleet runs on asyncio only (nats-py): drop --backend trio")
    flt = filter_of(args)
    out = FleetOutput(args.json)

    async def body() -> None:
        from ..fleet.consumer import DEFAULT_URL, watch
        from ..model import Event

        n = 0
        async with watch(
            args.nats or DEFAULT_URL, hosts=args.host, snapshot=args.snapshot, filter=flt
        ) as frames:
            async for f in frames:
                out.frame(f)
                if isinstance(f.frame, Event):
                    n += 1
                    if args.count is not None and n >= args.count:
                        return

    run(lambda: run_until_signal(body, args.timeout), args.backend)
    return 0

"""`amountd serve` and `amountd subscribe` (docs/protocol.md and the README).

Registered by cli.build_parser(); like the rest of the CLI, the heavy modules are
imported inside the commands so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from . import DEFAULT_SOCKET
from .errors import AmountdError, UsageError

__all__ = ["add_commands"]


def _count(text: str, *, minimum: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < minimum:
        raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {n}")
    return n


def _at_least_1(text: str) -> int:
    return _count(text, minimum=1)


def _at_least_0(text: str) -> int:
    return _count(text, minimum=0)


def _socket_path(text: str) -> str:
    """--unix PATH: a path, not an empty word (which would mean the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give the socket's path")
    if "\0" in text:
        raise argparse.ArgumentTypeError("a path cannot hold a NUL byte")
    return text


def _hostport(text: str) -> str:
    from .client import split_hostport

    try:
        split_hostport(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `serve` and `subscribe` to the `amountd` parser's subcommands."""
    from .cli import _add_filters, _add_source, _positive_int, _seconds, add_sweep_flags

    p = sub.add_parser(
        "serve",
        parents=[common],
        help="serve mount changes to subscribers over a Unix socket (and TCP)",
        description="Watch mount namespaces (one, several, or all) and serve their changes "
        "to subscribers. "
        "Subscribers speak first: one JSON line, e.g. "
        '{"type":"subscribe","version":1,"format":"json","snapshot":true}',
    )
    p.add_argument(
        "--unix",
        metavar="PATH",
        type=_socket_path,
        default=DEFAULT_SOCKET,
        help=f"Unix socket to listen on (default: {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--tcp",
        metavar="HOST:PORT",
        type=_hostport,
        help="also listen on TCP (an address other than loopback needs --token-file)",
    )
    p.add_argument(
        "--ns",
        metavar="PID|NSPATH",
        action="append",
        help="the mount namespace of process PID, or a namespace file (default: our own); "
        "give it again to watch several",
    )
    p.add_argument(
        "--all-namespaces",
        action="store_true",
        help="every mount namespace on the host, and new ones as they appear",
    )
    _add_source(p)
    add_sweep_flags(p, defaults=False)  # settings: the file's, else the defaults
    p.add_argument(
        "--queue",
        type=_at_least_1,
        default=1024,
        metavar="N",
        help="frames a subscriber may fall behind before it is resynced (default: 1024)",
    )
    p.add_argument(
        "--ring",
        type=_at_least_0,
        default=65536,
        metavar="N",
        help="recent events kept for resuming with `since` (default: 65536)",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help='TCP subscribers must send this file\'s content as "token"',
    )
    p.add_argument("--tls-cert", metavar="FILE", help="serve TCP over TLS with this certificate")
    p.add_argument("--tls-key", metavar="FILE", help="the TLS certificate's private key")
    p.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="give the Unix socket to this group (mode 0660: its members may subscribe)",
    )
    p.add_argument(
        "--unlimited-queue",
        action="store_true",
        help="fanotify: an unbounded kernel queue (real root only; a stalled reader pins memory)",
    )
    p.add_argument(
        "--publish",
        metavar="URL",
        action="append",
        help="also publish every event and the tables to NATS JetStream at URL "
        "(nats://HOST:PORT; again for a cluster; asyncio only); see [publish] in the settings",
    )
    p.add_argument(
        "--host-id",
        metavar="NAME",
        help="this host's name in NATS subjects and keys (default: the machine ID's first "
        "12 hex digits, else the host name; only [A-Za-z0-9_-] is kept)",
    )
    from .service_cli import add_serve_flags, add_status_command

    add_serve_flags(p)  # --config, --metrics, --log-*; every settings flag defaults to None
    p.set_defaults(func=_cmd_serve)

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
        type=_at_least_0,
        metavar="SEQ",
        help="resume after event SEQ (replayed if the server still holds it, else a resync)",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="when the connection drops, reconnect and resume where it stopped",
    )
    _add_filters(p, actions=True)
    p.add_argument("--count", type=_positive_int, metavar="N", help="exit after N events")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="exit after SECONDS")
    from .cli import add_output_flags

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
        type=_at_least_0,
        action="append",
        help="only this mount namespace (its ID, as the NS column shows); repeatable",
    )
    p.add_argument(
        "--pid",
        dest="pids",
        metavar="PID",
        type=_at_least_1,
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


def _cmd_serve(args: argparse.Namespace) -> int:
    # The settings file, the flags over it, logging, SIGHUP: amountd.service_cli.
    from .service_cli import cmd_serve

    return cmd_serve(args)


def add_server_address(p: argparse.ArgumentParser) -> None:
    """Where a client command finds the server (subscribe, status)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--unix",
        metavar="PATH",
        type=_socket_path,
        help=f"the server's Unix socket (default: {DEFAULT_SOCKET})",
    )
    where.add_argument(
        "--tcp", metavar="HOST:PORT", type=_hostport, help="the server's TCP address"
    )
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
    from .server import read_token

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


def _cmd_subscribe(args: argparse.Namespace) -> int:
    from .cli import Output, _filter, make_view, print_frames, run, run_until_signal
    from .columns import DEFAULT_WATCH

    url, token, ssl_context = server_address(args)
    flt = subscribe_scope(args, _filter(args))
    out = Output(args.json, view=None if args.json else make_view(args, DEFAULT_WATCH))

    async def body() -> None:
        from .client import connect

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

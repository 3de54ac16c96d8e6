"""`amountd serve`: its flags, the settings file under them, logging, and the run.

Registered by amountd.cli.build_parser(); the server (amountd.serve) and the other
heavy modules are imported inside the command so `--help` answers at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..constants import DEFAULT_CONFIG, DEFAULT_SOCKET
from ..errors import UsageError
from .args import (
    add_source,
    add_sweep_flags,
    at_least_0,
    at_least_1,
    hostport,
    seconds,
    socket_path,
)
from .constants import SETTINGS

__all__ = ["add_commands", "add_serve_flags", "cmd_serve"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text: str) -> int:
    """Bytes, with an optional K, M or G suffix (powers of 1,024): 32M."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"expected a size like 33554432 or 32M, got {text!r}")
    return int(number) * _UNITS[unit]


def _whole(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    """What bounds a hostile or faulty client (amountd.limits, amountd.snapcache)."""
    g = p.add_argument_group("limits (each bounds what a local client can make the server hold)")
    g.add_argument(
        "--max-connections",
        type=_whole,
        metavar="N",
        help="connections open at once, in all (default: 1024; lowered to the fd limit "
        "less 64); one more gets an `error` frame, code too-many",
    )
    g.add_argument(
        "--max-connections-per-uid",
        type=_whole,
        metavar="N",
        help="connections open at once from one uid other than root, or one remote "
        "address (default: 128)",
    )
    g.add_argument(
        "--stall-timeout",
        type=seconds,
        metavar="SECONDS",
        help="close a subscriber that reads nothing for SECONDS while frames wait for it, "
        "with an `error` frame, code stalled (default: 60)",
    )
    g.add_argument(
        "--snapshot-cache",
        type=_size,
        metavar="BYTES",
        help="encoded snapshots kept for reuse, at most (least recently used go first; "
        "K, M, G suffixes; default: 32M)",
    )


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `serve` to the `amountd` parser's subcommands."""
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
        type=socket_path,
        default=DEFAULT_SOCKET,
        help=f"Unix socket to listen on (default: {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--tcp",
        metavar="HOST:PORT",
        type=hostport,
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
    add_source(p)
    add_sweep_flags(p, defaults=False)  # settings: the file's, else the defaults
    p.add_argument(
        "--queue",
        type=at_least_1,
        default=1024,
        metavar="N",
        help="frames a subscriber may fall behind before it is resynced (default: 1024)",
    )
    p.add_argument(
        "--ring",
        type=at_least_0,
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
    add_serve_flags(p)  # --config, --metrics, --log-*; every settings flag defaults to None
    p.set_defaults(func=cmd_serve)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The settings flags of `serve`; and every settings flag defaults to None, so that
    a flag the user did not give leaves the file's value alone (config.merge)."""
    _add_limit_flags(p)
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"the settings file (default: {DEFAULT_CONFIG} when it exists); flags "
        "override it; SIGHUP re-reads it. An error in it exits with status 2",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (PORT alone: on "
        "127.0.0.1); off by default. An address other than loopback needs --metrics-public",
    )
    p.add_argument(
        "--metrics-public",
        action="store_true",
        default=None,
        help="allow --metrics on an address other machines can reach (anyone who can "
        "connect can read the counts and the version)",
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error", "critical"),
        type=str.lower,
        help="the least severe messages logged (default: info; debug with --debug)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="text (under systemd: journal priorities, no timestamps) or one JSON object "
        "a line (default: text)",
    )
    p.set_defaults(**{name: None for name in SETTINGS})


def cmd_serve(args: argparse.Namespace) -> int:
    import msgspec

    from ..config import Config, ConfigError, load_config, merge
    from ..logs import setup_logging
    from ..serve import Service, serve, serve_config
    from .run import run

    overrides: dict[str, Any] = {name: getattr(args, name) for name in SETTINGS}
    if overrides["log_level"] is None and args.debug:
        overrides["log_level"] = "debug"
    # --tcp HOST:0 (any free port, logged) is fine on the command line, which checked
    # it already; the file's stricter check would refuse it.
    tcp = overrides.pop("tcp")

    def settings() -> Config:
        """The file (read afresh) with the flags on top: at start, and on SIGHUP."""
        config = merge(load_config(args.config), overrides)
        if args.publish or args.host_id:  # --publish, --host-id: over [publish]
            config = msgspec.structs.replace(
                config,
                publish=msgspec.structs.replace(
                    config.publish,
                    urls=args.publish or config.publish.urls,
                    host_id=args.host_id or config.publish.host_id,
                ),
            )
        return config if tcp is None else msgspec.structs.replace(config, tcp=tcp)

    try:
        config = settings()
    except ConfigError as e:
        # Exit 2, like a bad flag: the daemon cannot run as configured, and retrying
        # will not help (a unit can say RestartPreventExitStatus=2).
        raise UsageError(str(e)) from None
    if config.publish.urls and args.backend != "asyncio":
        raise UsageError(
            "--publish needs the asyncio backend (nats-py runs on asyncio only): "
            "drop --backend trio"
        )
    setup_logging(config.log_level, config.log_format)
    service = Service(config, reload=settings)
    run(lambda: serve(serve_config(config), service), args.backend)
    return 0

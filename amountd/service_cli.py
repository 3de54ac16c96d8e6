"""`amountd serve`'s settings (file, flags, logging) and `amountd status`.

Registered by server_cli.add_commands(); like the rest of the CLI, the heavy modules
are imported inside the commands so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import UsageError

__all__ = ["add_serve_flags", "add_status_command", "cmd_serve"]

DEFAULT_CONFIG = "/etc/amountd/amountd.toml"  # = config.DEFAULT_CONFIG_PATH, not imported

_SETTINGS = (
    "unix",
    "socket_group",
    "tcp",
    "token_file",
    "tls_cert",
    "tls_key",
    "ns",
    "all_namespaces",
    "source",
    "queue",
    "ring",
    "unlimited_queue",
    "sweep_interval",
    "sweep_budget",
    "max_connections",
    "max_connections_per_uid",
    "stall_timeout",
    "snapshot_cache",
    "metrics",
    "metrics_public",
    "log_level",
    "log_format",
)
"""The serve flags that are also settings-file keys (amountd.config.Config)."""


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
    from .cli import _seconds

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
        type=_seconds,
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
    p.set_defaults(**{name: None for name in _SETTINGS})


def cmd_serve(args: argparse.Namespace) -> int:
    import msgspec

    from .cli import run
    from .config import Config, ConfigError, load_config, merge
    from .logs import setup_logging
    from .server import serve
    from .service import Service, serve_config

    overrides: dict[str, Any] = {name: getattr(args, name) for name in _SETTINGS}
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


# --- amountd status --------------------------------------------------------------------


def add_status_command(sub: Any, common: argparse.ArgumentParser) -> None:
    from .cli import _seconds
    from .server_cli import add_server_address

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
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up after SECONDS (default: 10)",
    )
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from .cli import run
    from .server_cli import server_address

    url, token, ssl_context = server_address(args)

    async def body() -> None:
        from .model import encode_json
        from .status import format_status, query_status

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

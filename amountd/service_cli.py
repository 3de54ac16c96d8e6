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
    "metrics",
    "log_level",
    "log_format",
)
"""The serve flags that are also settings-file keys (amountd.config.Config)."""


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The settings flags of `serve`; and every settings flag defaults to None, so that
    a flag the user did not give leaves the file's value alone (config.merge)."""
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
        "127.0.0.1); off by default",
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

        st = await query_status(url, token=token, ssl_context=ssl_context, timeout=args.timeout)
        if args.json:
            sys.stdout.buffer.write(encode_json(st) + b"\n")
        else:
            sys.stdout.write(format_status(st) + "\n")
        sys.stdout.flush()

    run(body, args.backend)
    return 0

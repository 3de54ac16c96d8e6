"""What `amountd serve` was asked to do, and the checks made before anything opens.

Its own module so that the daemon's parts (amountd.serve.daemon) and the server read the
same settings without importing each other."""

from __future__ import annotations

import msgspec

from ..client import is_loopback
from ..config import PublishConfig, parse_hostport
from ..constants import DEFAULT_SOCKET
from ..errors import UsageError
from ..limits import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_UID,
    DEFAULT_STALL_TIMEOUT,
)
from ..snapcache import DEFAULT_SNAPSHOT_CACHE
from ..sweep import SWEEP_BUDGET, SWEEP_INTERVAL

__all__ = ["ServeConfig", "check_config"]


class ServeConfig(msgspec.Struct, kw_only=True):
    """What `amountd serve` was asked to do (the CLI's flags, or a caller's values)."""

    unix: str | None = DEFAULT_SOCKET
    socket_mode: int = 0o660
    socket_group: str | None = None
    tcp: str | None = None
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    ns: str | None = None
    namespaces: list[str] | None = None
    """Several namespaces (PIDs or namespace files; `--ns` given more than once)."""
    all_namespaces: bool = False
    """Every mount namespace, and new ones as they appear."""
    source: str = "auto"
    queue: int = 1024
    ring: int = 65536
    unlimited_queue: bool = False
    sweep_interval: float = SWEEP_INTERVAL
    """Seconds between sweeps for propagation changes (fanotify, listmount)."""
    sweep_budget: float = SWEEP_BUDGET
    """The share of one CPU sweeps may take (fanotify, listmount)."""
    request_timeout: float = 10.0
    """A connection must send its request line within this many seconds."""
    drain_timeout: float = 2.0
    """On shutdown, how long subscribers get to receive `end` before being cut off."""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Connections open at once, in all (lowered to what the fd limit allows)."""
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
    """Connections open at once from one uid (or one address, for a remote peer)."""
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    """A subscriber that takes nothing for this long while frames wait is closed."""
    snapshot_cache: int = DEFAULT_SNAPSHOT_CACHE
    """Bytes of encoded snapshots kept for reuse."""
    publish: PublishConfig | None = None
    """`--publish`: every frame and the tables into NATS JetStream (amountd.fleet)."""


def check_config(config: ServeConfig) -> None:
    """Refuse, before opening anything, what cannot work or would be unsafe."""
    if config.unix is None and config.tcp is None:
        raise UsageError("nothing to listen on: give --unix PATH and/or --tcp HOST:PORT")
    if config.queue < 1:
        raise UsageError("--queue must be at least 1")
    if config.ring < 0:
        raise UsageError("--ring must not be negative")
    if config.max_connections < 1 or config.max_connections_per_uid < 1:
        raise UsageError("--max-connections and --max-connections-per-uid must be at least 1")
    if not config.stall_timeout > 0:
        raise UsageError("--stall-timeout must be more than 0 seconds")
    if config.snapshot_cache < 0:
        raise UsageError("--snapshot-cache must not be negative")
    if config.all_namespaces and (config.ns is not None or config.namespaces):
        raise UsageError("--ns and --all-namespaces exclude each other")
    if config.publish is not None and config.publish.urls:
        from ..fleet.publisher import check_publish

        check_publish(config.publish)
    if not 0 <= config.socket_mode <= 0o777:
        raise UsageError(f"bad socket mode {config.socket_mode:o}")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    if config.tcp is None:
        if config.tls_cert is not None:
            raise UsageError("--tls-cert/--tls-key apply to --tcp: give --tcp HOST:PORT too")
        if config.token_file is not None:
            raise UsageError(
                "--token-file applies to --tcp (the Unix socket is guarded by its mode and "
                "group): give --tcp HOST:PORT too"
            )
        return
    host, _ = parse_hostport(config.tcp, port_zero=True)
    if not is_loopback(host) and config.token_file is None:
        raise UsageError(
            f"--tcp {config.tcp} is reachable from other machines: give --token-file FILE "
            "(every subscriber must then send its token), or listen on 127.0.0.1"
        )

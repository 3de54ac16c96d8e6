"""The listeners `amountd serve` accepts subscribers on: the Unix socket, TCP, TLS over
TCP, and the sockets systemd passes (socket activation).

Opening and naming them only: what happens on a connection is amountd.serve.connection.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import ssl
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener

from ..client import is_loopback
from ..config import parse_hostport
from ..errors import AmountdError
from ..sockdir import bind_unix
from .config import ServeConfig

__all__ = [
    "Listener",
    "TLSServerListener",
    "bound_name",
    "group_id",
    "open_listeners",
    "passed_listeners",
    "remove_socket",
    "ssl_context",
]

log = logging.getLogger("amountd.server")  # the name the daemon's log lines have always had


def group_id(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise AmountdError(f"no group named {name!r} (--socket-group)") from None


def ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise AmountdError(f"cannot load the TLS certificate {cert} / key {key}: {e}") from None
    return ctx


def remove_socket(path: str, ino: int) -> None:
    """Remove the socket file if it is still ours (a newer server may have replaced it)."""
    try:
        if os.lstat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


class Listener(msgspec.Struct, kw_only=True):
    """One listening socket, its name for the logs and `status`, and the token its
    subscribers must send (TCP with --token-file; None for the Unix socket)."""

    name: str
    listener: Any
    token: str | None


class TLSServerListener(TLSListener):
    """anyio's TLS listener, with a failed handshake logged in one line."""

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: anyio.abc.AnyByteStream) -> None:
        """One log line, not a traceback: a failed handshake is the peer's problem."""
        await anyio.aclose_forcefully(stream)
        if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            raise exc
        log.info("TLS handshake failed: %s", exc or type(exc).__name__)


def bound_name(lst: Listener) -> str:
    """A listener as `status` shows it: TCP with the port it got (`--tcp HOST:0`)."""
    if not lst.name.startswith(("tcp:", "tls:")):
        return lst.name
    inner = getattr(lst.listener, "listener", lst.listener)  # TLS wraps the TCP one
    names = []
    for one in getattr(inner, "listeners", [inner]):  # a name with v4 and v6 addresses
        try:
            host, port = one.extra(anyio.abc.SocketAttribute.local_address)[:2]
        except (anyio.TypedAttributeLookupError, TypeError, ValueError):
            return lst.name
        names.append(f"{lst.name[:3]}://{f'[{host}]' if ':' in host else host}:{port}")
    return ", ".join(names) or lst.name


async def open_listeners(
    config: ServeConfig, token: str | None, ssl_ctx: ssl.SSLContext | None, gid: int | None
) -> tuple[list[Listener], tuple[str, int] | None]:
    listeners: list[Listener] = []
    unix: tuple[str, int] | None = None
    try:
        if config.unix is not None:
            # Its mode and group set before anyone can connect, in a directory no other
            # user can write (amountd.sockdir).
            sock, ino = bind_unix(config.unix, config.socket_mode, gid)
            unix = (config.unix, ino)
            unix_listener = await anyio.abc.SocketListener.from_socket(sock)
            listeners.append(
                Listener(name=f"unix:{config.unix}", listener=unix_listener, token=None)
            )
            log.info("listening on unix:%s (mode %o)", config.unix, config.socket_mode)
        if config.tcp is not None:
            host, port = parse_hostport(config.tcp, port_zero=True)
            try:
                tcp: Any = await anyio.create_tcp_listener(local_host=host, local_port=port)
            except OSError as e:
                raise AmountdError(f"cannot listen on {config.tcp}: {e.strerror or e}") from None
            scheme = "tls" if ssl_ctx is not None else "tcp"
            for sub in getattr(tcp, "listeners", [tcp]):
                addr = sub.extra(SocketAttribute.local_address)
                h, p = addr[0], addr[1]
                h = f"[{h}]" if ":" in h else h
                log.info(
                    "listening on %s://%s:%d%s", scheme, h, p, " (token required)" if token else ""
                )
            if ssl_ctx is not None:
                tcp = TLSServerListener(
                    tcp,
                    ssl_ctx,
                    standard_compatible=False,
                    handshake_timeout=config.request_timeout,
                )
            listeners.append(Listener(name=f"{scheme}:{config.tcp}", listener=tcp, token=token))
    except BaseException:
        for lst in listeners:
            await anyio.aclose_forcefully(lst.listener)
        if unix is not None:
            remove_socket(*unix)
        raise
    return listeners, unix


async def passed_listeners(
    socks: list[socket.socket],
    config: ServeConfig,
    token: str | None,
    ssl_ctx: ssl.SSLContext | None,
) -> list[Listener]:
    """The sockets systemd passed (amountd.socket), used as they are: their file, mode
    and group are the socket unit's (never unlinked or chmod-ed here). A TCP one gets
    the token and TLS that `--tcp` would."""
    out: list[Listener] = []
    for sock in socks:
        listener: Any = await anyio.abc.SocketListener.from_socket(sock)
        if sock.family == socket.AF_UNIX:
            where = sock.getsockname()
            name = f"unix:{os.fsdecode(where) if where else '?'}"
            out.append(Listener(name=name, listener=listener, token=None))
        else:
            host, port = sock.getsockname()[:2]
            if not is_loopback(host) and token is None:
                await anyio.aclose_forcefully(listener)
                raise AmountdError(
                    f"systemd passed a TCP socket on {host}:{port}, which other machines can "
                    "reach: set token_file (every subscriber must then send it), or listen "
                    "on 127.0.0.1"
                )
            scheme = "tls" if ssl_ctx is not None else "tcp"
            if ssl_ctx is not None:
                listener = TLSServerListener(
                    listener,
                    ssl_ctx,
                    standard_compatible=False,
                    handshake_timeout=config.request_timeout,
                )
            shown = f"[{host}]" if ":" in host else host
            name = f"{scheme}://{shown}:{port}"
            out.append(Listener(name=name, listener=listener, token=token))
        log.info("listening on %s (passed by systemd)", name)
    return out

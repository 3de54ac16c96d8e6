"""`amountd serve`: one source, one broker, and the listeners that subscribers connect to.

A thin shell around the pure parts: the protocol parses requests and encodes frames,
the broker numbers and fans out. Here: sockets, one task per connection, the pump that
moves the source's batches into the broker, and the shutdown.

- The broker takes snapshots from a table that must be as of the last published seq.
  The server keeps that table itself, applying each event just before publishing it (a
  consumer's invariant: every frame applied gives the kernel's table), so the pump can
  publish a big batch (a drained kernel queue: thousands of events) in slices and let
  the writers drain the subscribers' queues in between; otherwise one batch larger than
  a queue would resync even the fastest subscriber.
- A connection's failure is caught in its own task: it never touches the others, the
  source, or the listeners.
- Seqs start at the server's start time in microseconds, so they only grow across
  restarts: a client resuming with a seq from an earlier run always gets `resync` and a
  fresh `snapshot`, never another run's events under numbers it has already seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import logging
import os
import resource
import select
import signal
import socket
import ssl
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener, TLSStream

from .accept import resilient
from .access import scope_request, tcp_peer_uid
from .broker import Broker, Subscription
from .cgroups import ContainerLookup, container_of_pid
from .client import DEFAULT_SOCKET, STOPPING, is_loopback, split_hostport
from .config import PublishConfig
from .errors import AmountdError, UsageError
from .filter import Filter
from .interrupt import rearm
from .limits import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_UID,
    DEFAULT_STALL_TIMEOUT,
    Connections,
    Guesses,
    RateLog,
    effective_cap,
    raise_nofile,
)
from .model import End, Error, Event, Resync
from .protocol import (
    ProtocolError,
    Request,
    RequestReader,
    StatusRequest,
    check_token,
    encode_frame,
    error_frame,
    frame_json,
)
from .render import human_path
from .service import Service
from .snapcache import DEFAULT_SNAPSHOT_CACHE
from .sockdir import bind_unix, precheck
from .sources import Source
from .sources.multi import open_watch, source_label
from .sweep import SWEEP_BUDGET, SWEEP_INTERVAL, SweepSettings
from .table import MountTable, apply

__all__ = ["DEFAULT_SOCKET", "STOPPING", "ServeConfig", "check_config", "serve"]

log = logging.getLogger("amountd.server")

_READ = 65536
_HUP_CHECK = 1.0
"""Seconds between checks that a half-closed Unix peer has hung up completely."""
TOKEN_MIN = 16
"""The shortest token a server accepts (bytes, surrounding whitespace left out)."""
KEEPALIVE = (60, 10, 6)
"""TCP keepalive: idle seconds before the first probe, seconds between probes, probes."""
USER_TIMEOUT = 120.0
PROC_READERS = 8
"""Threads that may read /proc for connections at once: their fds come from the reserve
(amountd.limits.FD_RESERVE) that connections never get."""
REFUSING = 16
"""Over-cap connections told `too-many` at once; past that they are closed unanswered,
so the refusals cannot take the fds the reserve keeps."""
"""TCP_USER_TIMEOUT: seconds sent data may go unacknowledged before the peer is dropped."""


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
        from .fleet.publisher import check_publish

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
    host, _ = split_hostport(config.tcp)
    if not is_loopback(host) and config.token_file is None:
        raise UsageError(
            f"--tcp {config.tcp} is reachable from other machines: give --token-file FILE "
            "(every subscriber must then send its token), or listen on 127.0.0.1"
        )


def read_token(path: str, *, strict: bool = False) -> str:
    """The shared secret, from a file (surrounding whitespace ignored).

    `strict` (the server's own token): refuse a file that group or others may read, or
    a secret shorter than TOKEN_MIN bytes, which a local user could read or guess."""
    try:
        with open(path, "rb") as f:
            if strict:
                mode = os.fstat(f.fileno()).st_mode
                if mode & (stat.S_IRGRP | stat.S_IROTH):
                    raise AmountdError(
                        f"the token file {path} is readable by group or others (mode "
                        f"{stat.S_IMODE(mode):04o}): chmod 600 {path}"
                    )
            raw = f.read()
    except OSError as e:
        raise AmountdError(f"cannot read the token file {path}: {e.strerror or e}") from None
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise AmountdError(f"the token file {path} is not UTF-8 text") from None
    if not token:
        raise AmountdError(f"the token file {path} is empty: put a secret in it")
    if strict and len(token.encode()) < TOKEN_MIN:
        raise AmountdError(
            f"the token in {path} is {len(token.encode())} bytes: use at least {TOKEN_MIN} "
            f"(e.g. head -c 32 /dev/urandom | base64 > {path})"
        )
    return token


def _group_id(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise AmountdError(f"no group named {name!r} (--socket-group)") from None


def _ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise AmountdError(f"cannot load the TLS certificate {cert} / key {key}: {e}") from None
    return ctx


# --- the Unix socket -----------------------------------------------------------------


def _bind_unix(path: str, mode: int, gid: int | None) -> tuple[socket.socket, int]:
    """A listening socket at `path` with its mode and group set before anyone can connect,
    in a directory no other user can write (amountd.sockdir)."""
    return bind_unix(path, mode, gid)


def _remove_socket(path: str, ino: int) -> None:
    """Remove the socket file if it is still ours (a newer server may have replaced it)."""
    try:
        if os.lstat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


# --- connections ----------------------------------------------------------------------


class _Listener(msgspec.Struct, kw_only=True):
    name: str
    listener: Any
    token: str | None


class _Conn:
    __slots__ = ("key", "leaving", "peer", "scope", "subscribed")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.scope: anyio.CancelScope | None = None
        self.subscribed = False
        self.key: int | str | None = None
        """Whose connection it is, for the per-uid cap: a uid, or a remote address."""
        self.leaving = False
        """We are closing it: the end of its input is ours, not the peer's."""


class _Gone(Exception):
    """The peer closed before sending a request: nothing to answer."""


class _Stalled(Exception):
    """The subscriber took nothing for --stall-timeout while frames waited."""

    def __init__(self, rest: memoryview | None) -> None:
        super().__init__()
        self.rest = rest
        """What is left of the chunk being written, when that is known (else None)."""


def _peer_key(sock: socket.socket | None) -> int | str | None:
    """The uid behind a connection (Unix: SO_PEERCRED; loopback TCP: /proc/net/tcp), or a
    remote peer's address; None if unknown. Blocking (it may read /proc): in a thread."""
    if sock is None:
        return None
    try:
        if sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return int(struct.unpack("3i", creds)[1])
        host = str(sock.getpeername()[0])
    except OSError:
        return None
    if is_loopback(host):
        # Not found (or /proc unreadable: out of fds): one shared bucket, never a way
        # around the cap.
        return tcp_peer_uid(sock)
    return host


def _who(key: int | str | None) -> str:
    return "an unknown peer" if key is None else f"uid {key}" if isinstance(key, int) else key


def _tune_tcp(sock: socket.socket | None) -> None:
    """Keepalive and TCP_USER_TIMEOUT: a TCP peer that vanishes (its host gone, a cable
    pulled) is dropped within minutes, not kept for ever."""
    if sock is None or sock.family == socket.AF_UNIX:
        return
    idle, interval, count = KEEPALIVE
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(USER_TIMEOUT * 1000))


_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_ROOM_MAX = 4 * 1024 * 1024
"""Extra send buffer given to a stalled subscriber's last words, at most."""


def _make_room(sock: socket.socket | None, size: int) -> bool:
    """Grow the kernel's send buffer by `size` bytes (the rest of a frame and the
    `error`), so they are written at once though the peer reads nothing; the kernel
    delivers them if it ever reads, and frees them when it closes."""
    if sock is None or size > _ROOM_MAX:
        return False
    try:
        have = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, have + 2 * size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, have + 2 * size)
    except OSError:
        return False
    return True


def _raw_socket(stream: anyio.abc.ByteStream) -> socket.socket | None:
    try:
        sock: socket.socket = stream.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return None
    return sock


def _peer(stream: anyio.abc.ByteStream) -> str:
    """Who is on the other end: a Unix peer's pid and uid (SO_PEERCRED), a TCP address."""
    sock = _raw_socket(stream)
    if sock is None:
        return "?"
    try:
        if sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", creds)
            return f"unix pid={pid} uid={uid} gid={gid}"
        host, port = sock.getpeername()[:2]
        return f"tcp {host}:{port}"
    except OSError:
        return "?"


def _hung_up(sock: socket.socket) -> bool:
    """A Unix peer that closed (not just shut down its writing side) raises POLLHUP."""
    p = select.poll()
    p.register(sock.fileno(), 0)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


def _stop_reading(stream: anyio.abc.ByteStream) -> bool:
    """End a Unix stream's pending receive by shutting down our reading side, rather
    than by cancelling it: anyio's asyncio Unix stream, cancelled while the peer's
    bytes or EOF arrive, logs `Future.set_result ... InvalidStateError` (its reader
    callback fires on the cancelled future). False: cancel it instead."""
    sock = _raw_socket(stream)
    if sock is None or sock.family != socket.AF_UNIX:
        return False
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        return False
    return True


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _send_direct(sock: socket.socket, data: bytes, stall: float) -> None:
    """Write `data` to a non-blocking socket; raise _Stalled with what is left if the
    peer takes nothing for `stall` seconds."""
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            with anyio.move_on_after(stall) as timer:
                await anyio.wait_socket_writable(sock)
            if timer.cancelled_caught:
                raise _Stalled(view) from None
            continue
        view = view[n:]
    await anyio.lowlevel.checkpoint()  # a write that never waits is still a checkpoint


_GONE = frozenset({errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED})
"""What a socket says once its peer has gone (trio's shutdown() after a reset: ENOTCONN)."""


def _is_disconnect(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e) for e in exc.exceptions)
    if isinstance(exc, OSError) and exc.errno in _GONE:
        return True
    return isinstance(
        exc,
        (
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            anyio.EndOfStream,
            ConnectionError,
            ssl.SSLError,
            TimeoutError,
        ),
    )


def _describe(f: Filter) -> str:
    if f.is_empty:
        return ""
    parts = []
    if f.actions:
        parts.append("actions " + ",".join(f.actions))
    if f.fstypes:
        parts.append("types " + ",".join(f.fstypes))
    if f.under is not None:
        parts.append("under " + human_path(f.under))
    if f.namespaces is not None:
        parts.append("namespaces " + (",".join(map(str, f.namespaces)) or "none"))
    return ", " + ", ".join(parts)


class _TLSListener(TLSListener):
    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: anyio.abc.AnyByteStream) -> None:
        """One log line, not a traceback: a failed handshake is the peer's problem."""
        await anyio.aclose_forcefully(stream)
        if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            raise exc
        log.info("TLS handshake failed: %s", exc or type(exc).__name__)


class Server:
    """The listeners, the connections and the pump around one broker."""

    def __init__(
        self,
        config: ServeConfig,
        broker: Broker,
        table: MountTable,
        service: Service | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.table = table
        self.service = service if service is not None else Service()
        """systemd, SIGHUP, metrics, status (amountd.service)."""
        self.slice = max(1, min(256, config.queue // 4))
        self.conns: set[_Conn] = set()
        self._idle: anyio.Event | None = None
        self.failure: BaseException | None = None
        self.stop_reason = STOPPING
        self.socket_gid: int | None = None
        """The Unix socket's group: its members see every namespace (amountd.access)."""
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.limits = Connections(
            effective_cap(config.max_connections, nofile), config.max_connections_per_uid
        )
        """Connections open now, in all and per uid, and the caps (amountd.limits)."""
        self.refusals = RateLog(1.0)
        self.guesses = Guesses()
        self.too_many = 0
        """Connections refused for a cap (`too-many`)."""
        self.refusing = 0
        """Over-cap connections being told so now (each holds an fd meanwhile)."""
        self.proc_readers = anyio.CapacityLimiter(PROC_READERS)
        """Threads reading /proc for peers at once (each holds an fd or two)."""
        self.stalls = 0
        """Subscribers closed as `stalled`."""
        self.token_failures = 0

    # --- the source's side -------------------------------------------------------------

    async def pump(self, src: Source, done: anyio.CancelScope) -> None:
        """Batches -> broker, in slices, each frame applied to our table and published
        with no await in between (snapshots come from that table, as of the last seq)."""
        # The server-wide filter and the counts (metrics, status) ride on publish.
        publish = self.service.publisher(self.broker.publish)
        stamp = self.service.stamp
        table = self.table
        step = self.slice
        containers = ContainerLookup()  # what runs in each namespace, for resync/end
        for ns in getattr(src, "namespaces", [src.ns]):
            containers.hint(ns.ns_id, ns.pid)
            if ns.ns_id is not None:
                containers(ns.ns_id)
        try:
            async with aclosing(src.changes()) as batches:
                async for batch in batches:
                    stamp()
                    for i, item in enumerate(batch, 1):
                        frame = item
                        if type(frame) is Event:
                            apply(table, frame)
                        elif isinstance(frame, (Resync, End)) and frame.ns_id is not None:
                            frame = msgspec.structs.replace(
                                frame, container=containers(frame.ns_id)
                            )
                        publish(frame)
                        if isinstance(frame, End) and frame.ns_id is None:  # else: one of several
                            log.info("the namespace ended (%s): stopping", frame.reason)
                            done.cancel()
                            return
                        if i % step == 0:
                            # Let the writers drain the queues: one batch can hold more
                            # events than a subscriber's queue (the kernel's whole queue).
                            await anyio.lowlevel.checkpoint()
            log.error("the source stopped without an end: stopping")
            self.stop_reason = f"{STOPPING}: the source stopped"
        except Exception as e:
            if isinstance(e, AmountdError):
                log.error("the source failed: %s", e)  # noqa: TRY400 (its message says it all)
            else:
                log.exception("the source failed")
            self.failure = e
            self.stop_reason = f"{STOPPING}: {e}"
        done.cancel()

    async def signals(
        self,
        done: anyio.CancelScope,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with anyio.open_signal_receiver(
                signal.SIGINT, signal.SIGTERM, signal.SIGHUP
            ) as received:
                task_status.started()  # handled from here on (SIGHUP's default would kill us)
                async for signum in received:
                    if signum == signal.SIGHUP:
                        self.service.reload(self)
                        continue
                    self.service.stopping(f"{signal.Signals(signum).name}: stopping")
                    log.info("%s: stopping", signal.Signals(signum).name)
                    done.cancel()
                    return
        finally:
            rearm()  # the command's: a second signal while draining still exits 0

    # --- the subscribers' side ---------------------------------------------------------

    def handler(self, lst: _Listener) -> Callable[[anyio.abc.ByteStream], Any]:
        async def handle(stream: anyio.abc.ByteStream) -> None:
            await self.handle(stream, lst)

        return handle

    async def handle(self, stream: anyio.abc.ByteStream, lst: _Listener) -> None:
        """One connection, start to end; whatever happens stays in here."""
        conn = _Conn(_peer(stream))
        limits = self.limits
        admitted = limits.open()
        joined = False
        self.conns.add(conn)
        try:
            with anyio.CancelScope() as scope:
                conn.scope = scope
                sock = _raw_socket(stream)
                _tune_tcp(sock)
                if admitted:
                    if sock is not None and sock.family == socket.AF_UNIX:
                        conn.key = _peer_key(sock)  # SO_PEERCRED: no /proc to read
                    else:
                        conn.key = await anyio.to_thread.run_sync(
                            _peer_key, sock, limiter=self.proc_readers
                        )
                    joined = limits.join(conn.key)
                try:
                    if not admitted:
                        raise ProtocolError(
                            "too-many",
                            f"the server has {limits.limit} connections open, its limit: "
                            "try again later",
                        )
                    if not joined:
                        raise ProtocolError(
                            "too-many",
                            f"{_who(conn.key)} has {limits.per_key} connections open, the "
                            "limit per uid: close some first",
                        )
                except ProtocolError as e:
                    self.too_many += 1
                    self._log_refusal(conn, lst, e)
                    if self.refusing >= REFUSING:
                        return  # closed unanswered (finally): no fds to spare
                    self.refusing += 1
                    try:
                        await self._refuse(stream, e, linger=0.5)
                    finally:
                        self.refusing -= 1
                    return
                await self._serve(stream, lst, conn)
        except _Gone:
            log.debug("%s: closed without a request", conn.peer)
        except Exception as e:
            if _is_disconnect(e):
                log.debug("%s: went away (%s)", conn.peer, e)
            else:
                log.exception("%s: connection failed", conn.peer)
        finally:
            if joined:
                limits.leave(conn.key)
            if admitted:
                limits.close()
            self.conns.discard(conn)
            if not self.conns and self._idle is not None:
                self._idle.set()
            await anyio.aclose_forcefully(stream)

    def _log_refusal(self, conn: _Conn, lst: _Listener, e: ProtocolError) -> None:
        """At most one line a second per uid (or remote address), with the count of the
        refusals held back since its last line."""
        held = self.refusals.allow(conn.key, time.monotonic())
        if held is None:
            return
        more = f" ({held} more refusals of {_who(conn.key)} since the last line)" if held else ""
        log.info("%s (%s): refused: %s: %s%s", conn.peer, lst.name, e.code, e.message, more)

    async def _serve(self, stream: anyio.abc.ByteStream, lst: _Listener, conn: _Conn) -> None:
        try:
            req = await self._read_request(stream)
            try:
                check_token(req, lst.token)
            except ProtocolError:
                # Slowed per peer: each recent failure adds to the wait (bounded); the
                # connection is held meanwhile, so the per-uid cap bounds the guess rate.
                self.token_failures += 1
                await anyio.sleep(self.guesses.failed(conn.key, time.monotonic()))
                raise
            if isinstance(req, StatusRequest):  # one `status` frame, then close
                log.debug("%s (%s): status", conn.peer, lst.name)
                await self.service.answer_status(
                    self, stream, req, _raw_socket(stream), token=lst.token is not None
                )
                return
            try:
                req = await anyio.to_thread.run_sync(  # who may see what; it may scan /proc
                    functools.partial(
                        scope_request,
                        req,
                        _raw_socket(stream),
                        token=lst.token is not None,
                        socket_gid=self.socket_gid,
                    ),
                    limiter=self.proc_readers,
                )
            except OSError as e:  # /proc unreadable: out of fds or memory, for now
                raise ProtocolError(
                    "unavailable",
                    f"cannot tell what you may see now ({e.strerror or e}): try again later",
                ) from None
        except ProtocolError as e:
            self._log_refusal(conn, lst, e)
            await self._refuse(stream, e)
            return
        sub = self.broker.subscribe(req)
        conn.subscribed = True
        self.service.subscribed(sub, conn.peer)
        log.info(
            "%s (%s): subscriber %d: %s%s%s%s",
            conn.peer,
            lst.name,
            sub.id,
            req.format,
            ", snapshot" if req.snapshot else "",
            f", since {req.since}" if req.since is not None else "",
            _describe(req.filter),
        )
        stalled: _Stalled | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_peer, stream, sub, conn)
                try:
                    await self._forward(stream, sub)
                except _Stalled as e:
                    stalled = e
                conn.leaving = True
                if not _stop_reading(stream):
                    tg.cancel_scope.cancel()
            if stalled is not None:
                await self._stalled(stream, sub, stalled.rest)
        finally:
            sub.close()
            st = sub.stats()
            log.info(
                "subscriber %d left: %d frames delivered, %d drops", sub.id, st.delivered, st.drops
            )

    async def _read_request(self, stream: anyio.abc.ByteStream) -> Request:
        reader = RequestReader()
        timeout = self.config.request_timeout
        try:
            with anyio.fail_after(timeout):
                while True:
                    try:
                        data = await stream.receive(_READ)
                    except anyio.EndOfStream:
                        req = reader.feed_eof()
                        if req is None:
                            raise _Gone from None
                        return req
                    req = reader.feed(data)
                    if req is not None:
                        return req
        except TimeoutError:
            raise ProtocolError(
                "timeout", f"no request line within {timeout:g} s: send one subscribe line"
            ) from None

    async def _refuse(
        self, stream: anyio.abc.ByteStream, exc: ProtocolError, linger: float = 1.0
    ) -> None:
        """Send the `error` frame (always JSON: the format may be what was wrong), then
        close in a way that lets the peer read it: shut down our side and swallow what it
        still sends (for `linger` seconds at most), so closing does not reset the
        connection under the frame."""
        with anyio.move_on_after(1.0 + linger):
            try:
                await stream.send(frame_json(error_frame(exc)))
                with contextlib.suppress(NotImplementedError):
                    await stream.send_eof()
                swallowed = 0
                with anyio.move_on_after(linger):
                    while swallowed < 1 << 20:
                        swallowed += len(await stream.receive(_READ))
            except Exception as e:
                if not _is_disconnect(e):
                    raise

    async def _forward(self, stream: anyio.abc.ByteStream, sub: Subscription) -> None:
        """Chunks from the subscription to the peer; raises _Stalled when the peer takes
        nothing for --stall-timeout while a chunk waits.

        A plain socket is written here, without a buffer in between, so that on a stall
        what is left of the chunk is known and the `error` can follow a whole frame. An
        asyncio TCP stream (a transport: it buffers every write whole) and TLS go
        through the stream."""
        stall = self.config.stall_timeout
        sock = _raw_socket(stream)
        direct = (
            sock is not None
            and not isinstance(stream, TLSStream)
            and (sock.family == socket.AF_UNIX or not _on_asyncio())
        )
        while True:
            try:
                chunk = await sub.next_chunk()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return
            if direct:
                assert sock is not None
                await _send_direct(sock, chunk, stall)
            else:
                with anyio.move_on_after(stall) as timer:
                    await stream.send(chunk)
                if timer.cancelled_caught:
                    raise _Stalled(None)
            del chunk  # an idle subscriber must not pin its last chunk (maybe a snapshot)

    async def _stalled(
        self, stream: anyio.abc.ByteStream, sub: Subscription, rest: memoryview | None
    ) -> None:
        """Close a stalled subscriber with `error` (code `stalled`) after the frame it
        was in the middle of, where that can be done without waiting for it."""
        self.stalls += 1
        sub.close()
        timeout = self.config.stall_timeout
        log.info("subscriber %d: stalled (took nothing for %g s): closing", sub.id, timeout)
        err = encode_frame(
            sub.format,
            Error(
                code="stalled",
                message=f"nothing was read for {timeout:g} s while frames waited: "
                "read faster, or subscribe with a narrower filter",
            ),
        )
        sock = _raw_socket(stream)
        with anyio.move_on_after(1.0):
            try:
                if rest is not None and sock is not None:  # written here: no buffer between
                    if _make_room(sock, len(rest) + len(err)):
                        await _send_direct(sock, bytes(rest) + err, 1.0)
                    return
                if _on_asyncio() and not isinstance(stream, TLSStream):
                    # A transport holds every write whole: the error follows a whole frame.
                    _make_room(sock, 1 << 20)
                    await stream.send(err)
                    await stream.send_eof()
                    while True:  # until it is flushed into the kernel's bigger buffer
                        await stream.receive(_READ)
            except Exception as e:
                if not _is_disconnect(e) and not isinstance(e, _Stalled):
                    raise

    async def _watch_peer(
        self, stream: anyio.abc.ByteStream, sub: Subscription, conn: _Conn
    ) -> None:
        """Notice a peer that leaves while nothing is being sent, and close its
        subscription. A half-close over a Unix socket (socat after its input ends) is
        not leaving."""
        try:
            while True:
                await stream.receive(_READ)  # nothing more is expected: ignored
        except anyio.EndOfStream:
            if conn.leaving:
                return  # our own shutdown (_stop_reading)
            # TCP cannot tell a half-close from a close: a TCP peer that shuts down its
            # sending side is taken as gone (else, never written to, it would hold its fd
            # in CLOSE-WAIT for good). A Unix peer says POLLHUP once it has closed.
            sock = _raw_socket(stream)
            if sock is not None and sock.family == socket.AF_UNIX:
                while not _hung_up(sock):  # noqa: ASYNC110 (the kernel has no event for it)
                    await anyio.sleep(_HUP_CHECK)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError):
            pass
        sub.close()

    # --- running -----------------------------------------------------------------------

    async def run(
        self,
        src: Source,
        listeners: list[_Listener],
        close_listeners: Callable[[], Awaitable[None]],
    ) -> None:
        async with anyio.create_task_group() as conns:
            async with anyio.create_task_group() as main:
                await main.start(self.signals, main.cancel_scope)
                main.start_soon(self.pump, src, main.cancel_scope)
                for lst in listeners:
                    # One that outlives EMFILE, ENFILE, ENOMEM (amountd.accept).
                    listener = resilient(lst.listener, lst.name)
                    main.start_soon(listener.serve, self.handler(lst), conns)
                self.service.ready()  # READY=1: listening, and the signals are ours
            # No more publishing. Close the listeners (and remove the socket file) first,
            # so a reconnecting client finds nobody rather than a backlog closed under it,
            # then say goodbye and drain.
            await close_listeners()
            if not self.broker.ended:
                self.broker.publish(End(reason=self.stop_reason))
            for conn in list(self.conns):
                if not conn.subscribed and conn.scope is not None:
                    conn.scope.cancel()
            self._idle = anyio.Event()
            if self.conns:
                with anyio.move_on_after(self.config.drain_timeout):
                    await self._idle.wait()
            if self.conns:
                log.info("%d subscribers did not take `end` in time: closing", len(self.conns))
            conns.cancel_scope.cancel()


async def _open_listeners(
    config: ServeConfig, token: str | None, ssl_ctx: ssl.SSLContext | None, gid: int | None
) -> tuple[list[_Listener], tuple[str, int] | None]:
    listeners: list[_Listener] = []
    unix: tuple[str, int] | None = None
    try:
        if config.unix is not None:
            sock, ino = _bind_unix(config.unix, config.socket_mode, gid)
            unix = (config.unix, ino)
            unix_listener = await anyio.abc.SocketListener.from_socket(sock)
            listeners.append(
                _Listener(name=f"unix:{config.unix}", listener=unix_listener, token=None)
            )
            log.info("listening on unix:%s (mode %o)", config.unix, config.socket_mode)
        if config.tcp is not None:
            host, port = split_hostport(config.tcp)
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
                tcp = _TLSListener(
                    tcp,
                    ssl_ctx,
                    standard_compatible=False,
                    handshake_timeout=config.request_timeout,
                )
            listeners.append(_Listener(name=f"{scheme}:{config.tcp}", listener=tcp, token=token))
    except BaseException:
        for lst in listeners:
            await anyio.aclose_forcefully(lst.listener)
        if unix is not None:
            _remove_socket(*unix)
        raise
    return listeners, unix


async def _passed_listeners(
    socks: list[socket.socket],
    config: ServeConfig,
    token: str | None,
    ssl_ctx: ssl.SSLContext | None,
) -> list[_Listener]:
    """The sockets systemd passed (amountd.socket), used as they are: their file, mode
    and group are the socket unit's (never unlinked or chmod-ed here). A TCP one gets
    the token and TLS that `--tcp` would."""
    out: list[_Listener] = []
    for sock in socks:
        listener: Any = await anyio.abc.SocketListener.from_socket(sock)
        if sock.family == socket.AF_UNIX:
            where = sock.getsockname()
            name = f"unix:{os.fsdecode(where) if where else '?'}"
            out.append(_Listener(name=name, listener=listener, token=None))
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
                listener = _TLSListener(
                    listener,
                    ssl_ctx,
                    standard_compatible=False,
                    handshake_timeout=config.request_timeout,
                )
            shown = f"[{host}]" if ":" in host else host
            name = f"{scheme}://{shown}:{port}"
            out.append(_Listener(name=name, listener=listener, token=token))
        log.info("listening on %s (passed by systemd)", name)
    return out


async def serve(config: ServeConfig, service: Service | None = None) -> None:
    """Serve one namespace until SIGINT/SIGTERM or until the namespace ends (several:
    until every one of a fixed list has ended; all of them: until stopped).

    `service` brings the daemon's side (settings to reload on SIGHUP, metrics; systemd
    is spoken to either way). Raises AmountdError (UsageError for bad settings) for what
    stops it from starting, and the source's failure if it fails while serving (after
    telling subscribers).
    """
    check_config(config)
    nofile = raise_nofile()  # 1,024 (a unit without LimitNOFILE=) is few for a server
    cap = effective_cap(config.max_connections, nofile)
    if cap < config.max_connections:
        log.warning(
            "at most %d connections (not %d): the fd limit is %d; raise LimitNOFILE=",
            cap,
            config.max_connections,
            nofile,
        )
    service = service if service is not None else Service()
    passed = service.passed_sockets()  # systemd's (socket activation): used, not bound
    if config.unix is not None and all(s.family != socket.AF_UNIX for s in passed):
        precheck(config.unix)  # its directory, a stale socket: before opening anything
    token = read_token(config.token_file, strict=True) if config.token_file is not None else None
    ssl_ctx = (
        _ssl_context(config.tls_cert, config.tls_key)
        if config.tls_cert is not None and config.tls_key is not None
        else None
    )
    gid = _group_id(config.socket_group) if config.socket_group is not None else None
    async with open_watch(
        config.source,
        ns=config.ns,
        namespaces=config.namespaces,
        all_namespaces=config.all_namespaces,
        unlimited_queue=config.unlimited_queue,
        sweep=SweepSettings(config.sweep_interval, config.sweep_budget),
    ) as src:
        # The table as of the last published frame: the source's own is as of the end
        # of its latest batch, which the pump publishes in slices.
        table = src.table.copy()
        broker = Broker(
            ring=config.ring,
            queue=config.queue,
            table=service.view(table.mounts),  # the server-wide filter applied
            ns_id=src.ns_id,
            source=source_label(src),
            reason=src.reason,
            snapshot_cache=config.snapshot_cache,
            seq=time.time_ns() // 1000,  # above every earlier run's (see the module doc)
            container=container_of_pid(src.ns.pid),  # one namespace (else ns is nowhere)
        )
        server = Server(config, broker, table, service)
        listeners, unix = await _open_listeners(service.unpassed(config), token, ssl_ctx, gid)
        listeners += await _passed_listeners(passed, config, token, ssl_ctx)
        if unix is not None:
            server.socket_gid = gid if gid is not None else os.lstat(unix[0]).st_gid
        elif passed:
            server.socket_gid = service.passed_unix_gid()
        log.info("serving on %s", ", ".join(lst.name for lst in listeners))

        async def close_listeners() -> None:
            if unix is not None:
                _remove_socket(*unix)
            with anyio.CancelScope(shield=True):
                for lst in listeners:
                    await anyio.aclose_forcefully(lst.listener)

        try:
            # The metrics listener and the watchdog; READY=1 now that all is open.
            async with service.running(server, src, listeners):
                await server.run(src, listeners, close_listeners)
        finally:
            await close_listeners()
        stats = broker.stats()
        log.info("stopped after %d frames", stats.published)
    if server.failure is not None:
        raise server.failure

"""One subscriber's connection, start to end: admission under the limits, the request
line and its token, a `status` answer or a subscription, the chunks forwarded to the
peer, a stalled or vanished peer noticed, and the close.

A connection's failure is caught in its own task: it never touches the others, the
source, or the listeners (amountd.serve.listeners accepts; amountd.serve.server runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import resource
import select
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSStream

from ..access import scope_request, tcp_peer_uid
from ..broker import Broker, Subscription
from ..client import is_loopback
from ..limits import Connections, Guesses, RateLog, effective_cap
from ..model import Error
from ..protocol import (
    ProtocolError,
    Request,
    RequestReader,
    StatusRequest,
    check_token,
    encode_frame,
    error_frame,
    frame_json,
)
from ..render import describe_filter
from .config import ServeConfig
from .daemon import Service
from .listeners import Listener

__all__ = ["AnswerStatus", "Subscribers"]

log = logging.getLogger("amountd.server")  # the name the daemon's log lines have always had

AnswerStatus = Callable[
    [anyio.abc.ByteStream, StatusRequest, socket.socket | None, bool], Awaitable[None]
]
"""Answers a `status` request (stream, request, raw socket, token given): the daemon's
(amountd.serve.daemon.Service.answer_status, bound to the server)."""

_READ = 65536
_HUP_CHECK = 1.0
"""Seconds between checks that a half-closed Unix peer has hung up completely."""
KEEPALIVE = (60, 10, 6)
"""TCP keepalive: idle seconds before the first probe, seconds between probes, probes."""
USER_TIMEOUT = 120.0
"""TCP_USER_TIMEOUT: seconds sent data may go unacknowledged before the peer is dropped."""
PROC_READERS = 8
"""Threads that may read /proc for connections at once: their fds come from the reserve
(amountd.limits.FD_RESERVE) that connections never get."""
REFUSING = 16
"""Over-cap connections told `too-many` at once; past that they are closed unanswered,
so the refusals cannot take the fds the reserve keeps."""


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


class Subscribers:
    """The subscribers' side of one server: every connection, from accept to close,
    within the limits (amountd.limits), and the counts `status` and the metrics show."""

    def __init__(
        self,
        config: ServeConfig,
        broker: Broker,
        service: Service,
        answer_status: AnswerStatus,
    ) -> None:
        self.config = config
        self.broker = broker
        self.service = service
        self._answer_status = answer_status
        self.conns: set[_Conn] = set()
        self._idle: anyio.Event | None = None
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

    async def drain(self, timeout: float) -> None:
        """After the last frame (`end`) is published: drop the connections that never
        subscribed, and give the subscribers `timeout` seconds to take what is queued."""
        for conn in list(self.conns):
            if not conn.subscribed and conn.scope is not None:
                conn.scope.cancel()
        self._idle = anyio.Event()
        if self.conns:
            with anyio.move_on_after(timeout):
                await self._idle.wait()
        if self.conns:
            log.info("%d subscribers did not take `end` in time: closing", len(self.conns))

    def handler(self, lst: Listener) -> Callable[[anyio.abc.ByteStream], Any]:
        async def handle(stream: anyio.abc.ByteStream) -> None:
            await self.handle(stream, lst)

        return handle

    async def handle(self, stream: anyio.abc.ByteStream, lst: Listener) -> None:
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

    def _log_refusal(self, conn: _Conn, lst: Listener, e: ProtocolError) -> None:
        """At most one line a second per uid (or remote address), with the count of the
        refusals held back since its last line."""
        held = self.refusals.allow(conn.key, time.monotonic())
        if held is None:
            return
        more = f" ({held} more refusals of {_who(conn.key)} since the last line)" if held else ""
        log.info("%s (%s): refused: %s: %s%s", conn.peer, lst.name, e.code, e.message, more)

    async def _serve(self, stream: anyio.abc.ByteStream, lst: Listener, conn: _Conn) -> None:
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
                await self._answer_status(stream, req, _raw_socket(stream), lst.token is not None)
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
            describe_filter(req.filter),
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

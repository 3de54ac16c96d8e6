"""The async client of `amountd serve`: `connect()`, on whichever loop calls it (anyio).

    async with amountd.connect("unix:/run/amountd/amountd.sock", snapshot=True) as frames:
        async for frame in frames:
            table = apply_frame(table, frame)

A background task reads the socket and decodes frames into a bounded memory stream, so
the iterator is cancel-safe (a timeout around `anext` loses nothing) and a consumer that
falls behind pushes back on the socket; the server then resyncs it rather than waiting.

With `reconnect=True` a dropped connection (or a server that says it is stopping) is
reopened with `since` = the last seq seen: the server replays what was missed from its
ring, or sends `resync` and a fresh `snapshot` (always so after a restart: a server run
numbers its frames above every earlier run's), so a consumer's table survives it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import ssl
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import anyio
import anyio.abc
import msgspec
from anyio.abc import SocketAttribute
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .config import parse_hostport
from .constants import DEFAULT_SOCKET, STOPPING
from .errors import AmountdError, UsageError
from .filter import Filter
from .model import End, Error, Event, Frame, Resync, Snapshot
from .protocol import Format, FrameReader, ProtocolError, SubscribeRequest, encode_request
from .sockdir import peer_problem, server_uid_of
from .stream import FrameStream, lone_exception
from .table import Follower

__all__ = [
    "DEFAULT_SOCKET",
    "STOPPING",
    "ClientError",
    "ClientStream",
    "Endpoint",
    "connect",
    "is_loopback",
    "open_stream",
    "parse_url",
]

log = logging.getLogger("amountd.client")

CONNECT_TIMEOUT = 10.0
_READ = 65536


class ClientError(AmountdError):
    """The connection failed, dropped, or the server answered with an `error` frame
    (`code` is then the frame's code: bad-request, too-large, forbidden, ...)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


# --- addresses (pure) ------------------------------------------------------------------


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where a server listens: a Unix socket path, or a TCP host and port (TLS or not)."""

    kind: Literal["unix", "tcp", "tls"]
    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.kind}://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    """True only for addresses nobody else can reach (`localhost`, 127/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_url(url: str) -> Endpoint:
    """`unix:/path` (or `unix:///path`), `tcp://host:port`, `tls://host:port`."""
    if url.startswith("unix:"):
        path = url[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise UsageError(f"no socket path in {url!r}: write unix:/path/to/amountd.sock")
        return Endpoint(kind="unix", path=path)
    for kind in ("tcp", "tls"):
        prefix = f"{kind}://"
        if url.startswith(prefix):
            host, port = parse_hostport(url[len(prefix) :].rstrip("/"), default_host=None)
            return Endpoint(kind="tcp" if kind == "tcp" else "tls", host=host, port=port)
    raise UsageError(
        f"cannot use {url!r}: write unix:/path/to/amountd.sock, tcp://HOST:PORT or tls://HOST:PORT"
    )


# --- connecting ------------------------------------------------------------------------


async def open_stream(
    ep: Endpoint, ssl_context: ssl.SSLContext | None, server_uid: int | None = None
) -> anyio.abc.ByteStream:
    """A connected stream, or ClientError saying what to do. A Unix socket's server
    must run as root, as us, or as `server_uid` (amountd.sockdir.peer_problem)."""
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            if ep.kind == "unix":
                assert ep.path is not None
                stream = await anyio.connect_unix(ep.path)
                try:
                    _check_server_uid(ep, stream, server_uid)
                except BaseException:
                    await anyio.aclose_forcefully(stream)
                    raise
                return stream
            assert ep.host is not None and ep.port is not None
            if ep.kind == "tls":
                ctx = ssl_context if ssl_context is not None else ssl.create_default_context()
                return await anyio.connect_tcp(
                    ep.host,
                    ep.port,
                    ssl_context=ctx,
                    tls_hostname=ep.host,
                    tls_standard_compatible=False,
                )
            return await anyio.connect_tcp(ep.host, ep.port)
    except TimeoutError:
        raise ClientError(f"timed out connecting to {ep}") from None
    except ssl.SSLError as e:
        raise ClientError(f"TLS with {ep} failed: {e.reason or e}") from None
    except FileNotFoundError:
        raise ClientError(f"is `amountd serve` running? no socket at {ep.path}") from None
    except ConnectionRefusedError:
        if ep.kind == "unix":
            assert ep.path is not None
            if not _is_socket(ep.path):
                raise ClientError(
                    f"{ep.path} is not a socket: give the server's socket with --unix"
                ) from None
            raise ClientError(
                f"is `amountd serve` running? nothing listens on {ep.path} (a stale socket)"
            ) from None
        raise ClientError(
            f"is `amountd serve --tcp` running? {ep.host}:{ep.port} refused the connection"
        ) from None
    except PermissionError:
        raise ClientError(
            f"permission denied on {ep.path}: run as root, or as a member of the socket's "
            "group (amountd serve --socket-group GROUP)"
        ) from None
    except OSError as e:
        raise ClientError(f"cannot connect to {ep}: {e.strerror or e}") from None


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return True  # cannot tell: say what connect() said


def _check_server_uid(ep: Endpoint, stream: anyio.abc.ByteStream, server_uid: int | None) -> None:
    sock = stream.extra(SocketAttribute.raw_socket)
    try:
        uid = server_uid_of(sock)
    except OSError as e:
        raise ClientError(f"cannot tell who serves {ep.path}: {e.strerror or e}") from None
    why = peer_problem(uid, os.geteuid(), server_uid)
    if why is not None:
        raise ClientError(f"refusing {ep.path}: {why}", "untrusted-server")


async def _open_and_request(
    ep: Endpoint,
    ssl_context: ssl.SSLContext | None,
    req: SubscribeRequest,
    server_uid: int | None = None,
) -> anyio.abc.ByteStream:
    stream = await open_stream(ep, ssl_context, server_uid)
    try:
        await stream.send(encode_request(req))
    except BaseException as e:
        await anyio.aclose_forcefully(stream)
        if isinstance(e, Exception):
            raise ClientError(f"the connection to {ep} dropped at once: {e}") from None
        raise
    return stream


# --- the stream the consumer reads -------------------------------------------------------


class ClientStream(FrameStream):
    """The frames of a subscription: an async iterator that a timeout or cancellation
    can interrupt without losing a frame. A failure (an `error` frame, a dropped
    connection that could not be reopened) is raised as ClientError after the frames
    that came before it."""

    def __init__(self, url: str, receive: MemoryObjectReceiveStream[Frame]) -> None:
        super().__init__(receive)
        self.url = url
        self.last_seq: int | None = None
        """The seq of the last event, resync or snapshot received (what `since` resumes from)."""
        self.reconnects = 0


def _answer_format(asked: Format, first: bytes) -> Format:
    """The server refuses a request with an `error` frame in JSON whatever was asked (the
    format may be what was wrong). A msgpack answer starts with a length below 256 MiB,
    so its first byte is never `{`."""
    return "json" if first[:1] == b"{" else asked


def _why(e: BaseException) -> str:
    """anyio's BrokenResourceError says nothing; the OSError behind it does."""
    cause = e.__cause__ if e.__cause__ is not None else e.__context__
    if isinstance(e, anyio.BrokenResourceError) and cause is not None:
        e = cause
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


class _Dropped(Exception):
    """The connection ended without `end`; `stopping` holds the server's `end` when it
    said it was stopping."""

    def __init__(self, why: str, stopping: End | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.stopping = stopping


_DROPS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError)


class _Client:
    def __init__(
        self,
        url: str,
        ep: Endpoint,
        request: SubscribeRequest,
        *,
        reconnect: bool,
        hide_snapshot: bool,
        ssl_context: ssl.SSLContext | None,
        retry_for: float | None,
        out: ClientStream,
        server_uid: int | None = None,
        follower: Follower | None = None,
    ) -> None:
        self.url = url
        self.ep = ep
        self.request = request
        self.reconnect = reconnect
        self.hide_snapshot = hide_snapshot
        self.ssl_context = ssl_context
        self.retry_for = retry_for
        self.server_uid = server_uid
        self.out = out
        self.follower = follower
        self.stopping: End | None = None
        """The `end` of a server that said it was stopping, until another one answers:
        if none does, it ends the stream."""
        self.down_since: float | None = None
        """Since when no connection has brought data (None while one does)."""
        self.delay = 0.05
        self.ended: set[int] = set()
        """Namespaces whose `end` was handed on: a resume may bring it again (the server
        cannot tell whether the `end` after the last seq we saw reached us)."""

    async def run(self, conn: anyio.abc.ByteStream, send: MemoryObjectSendStream[Frame]) -> None:
        async with send:
            try:
                await self._run(conn, send)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as e:  # handed to the consumer, raised at its next anext()
                self.out.error = e

    async def _run(self, conn: anyio.abc.ByteStream, send: MemoryObjectSendStream[Frame]) -> None:
        while True:
            try:
                await self._session(conn, send)
                return  # `end` was forwarded
            except _Dropped as d:
                if not self.reconnect:
                    raise ClientError(f"lost the connection to {self.url}: {d.why}") from None
                log.info("connection to %s lost (%s); reconnecting", self.url, d.why)
                if d.stopping is not None:
                    self.stopping = d.stopping
                conn_or_none = await self._reconnect(d)
                if conn_or_none is None:
                    assert self.stopping is not None
                    await send.send(self.stopping)
                    return
                conn = conn_or_none
                self.out.reconnects += 1

    async def _session(
        self, conn: anyio.abc.ByteStream, send: MemoryObjectSendStream[Frame]
    ) -> None:
        reader: FrameReader | None = None
        out = self.out
        try:
            while True:
                try:
                    data = await conn.receive(_READ)
                except anyio.EndOfStream:
                    if reader is not None:
                        reader.feed_eof()
                    raise _Dropped("the server closed the connection") from None
                if reader is None:
                    reader = FrameReader(_answer_format(self.request.format, data))
                    self.stopping = None  # a server answers
                    self.down_since = None
                for got in reader.feed(data):
                    frame = got
                    if isinstance(frame, (Event, Resync)):
                        out.last_seq = frame.seq
                        if self.follower is not None and isinstance(frame, Event):
                            self.follower.feed(frame, 0.0)
                    elif isinstance(frame, Snapshot):
                        out.last_seq = frame.seq
                        if self.follower is not None:
                            fresh = self.follower.feed(frame, time.time())
                            if fresh != [frame]:  # the difference from what we held
                                for ev in fresh:
                                    await send.send(ev)
                                continue
                        if self.hide_snapshot:
                            # Asked for only to learn where to resume from.
                            self.hide_snapshot = False
                            continue
                    elif isinstance(frame, Error):
                        raise ClientError(
                            f"the server refused: {frame.message} ({frame.code})", frame.code
                        )
                    elif isinstance(frame, End):
                        if frame.ns_id is not None:  # one namespace of several
                            if frame.ns_id in self.ended:
                                continue
                            self.ended.add(frame.ns_id)
                        else:
                            if self.reconnect and frame.reason.startswith(STOPPING):
                                raise _Dropped(frame.reason, stopping=frame)
                            await send.send(frame)
                            return
                    try:
                        send.send_nowait(frame)  # the socket read was the checkpoint
                    except anyio.WouldBlock:
                        await send.send(frame)
        except ProtocolError as e:
            if e.code == "bad-frame" and "closed inside a frame" in e.message:
                raise _Dropped(e.message) from None
            raise ClientError(f"{self.url} sent something that is not a frame: {e}") from None
        except _DROPS as e:
            raise _Dropped(_why(e)) from None
        finally:
            await anyio.aclose_forcefully(conn)

    def _resume_request(self) -> SubscribeRequest:
        last = self.out.last_seq
        if last is None:  # nothing numbered came yet: ask again as at first
            return self.request
        return msgspec.structs.replace(self.request, snapshot=False, since=last)

    async def _reconnect(self, dropped: _Dropped) -> anyio.abc.ByteStream | None:
        """A new connection with `since`; None if the server stopped for good; raises
        ClientError once `retry_for` has passed without a server that answers.

        The backoff and the deadline run from the last connection that brought data, so
        a server that accepts and hangs up at once is not hammered."""
        now = anyio.current_time()
        wait = self.down_since is not None  # the last try got a connection but no answer
        if self.down_since is None:
            self.down_since = now
            self.delay = 0.05
        failure: str = dropped.why
        while True:
            if wait:
                down = now - self.down_since
                if self.retry_for is not None and down + self.delay > self.retry_for:
                    if self.stopping is not None:
                        return None
                    raise ClientError(
                        f"lost the connection to {self.url} and could not reconnect "
                        f"within {self.retry_for:g} s: {failure}"
                    )
                log.debug("reconnecting to %s in %.2f s (%s)", self.url, self.delay, failure)
                await anyio.sleep(self.delay * random.uniform(0.75, 1.25))
                self.delay = min(self.delay * 2, 2.0)
            wait = True
            try:
                return await _open_and_request(
                    self.ep, self.ssl_context, self._resume_request(), self.server_uid
                )
            except ClientError as e:
                failure = str(e)
            now = anyio.current_time()


@asynccontextmanager
async def connect(
    url: str,
    *,
    snapshot: bool = False,
    since: int | None = None,
    filter: Filter | None = None,
    format: Format = "msgpack",
    reconnect: bool = False,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    buffer: int = 1024,
    retry_for: float | None = 60.0,
    server_uid: int | None = None,
    keep_table: bool = False,
) -> AsyncIterator[ClientStream]:
    """Subscribe to an `amountd serve` at `url` (`unix:/path`, `tcp://host:port`,
    `tls://host:port`).

    The stream is `snapshot` (if asked), `ready`, then `event`/`resync` frames, and `end`
    when the namespace ends or the server stops. `since`: resume after that seq. With
    `reconnect=True` a dropped connection is reopened (backoff up to 2 s, for at most
    `retry_for` seconds; None: forever) and the stream goes on after a new `ready`, with
    the missed events or `resync` + `snapshot`. Connection failures raise ClientError
    here; later failures and `error` frames raise it from the iterator.

    A Unix socket's server must run as root or as our own uid (a user who could replace
    the socket could otherwise feed us any table): `server_uid` trusts one more uid.
    Another raises ClientError with code `untrusted-server`.
    """
    ep = parse_url(url)
    if format not in ("json", "msgpack"):
        raise UsageError(f"format must be 'json' or 'msgpack', not {format!r}")
    # With reconnect and no seq to start from, ask for a snapshot just to learn the seq
    # the subscription starts at (the consumer does not see it): resuming needs one.
    hide = (reconnect or keep_table) and not snapshot and since is None
    req = SubscribeRequest(
        format=format,
        snapshot=snapshot or hide,
        since=since,
        filter=filter if filter is not None else Filter(),
        token=token,
    )
    conn = await _open_and_request(ep, ssl_context, req, server_uid)
    send, receive = anyio.create_memory_object_stream[Frame](buffer)
    stream = ClientStream(url, receive)
    stream.last_seq = since
    client = _Client(
        url,
        ep,
        req,
        reconnect=reconnect,
        hide_snapshot=hide,
        ssl_context=ssl_context,
        retry_for=retry_for,
        out=stream,
        server_uid=server_uid,
        follower=Follower() if keep_table else None,
    )
    with lone_exception():  # the reader task hands its failure to the stream
        async with receive, anyio.create_task_group() as tg:
            tg.start_soon(client.run, conn, send)
            yield stream
            tg.cancel_scope.cancel()

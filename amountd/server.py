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

import contextlib
import functools
import grp
import logging
import os
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
from anyio.streams.tls import TLSListener

from .access import scope_request
from .broker import Broker, Subscription
from .cgroups import ContainerLookup, container_of_pid
from .client import DEFAULT_SOCKET, STOPPING, is_loopback, split_hostport
from .errors import AmountdError, UsageError
from .filter import Filter
from .model import End, Event, Resync
from .protocol import (
    ProtocolError,
    Request,
    RequestReader,
    StatusRequest,
    check_token,
    error_frame,
    frame_json,
)
from .render import human_path
from .service import Service
from .sources import Source
from .sources.multi import open_watch, source_label
from .table import MountTable, apply

__all__ = ["DEFAULT_SOCKET", "STOPPING", "ServeConfig", "check_config", "serve"]

log = logging.getLogger("amountd.server")

_READ = 65536
_HUP_CHECK = 1.0
"""Seconds between checks that a half-closed Unix peer has hung up completely."""


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
    request_timeout: float = 10.0
    """A connection must send its request line within this many seconds."""
    drain_timeout: float = 2.0
    """On shutdown, how long subscribers get to receive `end` before being cut off."""


def check_config(config: ServeConfig) -> None:
    """Refuse, before opening anything, what cannot work or would be unsafe."""
    if config.unix is None and config.tcp is None:
        raise UsageError("nothing to listen on: give --unix PATH and/or --tcp HOST:PORT")
    if config.queue < 1:
        raise UsageError("--queue must be at least 1")
    if config.ring < 0:
        raise UsageError("--ring must not be negative")
    if config.all_namespaces and (config.ns is not None or config.namespaces):
        raise UsageError("--ns and --all-namespaces exclude each other")
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


def read_token(path: str) -> str:
    """The shared secret, from a file (surrounding whitespace ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise AmountdError(f"cannot read the token file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise AmountdError(f"the token file {path} is not UTF-8 text") from None
    if not token:
        raise AmountdError(f"the token file {path} is empty: put a secret in it")
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


def _check_stale(path: str) -> None:
    """A socket nobody listens on is replaced; a live server or another file is not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AmountdError(f"{path} exists and is not a socket: remove it or choose another --unix")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("replacing the stale socket %s", path)
        return
    except OSError:
        return  # cannot tell (e.g. a full backlog); binding will say
    finally:
        probe.close()
    raise AmountdError(
        f"another server is listening on {path}: stop it first, or choose another --unix"
    )


def _bind_unix(path: str, mode: int, gid: int | None) -> tuple[socket.socket, int]:
    """A listening socket at `path` with its mode and group set before anyone can connect:
    it is made under a temporary name and renamed into place (replacing a stale one)."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as e:
        raise AmountdError(f"cannot create {directory}: {e.strerror or e}") from None
    _check_stale(path)
    tmp = os.path.join(directory, f".amountd-{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, mode)
        if gid is not None:
            os.chown(tmp, -1, gid)
        sock.listen(4096)
        os.rename(tmp, path)
        ino = os.lstat(path).st_ino
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise AmountdError(f"cannot listen on {path}: {e.strerror or e}") from None
    return sock, ino


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
    __slots__ = ("peer", "scope", "subscribed")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.scope: anyio.CancelScope | None = None
        self.subscribed = False


class _Gone(Exception):
    """The peer closed before sending a request: nothing to answer."""


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


def _is_disconnect(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e) for e in exc.exceptions)
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
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as received:
            task_status.started()  # handled from here on (SIGHUP's default would kill us)
            async for signum in received:
                if signum == signal.SIGHUP:
                    self.service.reload(self)
                    continue
                self.service.stopping(f"{signal.Signals(signum).name}: stopping")
                log.info("%s: stopping", signal.Signals(signum).name)
                done.cancel()
                return

    # --- the subscribers' side ---------------------------------------------------------

    def handler(self, lst: _Listener) -> Callable[[anyio.abc.ByteStream], Any]:
        async def handle(stream: anyio.abc.ByteStream) -> None:
            await self.handle(stream, lst)

        return handle

    async def handle(self, stream: anyio.abc.ByteStream, lst: _Listener) -> None:
        """One connection, start to end; whatever happens stays in here."""
        conn = _Conn(_peer(stream))
        self.conns.add(conn)
        try:
            with anyio.CancelScope() as scope:
                conn.scope = scope
                await self._serve(stream, lst, conn)
        except _Gone:
            log.debug("%s: closed without a request", conn.peer)
        except Exception as e:
            if _is_disconnect(e):
                log.debug("%s: went away (%s)", conn.peer, e)
            else:
                log.exception("%s: connection failed", conn.peer)
        finally:
            self.conns.discard(conn)
            if not self.conns and self._idle is not None:
                self._idle.set()
            await anyio.aclose_forcefully(stream)

    async def _serve(self, stream: anyio.abc.ByteStream, lst: _Listener, conn: _Conn) -> None:
        try:
            req = await self._read_request(stream)
            check_token(req, lst.token)
            if isinstance(req, StatusRequest):  # one `status` frame, then close
                log.debug("%s (%s): status", conn.peer, lst.name)
                await self.service.answer_status(
                    self, stream, req, _raw_socket(stream), token=lst.token is not None
                )
                return
            req = await anyio.to_thread.run_sync(  # who may see what; it may scan /proc
                functools.partial(
                    scope_request,
                    req,
                    _raw_socket(stream),
                    token=lst.token is not None,
                    socket_gid=self.socket_gid,
                )
            )
        except ProtocolError as e:
            log.info("%s (%s): refused: %s: %s", conn.peer, lst.name, e.code, e.message)
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
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_peer, stream, sub)
                await self._forward(stream, sub)
                tg.cancel_scope.cancel()
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

    async def _refuse(self, stream: anyio.abc.ByteStream, exc: ProtocolError) -> None:
        """Send the `error` frame (always JSON: the format may be what was wrong), then
        close in a way that lets the peer read it: shut down our side and swallow what it
        still sends, so closing does not reset the connection under the frame."""
        with anyio.move_on_after(2.0):
            try:
                await stream.send(frame_json(error_frame(exc)))
                with contextlib.suppress(NotImplementedError):
                    await stream.send_eof()
                swallowed = 0
                with anyio.move_on_after(1.0):
                    while swallowed < 1 << 20:
                        swallowed += len(await stream.receive(_READ))
            except Exception as e:
                if not _is_disconnect(e):
                    raise

    async def _forward(self, stream: anyio.abc.ByteStream, sub: Subscription) -> None:
        while True:
            try:
                chunk = await sub.next_chunk()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return
            await stream.send(chunk)
            del chunk  # an idle subscriber must not pin its last chunk (maybe a snapshot)

    async def _watch_peer(self, stream: anyio.abc.ByteStream, sub: Subscription) -> None:
        """Notice a peer that leaves while nothing is being sent, and close its
        subscription. A half-close (socat after its input ends) is not leaving."""
        try:
            while True:
                await stream.receive(_READ)  # nothing more is expected: ignored
        except anyio.EndOfStream:
            sock = _raw_socket(stream)
            if sock is None or sock.family != socket.AF_UNIX:
                return  # a TCP peer that left is noticed when the next write fails
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
                    main.start_soon(lst.listener.serve, self.handler(lst), conns)
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
    service = service if service is not None else Service()
    passed = service.passed_sockets()  # systemd's (socket activation): used, not bound
    token = read_token(config.token_file) if config.token_file is not None else None
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
            container=container_of_pid(src.ns.pid),  # one namespace (else ns is nowhere)
        )
        # Numbers from this run start above every earlier run's (see the module doc).
        # The broker has no parameter for it yet; nothing is published or subscribed.
        broker._seq = time.time_ns() // 1000
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

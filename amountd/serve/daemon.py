"""The daemon around `amountd serve`: systemd, SIGHUP reloads, metrics, and `status`.

amountd.serve.server moves frames; this is what a sysadmin's host expects of a service, kept
apart so the server stays a thin shell and each part can be read on its own:

- systemd (amountd.serve.systemd): the sockets of `amountd.socket` are used instead of
  binding; READY=1 once the source is armed, the first table is built and the
  listeners are open; WATCHDOG=1 from a task on the event loop (a wedged loop misses
  it, which is the point); STOPPING=1 first thing on SIGTERM/SIGINT.
- Signals: SIGTERM/SIGINT stop the server; SIGHUP re-reads the settings: the live
  keys (amountd.config.LIVE_KEYS) apply at once, the others are logged as needing a
  restart. No subscriber is dropped: a new
  server-wide `[filter]` is published as `resync` and the events that turn the old
  view into the new one, like any other resync.
- Metrics are counted in `publish`, the one call per published frame: a type test
  and, with `--metrics` only, a dict update and a histogram bucket.
- `status` requests are answered with one `Status` frame built from the broker and
  the source, for peers that may see everything (root, the socket's group, a token).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from time import perf_counter
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.abc
import anyio.to_thread

from ..access import sees_all, tcp_peer_uid, unix_peer
from ..broker import Broker, Subscription
from ..config import Config, apply_live, parse_hostport, reloadable
from ..errors import AmountdError
from ..filter import Filter, filter_event, filter_mounts
from ..interrupt import rearm
from ..limits import Connections
from ..logs import setup_logging
from ..metrics import Counter, Gauge, Metrics, serve_metrics
from ..model import End, Event, Mount, NamespaceStatus, Resync, Status, SubscriberStatus
from ..protocol import ProtocolError, StatusRequest, encode_frame
from ..render import describe_filter
from ..sources import Source
from ..table import MountTable, diff
from . import systemd
from .config import ServeConfig

if TYPE_CHECKING:
    from ..fleet.publisher import Publisher

__all__ = ["Served", "ServerMetrics", "Service", "serve_config"]

log = logging.getLogger("amountd.service")

Change = Event | Resync | End

STATUS_EVERY = 10.0
"""Seconds between STATUS= updates under systemd when there is no watchdog to ride on."""


class Served(Protocol):
    """What the daemon's parts read of the server they run around: public and read-only,
    so this module needs no import of the server (amountd.serve.server.Server is one)."""

    @property
    def config(self) -> ServeConfig: ...
    @property
    def broker(self) -> Broker: ...
    @property
    def table(self) -> MountTable: ...
    @property
    def limits(self) -> Connections: ...
    @property
    def socket_gid(self) -> int | None:
        """The Unix socket's group: its members see every namespace."""

    @property
    def stop_reason(self) -> str: ...
    @property
    def too_many(self) -> int: ...
    @property
    def stalls(self) -> int: ...
    @property
    def token_failures(self) -> int: ...


def serve_config(settings: Config) -> ServeConfig:
    """The server's settings from the file-and-flags ones (what `amountd serve` runs)."""
    ns = list(settings.ns)
    return ServeConfig(
        unix=settings.unix,
        socket_mode=settings.socket_mode,
        socket_group=settings.socket_group,
        tcp=settings.tcp,
        token_file=settings.token_file,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        ns=ns[0] if len(ns) == 1 else None,
        namespaces=ns if len(ns) > 1 else None,
        all_namespaces=settings.all_namespaces,
        source=settings.source,
        queue=settings.queue,
        ring=settings.ring,
        unlimited_queue=settings.unlimited_queue,
        sweep_interval=settings.sweep_interval,
        sweep_budget=settings.sweep_budget,
        max_connections=settings.max_connections,
        max_connections_per_uid=settings.max_connections_per_uid,
        stall_timeout=settings.stall_timeout,
        snapshot_cache=settings.snapshot_cache,
        publish=settings.publish if settings.publish.urls else None,
    )


class ServerMetrics(Metrics):
    """amountd's metrics, with what the broker already counts read at scrape time."""

    def __init__(self) -> None:
        super().__init__()
        self.broker: Broker | None = None

    def attach(self, broker: Broker) -> None:
        self.broker = broker
        self.subscribers.fn = lambda: broker.subscribers
        self.queue_drops.fn = lambda: broker.stats().drops
        self.snapshot_cache_bytes.fn = lambda: broker.snapshot_cache.bytes

    def attach_server(self, server: Served) -> None:
        """The connection counts and limits the server keeps (amountd.limits)."""
        self.attach(server.broker)
        limits = server.limits
        self.connections.fn = lambda: limits.total
        self.connection_limit.fn = lambda: limits.limit
        self.connection_limit_per_uid.fn = lambda: limits.per_key
        self.refused_too_many.fn = lambda: server.too_many
        self.stalled.fn = lambda: server.stalls
        self.token_failures.fn = lambda: server.token_failures

    def attach_publisher(self, publisher: Publisher) -> None:
        """The NATS publisher's state, backlog and counts, read at scrape time."""
        from ..fleet.publisher import State

        self.add(
            Gauge(
                "amountd_publisher_up",
                "1 while the NATS publisher is live (connected and reconciled).",
                fn=lambda: int(publisher.state is State.LIVE),
            )
        )
        self.add(
            Gauge(
                "amountd_publisher_backlog",
                "Frames the NATS publisher has not had acknowledged yet (queued or sent).",
                fn=lambda: publisher.backlog,
            )
        )
        self.add(
            Counter(
                "amountd_publisher_frames_total",
                "Frames published to the AMOUNTD stream.",
                fn=lambda: publisher.published,
            )
        )
        self.add(
            Counter(
                "amountd_publisher_reconciles_total",
                "Times the publisher made this host's keys equal its table (start, lag, "
                "reconnect).",
                fn=lambda: publisher.reconciles,
            )
        )
        self.add(
            Counter(
                "amountd_publisher_errors_total",
                "NATS failures seen by the publisher (each is followed by a reconcile).",
                fn=lambda: publisher.errors,
            )
        )

    def render(self) -> bytes:
        if self.broker is not None:
            drops = self.broker.stats().drops
            if drops:  # each dropped queue is one `lagged` resync for its subscriber
                self.resyncs.values[("lagged",)] = drops
        return super().render()


class Service:
    """The plumbing around one Server; every part is a cheap no-op when unused (no
    systemd, no settings file, no `--metrics`), so `serve()` always has one."""

    def __init__(
        self,
        settings: Config | None = None,
        *,
        reload: Callable[[], Config] | None = None,
    ) -> None:
        self.settings = settings
        """The settings running now (the live keys of the latest reload included)."""
        self._reload = reload
        self.scope: Filter | None = settings.filter.to_filter() if settings else None
        """The server-wide filter (`[filter]`): no subscriber sees beyond it."""
        self.metrics_addr: tuple[str, int] | None = None
        self.metrics: ServerMetrics | None = None
        if settings is not None and settings.metrics is not None:
            self.metrics_addr = parse_hostport(settings.metrics)
            self.metrics = ServerMetrics()
        self.started = time.monotonic()
        self.events = 0
        self.resyncs = 0
        self.overflows = 0
        self.listeners: list[str] = []
        self._t0 = perf_counter()
        self._peers: weakref.WeakKeyDictionary[Subscription, str] = weakref.WeakKeyDictionary()
        self._passed: list[socket.socket] = []
        self._stopping = False
        self._server: Served | None = None
        self._src: Source | None = None
        self.nats: Publisher | None = None
        """The NATS publisher (`--publish`; amountd.fleet), while serving."""

    # --- the hot path -------------------------------------------------------------------

    def stamp(self) -> None:
        """A batch came from the source: its events' processing time counts from here."""
        self._t0 = perf_counter()

    def publisher(self, publish: Callable[[Change], int]) -> Callable[[Change], None]:
        """`publish` with the server-wide filter applied and the frame counted."""

        def pub(frame: Change) -> None:
            if type(frame) is Event:
                scope = self.scope
                if scope is not None:
                    seen = filter_event(scope, frame)
                    if seen is None:
                        return
                    frame = seen
                publish(frame)
                self.events += 1
                m = self.metrics
                if m is not None:
                    m.events.inc(frame.action, frame.via)
                    m.event_seconds.observe(perf_counter() - self._t0)
                return
            publish(frame)
            if type(frame) is Resync:
                self._count_resync(frame.reason)

        return pub

    def _count_resync(self, reason: str) -> None:
        self.resyncs += 1
        if reason == "overflow":
            self.overflows += 1
        m = self.metrics
        if m is not None:
            m.resyncs.inc(reason)
            if reason == "overflow":
                m.overflows.inc()

    def view(self, mounts: Callable[[], Iterable[Mount]]) -> Callable[[], Iterable[Mount]]:
        """The table as subscribers may see it (for the broker's snapshots)."""

        def seen() -> Iterable[Mount]:
            scope = self.scope
            return mounts() if scope is None else filter_mounts(scope, mounts())

        return seen

    def subscribed(self, sub: Subscription, peer: str) -> None:
        """A subscriber joined: remember who it is (for `status`)."""
        self._peers[sub] = peer
        if sub.resync_reason == "since-expired" and self.metrics is not None:
            self.metrics.resyncs.inc("since-expired")

    # --- systemd ------------------------------------------------------------------------

    def passed_sockets(self) -> list[socket.socket]:
        """The listening sockets systemd passed us (socket activation), once."""
        if not self._passed:
            self._passed = [systemd.socket_for(fd) for fd, _ in systemd.listen_fds()]
        return self._passed

    def unpassed(self, config: ServeConfig) -> ServeConfig:
        """`config` without what a passed socket replaces: a Unix socket from systemd
        stands for `unix`, a TCP one for `tcp` (neither is bound, chmod-ed or removed)."""
        import msgspec

        families = {s.family for s in self._passed}
        unix = None if socket.AF_UNIX in families else config.unix
        tcp = None if families & {socket.AF_INET, socket.AF_INET6} else config.tcp
        if (unix, tcp) == (config.unix, config.tcp):
            return config
        for flag, was, now in (("unix", config.unix, unix), ("tcp", config.tcp, tcp)):
            if was is not None and now is None:
                log.info("not binding %s %s: systemd passed a socket for it", flag, was)
        return msgspec.structs.replace(config, unix=unix, tcp=tcp)

    def passed_unix_gid(self) -> int | None:
        """The group of the first passed Unix socket's file (SocketGroup=): its members
        see every namespace, as with a socket we bind."""
        for s in self._passed:
            if s.family == socket.AF_UNIX:
                path = s.getsockname()
                if isinstance(path, str) and path:
                    with contextlib.suppress(OSError):
                        return os.stat(path).st_gid
        return None

    def status_line(self) -> str:
        """The one line `systemctl status` shows (STATUS=)."""
        server, src = self._server, self._src
        if server is None or src is None:
            return "starting"
        from ..sources.multi import source_label

        spaces = self._namespaces(server, src)
        mounts = sum(n.mounts for n in spaces)
        subs = server.broker.subscribers
        return (
            f"{source_label(src)}: {len(spaces)} namespace{'s' if len(spaces) != 1 else ''}, "
            f"{mounts} mounts; {subs} subscriber{'s' if subs != 1 else ''}; "
            f"{self.events} events; seq {server.broker.last_seq}"
        )

    def ready(self) -> None:
        """READY=1 (Type=notify), with the counts: the source is armed, the first table
        built, the listeners open and the signals handled."""
        systemd.ready(self.status_line())

    def stopping(self, why: str) -> None:
        """Tell systemd we are going (once)."""
        if not self._stopping:
            self._stopping = True
            systemd.stopping(why)

    async def _heartbeat(self, every: float, watchdog: bool) -> None:
        while True:
            await anyio.sleep(every)
            status = " ".join(self.status_line().split())
            systemd.notify(f"WATCHDOG=1\nSTATUS={status}" if watchdog else f"STATUS={status}")

    @contextlib.asynccontextmanager
    async def running(
        self, server: Served, src: Source, listeners: Iterable[str]
    ) -> AsyncIterator[None]:
        """Around Server.run: the metrics listener and the watchdog; STOPPING=1 on the
        way out (if the signal handler has not sent it). Server.run calls `ready()`."""
        self._server, self._src = server, src
        self.listeners = list(listeners)
        async with anyio.create_task_group() as tg:
            if self.metrics is not None and self.metrics_addr is not None:
                self.metrics.attach_server(server)
                host, port = self.metrics_addr
                try:
                    bound = await tg.start(serve_metrics, self.metrics, host, port)
                except OSError as e:
                    raise AmountdError(
                        f"cannot serve metrics on {host}:{port}: {e.strerror or e}"
                    ) from None
                shown = f"[{host}]" if ":" in host else host
                log.info("metrics on http://%s:%d/metrics", shown, bound)
            interval = systemd.watchdog_interval()
            if interval is not None:
                tg.start_soon(self._heartbeat, interval / 2, True)
            elif os.environ.get("NOTIFY_SOCKET"):
                tg.start_soon(self._heartbeat, STATUS_EVERY, False)
            publish = server.config.publish
            if publish is not None and publish.urls:
                from ..fleet.publisher import Publisher

                # Before the pump starts: the broker's seq is still the server's start.
                self.nats = Publisher(
                    publish,
                    server.broker,
                    started=server.broker.last_seq,
                    subscribed=self.subscribed,
                )
                if self.metrics is not None:
                    self.metrics.attach_publisher(self.nats)
                tg.start_soon(self._publish, self.nats)
            try:
                yield
            finally:
                self.stopping(f"stopping: {server.stop_reason}")
                if self.nats is not None:  # it publishes the server's `end`, if it can
                    with anyio.move_on_after(server.config.drain_timeout, shield=True):
                        await self.nats.finished.wait()
                tg.cancel_scope.cancel()

    @staticmethod
    async def _publish(publisher: Publisher) -> None:
        """The publisher's failure is logged, never the server's: NATS is optional."""
        try:
            await publisher.run()
        except Exception:
            log.exception("the NATS publisher failed; serving goes on without it")

    # --- signals and SIGHUP -------------------------------------------------------------

    async def signals(
        self,
        server: Served,
        done: anyio.CancelScope,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """SIGTERM/SIGINT cancel `done` (the server's main scope); SIGHUP reloads."""
        try:
            with anyio.open_signal_receiver(
                signal.SIGINT, signal.SIGTERM, signal.SIGHUP
            ) as received:
                task_status.started()  # handled from here on (SIGHUP's default would kill us)
                async for signum in received:
                    if signum == signal.SIGHUP:
                        await self.reload(server)
                        continue
                    self.stopping(f"{signal.Signals(signum).name}: stopping")
                    log.info("%s: stopping", signal.Signals(signum).name)
                    done.cancel()
                    return
        finally:
            rearm()  # the command's: a second signal while draining still exits 0

    async def reload(self, server: Served) -> None:
        """Re-read the settings; apply the live keys, log the others. Never raises: a
        bad file keeps the running settings."""
        old = self.settings
        if self._reload is None or old is None:
            log.info("SIGHUP: no settings to re-read (serve() was called without any)")
            return
        try:
            new = self._reload()
        except AmountdError as e:
            log.error("SIGHUP: %s; the running settings are kept", e)  # noqa: TRY400
            return
        now, later = reloadable(old, new)
        if later:
            log.warning(
                "SIGHUP: %s changed; that needs a restart (systemctl restart amountd)",
                ", ".join(later),
            )
        if not now:
            log.info("SIGHUP: nothing to change now")
            return
        if "log_level" in now or "log_format" in now:
            setup_logging(new.log_level, new.log_format)
        if "queue" in now:
            server.broker.queue_limit = new.queue
        if "filter" in now:
            await server.broker.wait_settled()  # the table as of the last seq
            self.rescope(server, new.filter.to_filter())
        self.settings = apply_live(old, new)
        log.info("SIGHUP: applied %s", ", ".join(f"{k}={_show(getattr(new, k))}" for k in now))

    def rescope(self, server: Served, scope: Filter | None) -> None:
        """A new server-wide filter: `resync`, then the events from the old view of the
        table to the new one, published in one go (no await: the table stays as of the
        last seq; the broker must be settled), so every subscriber's table follows
        without a reconnect."""
        if not server.broker.settled:
            raise RuntimeError("rescope needs the table as of the last seq: wait_settled()")
        table = server.table.mounts()
        before = MountTable(filter_mounts(self.scope, table))
        after = MountTable(filter_mounts(scope, table))
        self.scope = scope
        events = diff(before, after, via="resync", time=time.time())
        if not events:
            return
        publish = server.broker.publish
        publish(Resync(seq=0, reason="filter-changed"))
        self._count_resync("filter-changed")
        for ev in events:
            publish(ev)
            self.events += 1
            if self.metrics is not None:
                self.metrics.events.inc(ev.action, ev.via)

    # --- status -------------------------------------------------------------------------

    async def answer_status(
        self,
        server: Served,
        stream: anyio.abc.ByteStream,
        req: StatusRequest,
        sock: socket.socket | None,
        *,
        token: bool,
    ) -> None:
        """One `status` frame, then close. Raises ProtocolError ("forbidden") before
        sending anything to a peer that may not see the whole server."""
        allowed = token or await anyio.to_thread.run_sync(_sees_everything, sock, server.socket_gid)
        if not allowed:
            raise ProtocolError(
                "forbidden",
                "the server's status is for root, members of the socket's group, and "
                "clients that send the token",
            )
        frame = self.status(server)
        await stream.send(encode_frame(req.format, frame))
        with contextlib.suppress(NotImplementedError):
            await stream.send_eof()

    def status(self, server: Served) -> Status:
        """The state of the server now (one consistent view: no await in here)."""
        from ..constants import __version__
        from ..sources.multi import source_label

        broker = server.broker
        stats = broker.stats()
        subs = {s.id: s for s in broker.subscriptions()}
        src = self._src
        return Status(
            version=__version__,
            pid=os.getpid(),
            uptime=round(time.monotonic() - self.started, 3),
            source=source_label(src) if src is not None else "",
            reason=src.reason if src is not None else None,
            listeners=list(self.listeners),
            namespaces=self._namespaces(server, src) if src is not None else [],
            seq=stats.last_seq,
            events=self.events,
            resyncs=self.resyncs,
            overflows=self.overflows,
            drops=stats.drops,
            subscribers=stats.subscribers,
            connections=server.limits.total,
            max_connections=server.limits.limit,
            max_connections_per_uid=server.limits.per_key,
            connections_by_uid={str(k): n for k, n in server.limits.by_key().items()},
            refused_too_many=server.too_many,
            stalled=server.stalls,
            snapshot_cache_bytes=broker.snapshot_cache.bytes,
            snapshot_cache_limit=broker.snapshot_cache.limit,
            subscriber=[
                SubscriberStatus(
                    id=st.id,
                    peer=self._peers.get(subs[st.id], "?") if st.id in subs else "?",
                    format=st.format,
                    filter=describe_filter(subs[st.id].request.filter).removeprefix(", ")
                    if st.id in subs
                    else "",
                    queued=st.queued,
                    lag=st.lag,
                    drops=st.drops,
                    delivered=st.delivered,
                )
                for st in sorted(stats.subscriber, key=lambda s: s.id)
            ],
            publisher=self.nats.status() if self.nats is not None else None,
        )

    @staticmethod
    def _namespaces(server: Served, src: Source) -> list[NamespaceStatus]:
        from ..cgroups import container_of_pid
        from ..sources.multi import MultiSource

        if not isinstance(src, MultiSource):
            c = container_of_pid(src.ns.pid)
            return [NamespaceStatus(ns_id=src.ns_id, mounts=len(server.table), container=c)]
        counts: dict[int | None, int] = dict.fromkeys(src.ns_ids, 0)
        for m in server.table:
            counts[m.ns_id] = counts.get(m.ns_id, 0) + 1
        pids = {ns.ns_id: ns.pid for ns in src.namespaces}
        return [
            NamespaceStatus(ns_id=ns_id, mounts=n, container=container_of_pid(pids.get(ns_id)))
            for ns_id, n in sorted(counts.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        ]


def _sees_everything(sock: socket.socket | None, socket_gid: int | None) -> bool:
    """Root, or the socket's group (Unix); root (loopback TCP, found in /proc/net/tcp)."""
    if sock is None:
        return False
    try:
        if sock.family == socket.AF_UNIX:
            return sees_all(unix_peer(sock), socket_gid)
        return tcp_peer_uid(sock) == 0
    except OSError:
        return False


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)

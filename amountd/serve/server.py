"""`amountd serve`: one source, one broker, and the listeners that subscribers connect to.

A thin shell around the pure parts (the protocol parses requests and encodes frames,
the broker numbers and fans out), made of one part per job:

- amountd.serve.listeners: the Unix socket, TCP, TLS, and the sockets systemd passes;
- amountd.serve.connection: one subscriber's connection, start to end;
- amountd.serve.pump: the source's batches -> the broker (the source's table is the one table);
- amountd.serve.daemon: systemd, signals and SIGHUP, metrics, and `status`.

Here: they are put together, run, and shut down in order.

Seqs start at the server's start time in microseconds, so they only grow across
restarts: a client resuming with a seq from an earlier run always gets `resync` and a
fresh `snapshot`, never another run's events under numbers it has already seen.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable

import anyio
import anyio.abc

from ..accept import resilient
from ..broker import Broker
from ..cgroups import container_of_pid
from ..limits import Connections, effective_cap, raise_nofile
from ..model import End, Mount
from ..protocol import StatusRequest
from ..sockdir import precheck
from ..sources import Source
from ..sources.multi import open_watch, source_label
from ..sweep import SweepSettings
from ..table import MountTable
from ..tokens import read_token
from .config import ServeConfig, check_config
from .connection import Subscribers
from .daemon import Service
from .listeners import (
    Listener,
    bound_name,
    group_id,
    open_listeners,
    passed_listeners,
    remove_socket,
    ssl_context,
)
from .pump import Pump

__all__ = ["Server", "serve"]

log = logging.getLogger("amountd.server")


class Server:
    """The listeners, the connections and the pump around one broker.

    What the daemon's parts read of it (amountd.serve.daemon.Served) are public
    attributes and read-only properties."""

    def __init__(
        self,
        config: ServeConfig,
        broker: Broker,
        table: Callable[[], MountTable],
        service: Service | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self._table = table
        self.service = service if service is not None else Service()
        """systemd, signals and SIGHUP, metrics, status (amountd.serve.daemon)."""
        self.pump = Pump(
            broker,
            # The server-wide filter and the counts (metrics, status) ride on publish.
            self.service.publisher(broker.publish),
            self.service.stamp,
            step=max(1, min(256, config.queue // 4)),
        )
        self.subscribers = Subscribers(config, broker, self.service, self._answer_status)

    async def _answer_status(
        self,
        stream: anyio.abc.ByteStream,
        req: StatusRequest,
        sock: socket.socket | None,
        token: bool,
    ) -> None:
        await self.service.answer_status(self, stream, req, sock, token=token)

    # --- what the daemon's parts read (amountd.serve.daemon.Served) ----------------------

    @property
    def socket_gid(self) -> int | None:
        """The Unix socket's group: its members see every namespace (amountd.access)."""
        return self.subscribers.socket_gid

    @socket_gid.setter
    def socket_gid(self, gid: int | None) -> None:
        self.subscribers.socket_gid = gid

    @property
    def table(self) -> MountTable:
        """The source's table (as of the last seq while the broker is settled)."""
        return self._table()

    @property
    def stop_reason(self) -> str:
        return self.pump.stop_reason

    @property
    def failure(self) -> BaseException | None:
        return self.pump.failure

    @property
    def limits(self) -> Connections:
        return self.subscribers.limits

    @property
    def too_many(self) -> int:
        return self.subscribers.too_many

    @property
    def stalls(self) -> int:
        return self.subscribers.stalls

    @property
    def token_failures(self) -> int:
        return self.subscribers.token_failures

    # --- running -------------------------------------------------------------------------

    async def run(
        self,
        src: Source,
        listeners: list[Listener],
        close_listeners: Callable[[], Awaitable[None]],
    ) -> None:
        async with anyio.create_task_group() as conns:
            async with anyio.create_task_group() as main:
                await main.start(self.service.signals, self, main.cancel_scope)
                main.start_soon(self.pump.run, src, main.cancel_scope)
                for lst in listeners:
                    # One that outlives EMFILE, ENFILE, ENOMEM (amountd.accept).
                    listener = resilient(lst.listener, lst.name)
                    main.start_soon(listener.serve, self.subscribers.handler(lst), conns)
                self.service.ready()  # READY=1: listening, and the signals are ours
            # No more publishing. Close the listeners (and remove the socket file) first,
            # so a reconnecting client finds nobody rather than a backlog closed under it,
            # then say goodbye and drain.
            await close_listeners()
            if not self.broker.ended:
                self.broker.publish(End(reason=self.stop_reason))
            await self.subscribers.drain(self.config.drain_timeout)
            conns.cancel_scope.cancel()


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
        ssl_context(config.tls_cert, config.tls_key)
        if config.tls_cert is not None and config.tls_key is not None
        else None
    )
    gid = group_id(config.socket_group) if config.socket_group is not None else None
    async with open_watch(
        config.source,
        ns=config.ns,
        namespaces=config.namespaces,
        all_namespaces=config.all_namespaces,
        unlimited_queue=config.unlimited_queue,
        sweep=SweepSettings(config.sweep_interval, config.sweep_budget),
    ) as src:
        # The one table: the source's (a resync may give it a new one, so it is
        # looked up each time), as of the last seq whenever the broker is settled.
        def table() -> MountTable:
            return src.table

        def mounts() -> Iterable[Mount]:
            return src.table.mounts()

        broker = Broker(
            ring=config.ring,
            queue=config.queue,
            table=service.view(mounts),  # the server-wide filter applied
            ns_id=src.ns_id,
            source=source_label(src),
            reason=src.reason,
            snapshot_cache=config.snapshot_cache,
            seq=time.time_ns() // 1000,  # above every earlier run's (see the module doc)
            container=container_of_pid(src.ns.pid),  # one namespace (else ns is nowhere)
        )
        server = Server(config, broker, table, service)
        listeners, unix = await open_listeners(service.unpassed(config), token, ssl_ctx, gid)
        listeners += await passed_listeners(passed, config, token, ssl_ctx)
        if unix is not None:
            server.socket_gid = gid if gid is not None else os.lstat(unix[0]).st_gid
        elif passed:
            server.socket_gid = service.passed_unix_gid()
        log.info("serving on %s", ", ".join(lst.name for lst in listeners))

        async def close_listeners() -> None:
            if unix is not None:
                remove_socket(*unix)
            with anyio.CancelScope(shield=True):
                for lst in listeners:
                    await anyio.aclose_forcefully(lst.listener)

        try:
            # The metrics listener and the watchdog; READY=1 now that all is open.
            async with service.running(server, src, [bound_name(lst) for lst in listeners]):
                await server.run(src, listeners, close_listeners)
        finally:
            await close_listeners()
        stats = broker.stats()
        log.info("stopped after %d frames", stats.published)
    if server.failure is not None:
        raise server.failure

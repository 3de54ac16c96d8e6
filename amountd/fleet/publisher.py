"""`serve --publish`: every frame of this host into NATS JetStream, never in the way.

The publisher is one more consumer of the server's broker, subscribed like a client
(JSON lines, a snapshot first), so the source and the local subscribers never wait for
it: if NATS is slow or down, its queue in the broker (`backlog` frames) fills, the
broker drops it, and it gets `resync` + a fresh snapshot like any slow subscriber.
Writes are pipelined (JetStream acks are awaited in bulk, at most `_INFLIGHT` out).

It reconciles on its first snapshot, after every lag, and whenever NATS comes back
(a reconnect, or acks resuming after `ack_timeout` without any): it reads this host's
keys in `amountd_mounts` and `amountd_namespaces` (behind a barrier: a delete of the
key `<host>` itself, which no host's pattern matches), writes and deletes the
difference from its mirror (amountd.fleet.mirror), and publishes a `resync` frame per
namespace.

nats-py runs on asyncio only: on another loop the publisher refuses to start.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any

import anyio

from ..constants import STOPPING
from ..errors import AmountdError, UsageError
from ..model import End, Event, PublisherStatus, Ready, Resync, Snapshot, decode_json, encode_json
from ..protocol import SubscribeRequest
from .kvread import read_bucket
from .mirror import KvOp, Mirror
from .naming import (
    MOUNTS_BUCKET,
    NAMESPACES_BUCKET,
    STREAM,
    SUBJECTS,
    default_host_id,
    kv_subject,
    msg_id,
    sanitize_host_id,
    subject,
    with_host,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..broker import Broker, Subscription
    from ..config import PublishConfig

__all__ = ["Publisher", "State", "check_publish", "host_id"]

log = logging.getLogger("amountd.fleet")

_INFLIGHT = 4096
"""Writes sent and not yet acknowledged; past this the publisher waits for acks."""
_POLL = 0.25
"""Seconds between looks at the connection while idle or down."""


class State(enum.Enum):
    CONNECTING = "connecting"
    RECONCILING = "reconciling"
    LIVE = "live"
    DOWN = "down"
    STOPPED = "stopped"


_NEXT: dict[State, frozenset[State]] = {
    State.CONNECTING: frozenset({State.RECONCILING, State.DOWN, State.STOPPED}),
    State.RECONCILING: frozenset({State.LIVE, State.DOWN, State.STOPPED}),
    State.LIVE: frozenset({State.RECONCILING, State.DOWN, State.STOPPED}),
    State.DOWN: frozenset({State.RECONCILING, State.DOWN, State.STOPPED}),
    State.STOPPED: frozenset(),
}


class _Down(Exception):
    """NATS did not answer (in time): wait for it, then reconcile."""


def host_id(settings: PublishConfig) -> str:
    """The configured host ID (sanitised), else the machine's default."""
    if settings.host_id:
        try:
            return sanitize_host_id(settings.host_id)
        except ValueError as e:
            raise UsageError(f"--host-id: {e}") from None
    return default_host_id()


def check_publish(settings: PublishConfig) -> None:
    """Refuse, before anything opens, what cannot work."""
    try:
        import sniffio

        lib = sniffio.current_async_library()
    except Exception:  # not in a loop: the caller checks later
        lib = "asyncio"
    if lib != "asyncio":
        raise UsageError(
            "--publish needs the asyncio backend (nats-py runs on asyncio only): "
            "drop --backend trio"
        )
    for url in settings.urls:
        if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise UsageError(f"--publish {url}: expected nats://HOST:PORT (or tls://)")
    host_id(settings)


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise AmountdError(f"cannot read the NATS {what} {path}: {e}") from None
    if not text:
        raise AmountdError(f"the NATS {what} {path} is empty")
    return text


def connect_options(settings: PublishConfig) -> dict[str, Any]:
    """nats.connect()'s credentials and TLS from `[publish]`."""
    opts: dict[str, Any] = {}
    if settings.credentials:
        opts["user_credentials"] = settings.credentials
    if settings.token_file:
        opts["token"] = _read_secret(settings.token_file, "token file")
    if settings.nkey_seed:
        opts["nkeys_seed"] = settings.nkey_seed
    if settings.tls_ca or settings.tls_cert:
        ctx = ssl.create_default_context(cafile=settings.tls_ca)
        if settings.tls_cert:
            try:
                ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
            except (OSError, ssl.SSLError) as e:
                raise AmountdError(f"cannot load the NATS TLS certificate: {e}") from None
        opts["tls"] = ctx
    return opts


class Publisher:
    """This host's frames and tables into JetStream (see the module doc)."""

    def __init__(
        self,
        settings: PublishConfig,
        broker: Broker,
        *,
        started: int,
        subscribed: Callable[[Subscription, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.host = host_id(settings)
        self.started = started
        """The server's start (its first seq, in µs): the middle of every Nats-Msg-Id."""
        self.broker = broker
        self.mirror = Mirror(self.host)
        self.state = State.CONNECTING
        self.published = 0
        self.reconciles = 0
        self.errors = 0
        self.last_error: str | None = None
        self._sub: Subscription | None = None
        self._nc: Any = None
        self._js: Any = None
        self._pending: collections.deque[tuple[float, Any]] = collections.deque()
        self._dirty: str | None = None  # why the next chance must reconcile
        self._have_table = False  # nothing to reconcile with before the first snapshot
        self._last_seq = started
        self._touched: set[int | None] = set()
        self._marker: dict[str, str] = {}  # the headers a delete marker adds (its TTL)
        self.finished = anyio.Event()
        self._subscribed = subscribed  # who it is, for `status`

    # --- state -----------------------------------------------------------------------

    def _to(self, state: State, why: str = "") -> None:
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"publisher: {self.state.value} -> {state.value}")
        if state is not self.state:
            log.info("NATS publisher: %s%s", state.value, f" ({why})" if why else "")
        self.state = state

    def _failed(self, why: str) -> None:
        self.errors += 1
        self.last_error = why
        if self._dirty is None and self._have_table:
            self._dirty = "reconnected"
        if self.state is not State.STOPPED:
            self._to(State.DOWN, why)

    def status(self) -> PublisherStatus:
        queued = self._sub.queued if self._sub is not None else 0
        return PublisherStatus(
            state=self.state.value,
            host=self.host,
            urls=list(self.settings.urls),
            backlog=queued + len(self._pending),
            published=self.published,
            reconciles=self.reconciles,
            errors=self.errors,
            last_error=self.last_error,
        )

    @property
    def backlog(self) -> int:
        return self.status().backlog

    # --- running ----------------------------------------------------------------------

    def _subscribe(self) -> Subscription:
        # Our own bound, not the clients' --queue: the broker reads it at subscribe time.
        broker = self.broker
        limit = broker.queue_limit
        broker.queue_limit = self.settings.backlog
        try:
            return broker.subscribe(SubscribeRequest(format="json", snapshot=True))
        finally:
            broker.queue_limit = limit

    async def run(self) -> None:
        """Until the server's `end` has been published (or cancelled)."""
        check_publish(self.settings)
        sub = self._sub = self._subscribe()
        if self._subscribed is not None:
            self._subscribed(sub, f"nats publisher ({self.host})")
        try:
            await self._connect()
            while True:
                if self.state is State.DOWN:
                    await self._wait_up()
                if self._dirty is not None and self._have_table:
                    try:
                        await self._reconcile(self._dirty)
                    except _Down as e:
                        if self.state is not State.DOWN:
                            self._failed(str(e))
                        continue
                chunk = None
                with anyio.move_on_after(_POLL):
                    try:
                        chunk = await sub.next_chunk()
                    except (anyio.EndOfStream, anyio.ClosedResourceError):
                        break
                if chunk is not None:
                    await self._chunk(chunk)  # a failure marks NATS down, never raises
                self._check_acks()
            with anyio.move_on_after(self.settings.ack_timeout), contextlib.suppress(_Down):
                await self._settle()
        finally:
            sub.close()
            if self.state is not State.STOPPED:
                self._to(State.STOPPED)
            self.finished.set()
            with anyio.move_on_after(1.0, shield=True):
                if self._nc is not None:
                    with contextlib.suppress(Exception):
                        await self._nc.close()

    async def _connect(self) -> None:
        import nats

        async def disconnected() -> None:
            if self.state in (State.LIVE, State.RECONCILING):
                self._failed("disconnected")

        async def reconnected() -> None:
            log.info("NATS publisher: reconnected to %s", self._nc.connected_url.netloc)
            if self._have_table:
                self._dirty = self._dirty or "reconnected"

        async def error(e: Exception) -> None:
            log.debug("NATS: %s", e)

        opts = connect_options(self.settings)
        while True:
            try:
                self._nc = await nats.connect(
                    servers=list(self.settings.urls),
                    name=f"amountd {self.host}",
                    connect_timeout=2,
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,
                    ping_interval=max(1, int(self.settings.ack_timeout)),
                    max_outstanding_pings=2,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                    **opts,
                )
                break
            except Exception as e:
                if self.state is State.CONNECTING:
                    self._failed(f"cannot connect to {', '.join(self.settings.urls)}: {e}")
                await anyio.sleep(1.0)
        self._js = self._nc.jetstream(publish_async_max_pending=_INFLIGHT + 1024)
        log.info("NATS publisher: connected as host %s", self.host)

    async def _wait_up(self) -> None:
        """Down: until the connection answers a round trip (the queue lags meanwhile)."""
        self._cancel_pending()
        while True:
            await anyio.sleep(_POLL)
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            try:
                await nc.flush(timeout=max(1, int(self.settings.ack_timeout)))
            except Exception:
                continue
            return

    def _cancel_pending(self) -> None:
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()

    # --- writing ----------------------------------------------------------------------

    async def _send(self, subj: str, payload: bytes, headers: dict[str, str] | None = None) -> bool:
        """One write, pipelined. A failure marks NATS down and is not raised: the frames
        still to handle must reach the mirror (the reconcile writes them)."""
        if self.state is State.DOWN:
            return False
        try:
            if len(self._pending) >= _INFLIGHT:
                await self._settle(_INFLIGHT // 2)
            fut = await self._js.publish_async(subj, payload, headers=headers)
        except _Down as e:
            self._failed(str(e))
            return False
        except Exception as e:
            self._failed(f"publish failed: {e or type(e).__name__}")
            return False
        self._pending.append((time.monotonic(), fut))
        return True

    async def _kv(self, op: KvOp) -> None:
        subj = kv_subject(op.bucket, op.key)
        if op.op == "put":
            await self._send(subj, op.value)
        elif op.op == "del":
            await self._send(subj, b"", {"KV-Operation": "DEL", **self._marker})
        else:
            purge = {"KV-Operation": "PURGE", "Nats-Rollup": "sub", **self._marker}
            await self._send(subj, b"", purge)

    def _check_acks(self) -> None:
        """Drop the acknowledged; a failed or overdue one means NATS is down."""
        pending = self._pending
        while pending and pending[0][1].done():
            _, fut = pending.popleft()
            if fut.cancelled():
                continue
            e = fut.exception()
            if e is not None:
                raise_down = f"JetStream refused a write: {e or type(e).__name__}"
                self._failed(raise_down)
                return
        if pending and time.monotonic() - pending[0][0] > self.settings.ack_timeout:
            self._failed(f"no acknowledgement within {self.settings.ack_timeout:g} s")

    async def _settle(self, keep: int = 0) -> None:
        """Wait until at most `keep` writes are unacknowledged (or fail as _Down)."""
        import asyncio

        pending = self._pending
        while len(pending) > keep:
            t0, fut = pending[0]
            left = t0 + self.settings.ack_timeout - time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(fut), max(left, 0.001))
            except TimeoutError:
                raise _Down(f"no acknowledgement within {self.settings.ack_timeout:g} s") from None
            except asyncio.CancelledError:
                if not fut.cancelled():
                    raise
            except Exception as e:
                raise _Down(f"JetStream refused a write: {e or type(e).__name__}") from None
            pending.popleft()

    async def _frame(self, kind: str, ns: int | None, payload: bytes, mid: str) -> None:
        if await self._send(subject(self.host, ns, kind), payload, {"Nats-Msg-Id": mid}):
            self.published += 1

    def _with_host(self, body: bytes) -> bytes:
        return with_host(body, self.host)

    async def _chunk(self, chunk: bytes) -> None:
        mirror = self.mirror
        touched = self._touched
        for line in chunk.splitlines():
            if not line:
                continue
            frame = decode_json(line)
            t = type(frame)
            if t is Event:
                assert isinstance(frame, Event)
                self._last_seq = frame.seq
                ns, op = mirror.event(frame)
                touched.add(ns)
                if self.state is State.DOWN:
                    continue  # the mirror keeps up; the reconcile writes it all
                await self._frame(
                    frame.action,
                    ns,
                    self._with_host(line),
                    msg_id(self.host, self.started, frame.seq),
                )
                await self._kv(op)
            elif t is Snapshot:
                assert isinstance(frame, Snapshot)
                self._last_seq = frame.seq
                mirror.snapshot(frame)
                self._dirty = "lagged" if self._have_table else "started"
                self._have_table = True
            elif t is Ready:
                assert isinstance(frame, Ready)
                mirror.ready(frame)
            elif t is Resync:
                assert isinstance(frame, Resync)
                self._last_seq = frame.seq
                if frame.reason == "lagged":  # ours: a snapshot follows
                    self._dirty = "lagged"
                    continue
                ns = frame.ns_id if frame.ns_id is not None else mirror.default_ns
                if self.state is not State.DOWN:
                    mid = msg_id(self.host, self.started, frame.seq)
                    await self._frame("resync", ns, self._with_host(line), mid)
            elif t is End:
                assert isinstance(frame, End)
                await self._end(frame, line)
        if self._dirty is not None or self.state is State.DOWN:
            return
        for ns in touched:
            if ns in mirror.tables:
                await self._kv(mirror.record(ns))
        touched.clear()

    async def _end(self, frame: End, line: bytes) -> None:
        mirror = self.mirror
        stopping = frame.ns_id is None and frame.reason.startswith(STOPPING)
        spaces = [frame.ns_id] if frame.ns_id is not None else mirror.namespaces
        for i, ns in enumerate(spaces):
            ops = [] if stopping else mirror.end(ns)
            if self.state is State.DOWN:
                continue
            mid = msg_id(self.host, self.started, self._last_seq, f"end{i}.{ns or 0}")
            await self._frame("end", ns, self._with_host(line), mid)
            for op in ops:
                await self._kv(op)

    async def _read_keys(self, bucket: str, pattern: str) -> dict[str, bytes]:
        """This host's entries in a bucket (deleted ones left out), after every write
        this connection sent before: a barrier write to the bucket, acknowledged, comes
        after them in the bucket's stream (a stream stores one connection's writes in
        order). Without it, writes held by the client while NATS was away, or still
        queued in the server, land after the read: keys of mounts gone since stay."""
        try:
            await self._js.publish(
                kv_subject(bucket, self.host),
                b"",
                timeout=self.settings.ack_timeout,
                headers={"KV-Operation": "DEL", **self._marker},
            )
            return await read_bucket(self._js, bucket, pattern, self.settings.ack_timeout)
        except Exception as e:
            raise _Down(f"cannot read the bucket {bucket}: {e or type(e).__name__}") from None

    async def _ensure(self) -> None:
        """The stream and the buckets, created if missing (an existing one is kept)."""
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import BucketNotFoundError, NotFoundError

        js = self._js
        s = self.settings
        try:
            try:
                await js.stream_info(STREAM)
            except NotFoundError:
                max_bytes = s.stream_max_bytes
                await js.add_stream(
                    StreamConfig(
                        name=STREAM,
                        subjects=[SUBJECTS],
                        max_age=s.stream_max_age,
                        max_bytes=max_bytes,
                        duplicate_window=s.duplicate_window,
                        storage=StorageType.FILE,
                    )
                )
                log.info("created the stream %s", STREAM)
            ttl = True
            for bucket in (MOUNTS_BUCKET, NAMESPACES_BUCKET):
                try:
                    await js.key_value(bucket)
                except BucketNotFoundError:
                    await js.create_key_value(bucket=bucket, history=1)
                    log.info("created the key-value bucket %s", bucket)
                ttl = await self._allow_ttl(f"KV_{bucket}") and ttl
            self._marker = {"Nats-TTL": f"{s.tombstone_ttl}s"} if ttl else {}
        except _Down:
            raise
        except Exception as e:
            raise _Down(f"cannot set up JetStream: {e or type(e).__name__}") from None

    async def _allow_ttl(self, stream: str) -> bool:
        """Let the bucket's stream take per-message TTLs (nats-server 2.11+), so delete
        markers expire; False, said once in the log, where the server cannot."""
        from nats.js.errors import APIError

        info = await self._js.stream_info(stream)
        if info.config.allow_msg_ttl:
            return True
        info.config.allow_msg_ttl = True
        try:
            await self._js.update_stream(info.config)
        except APIError as e:
            if self._marker or self.reconciles == 0:
                log.warning(
                    "NATS keeps delete markers in %s for good (no per-message TTL: %s)",
                    stream,
                    e.description or e,
                )
            return False
        return True

    async def _reconcile(self, reason: str) -> None:
        """Make this host's keys equal its table; say so with a `resync` per namespace."""
        self._to(State.RECONCILING, reason)
        self._cancel_pending()
        t0 = time.monotonic()
        await self._ensure()
        mounts = await self._read_keys(MOUNTS_BUCKET, f"{self.host}.>")
        spaces = await self._read_keys(NAMESPACES_BUCKET, f"{self.host}.*")
        ops = self.mirror.diff(mounts, spaces)
        for op in ops:
            await self._kv(op)
        for ns in self.mirror.namespaces:
            frame = Resync(seq=self._last_seq, reason=reason, ns_id=ns)
            mid = msg_id(
                self.host, self.started, self._last_seq, f"resync{self.reconciles + 1}.{ns or 0}"
            )
            await self._frame("resync", ns, self._with_host(encode_json(frame)), mid)
        if self.state is State.DOWN:
            raise _Down(self.last_error or "down")
        await self._settle()
        self._touched.clear()
        self._dirty = None
        self._to(State.LIVE)
        self.reconciles += 1  # with the log line below, no await between: `status` sees both
        log.info(
            "NATS publisher: reconciled (%s): %d keys held, %d written or deleted, %.3f s",
            reason,
            len(mounts),
            len(ops) - len(self.mirror.namespaces),
            time.monotonic() - t0,
        )

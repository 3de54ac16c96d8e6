"""Prometheus metrics: a tiny registry, the text exposition format, and a GET /metrics responder.

The counters sit on the event path, so counting is one dict update (`inc`) or one
bisect and three adds (`observe`); the formatting is all in `render()`, which runs
only when a scraper asks. Everything runs in the event loop's thread: no locks.
Gauges can be callbacks (`Gauge(fn=...)`), read at scrape time, so a value the server
already knows (its subscriber count) costs nothing between scrapes.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import anyio
import anyio.abc

__all__ = [
    "CONTENT_TYPE",
    "EVENT_SECONDS_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "Metrics",
    "answer",
    "serve_metrics",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

EVENT_SECONDS_BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005,
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0,
)  # fmt: skip
"""10 µs to 1 s: a fanotify event costs ~10-100 µs to describe; a mountinfo re-read and
diff at 10,000 mounts tens of ms; past a second something is wrong."""

Labels = tuple[str, ...]
M = TypeVar("M", bound="_Metric")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _callback_sample(name: str, fn: Callable[[], float]) -> list[str]:
    """A callback's value as its one sample; none (and a log line) if the callback fails."""
    try:
        value = fn()
    except Exception:
        log.exception("metrics: the callback for %s failed", name)
        return []
    return [f"{name} {_value(value)}"]


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames: Labels = tuple(labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class _Series(_Metric):
    """One series per label tuple (given positionally, in order), or, with `fn` (and no
    labels), a value asked for at scrape time: a figure some other object already keeps
    (the broker's drop count), at no cost per event."""

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        *,
        fn: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(name, help, labelnames)
        if fn is not None and self.labelnames:
            raise ValueError(f"a callback {self.kind} has no labels")
        self.fn = fn
        self.values: dict[Labels, int | float] = {}
        if not self.labelnames and fn is None:
            self.values[()] = 0

    def get(self, *labels: str) -> int | float:
        if self.fn is not None:
            return self.fn()
        return self.values.get(labels, 0)

    def samples(self) -> list[str]:
        if self.fn is not None:
            return _callback_sample(self.name, self.fn)
        return [
            f"{self.name}{_labels(self.labelnames, key)} {_value(v)}"
            for key, v in sorted(self.values.items())
        ]


class Counter(_Series):
    """A monotonic count."""

    kind = "counter"

    def inc(self, *labels: str) -> None:
        """Add one (the hot path: one dict update)."""
        values = self.values
        values[labels] = values.get(labels, 0) + 1

    def add(self, amount: float, *labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        values = self.values
        values[labels] = values.get(labels, 0) + amount


class Gauge(_Series):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value


class Histogram(_Metric):
    """Observations in fixed buckets (no labels): `_bucket{le=...}` cumulative, `_sum`, `_count`."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float]) -> None:
        super().__init__(name, help)
        self.bounds: tuple[float, ...] = tuple(sorted(buckets))
        if not self.bounds or self.bounds[-1] != math.inf:
            self.bounds += (math.inf,)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """One observation (the hot path: a bisect and three adds)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self) -> list[str]:
        out = []
        total = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            total += n
            out.append(f'{self.name}_bucket{{le="{_value(float(bound))}"}} {total}')
        out.append(f"{self.name}_sum {_value(self.sum)}")
        out.append(f"{self.name}_count {self.count}")
        return out


class Metrics:
    """amountd's metrics; the server holds one and counts into its attributes."""

    def __init__(self, version: str | None = None) -> None:
        self._metrics: list[_Metric] = []
        self.events = self.add(
            Counter(
                "amountd_events_total",
                "Mount events published, by action and by how they were learnt (fanotify, "
                "mountinfo, resync).",
                ("action", "source"),
            )
        )
        self.subscribers = self.add(Gauge("amountd_subscribers", "Subscribers connected now."))
        self.queue_drops = self.add(
            Counter(
                "amountd_queue_drops_total",
                "Subscriber queues dropped because the subscriber read too slowly "
                "(each is followed by a resync).",
            )
        )
        self.resyncs = self.add(
            Counter(
                "amountd_resyncs_total",
                "Resyncs sent or made, by reason (overflow, lagged, ...).",
                ("reason",),
            )
        )
        self.overflows = self.add(
            Counter(
                "amountd_overflows_total",
                "Kernel fanotify queue overflows (events lost, recovered by a resync).",
            )
        )
        self.event_seconds = self.add(
            Histogram(
                "amountd_event_processing_seconds",
                "Time from reading a change from the kernel to publishing its events.",
                EVENT_SECONDS_BUCKETS,
            )
        )
        self.connections = self.add(
            Gauge("amountd_connections", "Connections open now (subscribers and others).")
        )
        self.connection_limit = self.add(
            Gauge("amountd_connection_limit", "Connections allowed open at once, in all.")
        )
        self.connection_limit_per_uid = self.add(
            Gauge(
                "amountd_connection_limit_per_uid",
                "Connections allowed open at once from one uid (root excepted) or address.",
            )
        )
        self.refused_too_many = self.add(
            Counter(
                "amountd_connections_refused_total",
                "Connections refused for a connection cap (error code too-many).",
            )
        )
        self.stalled = self.add(
            Counter(
                "amountd_stalled_total",
                "Subscribers closed because they read nothing for --stall-timeout.",
            )
        )
        self.token_failures = self.add(
            Counter("amountd_token_failures_total", "Requests refused for a wrong or no token.")
        )
        self.snapshot_cache_bytes = self.add(
            Gauge("amountd_snapshot_cache_bytes", "Bytes of encoded snapshots kept for reuse.")
        )
        self.up = self.add(Gauge("amountd_up", "1 while the server is serving."))
        self.up.set(1)
        self.start_time = self.add(
            Gauge("amountd_start_time_seconds", "When the server started, in Unix time.")
        )
        self.start_time.set(time.time())
        self.build_info = self.add(
            Gauge("amountd_build_info", "amountd's version, as a label; always 1.", ("version",))
        )
        self.build_info.set(1, version or _version())

    def add(self, metric: M) -> M:
        """Register one more metric (rendered after the built-in ones); returns it."""
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics.append(metric)
        return metric

    def render(self) -> bytes:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        for m in self._metrics:
            lines += m.header()
            lines += m.samples()
        return ("\n".join(lines) + "\n").encode()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("amountd")
    except Exception:
        return "unknown"


MAX_REQUEST = 8192
"""A request head larger than this gets 431: a scraper's GET is a few hundred bytes."""
REQUEST_TIMEOUT = 10.0
"""Seconds a connection has to send its request and take the answer."""
MAX_CONNECTIONS = 16
"""Connections served at once; more wait their turn (a scrape takes milliseconds)."""

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    505: "HTTP Version Not Supported",
}


def _response(status: int, body: bytes, content_type: str, *, head: bool = False) -> bytes:
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 405:
        headers.append("Allow: GET, HEAD")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head else body)


def answer(registry: Metrics, head: bytes) -> bytes:
    """Pure: the whole response to one request head (the bytes up to the blank line)."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response(400, b"bad request\n", "text/plain")
    method, target, version = parts
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        return _response(505, b"HTTP/1.0 or 1.1 only\n", "text/plain")
    path = target.split(b"?", 1)[0]
    if path != b"/metrics":
        return _response(404, b"not found: try /metrics\n", "text/plain")
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"GET or HEAD only\n", "text/plain")
    return _response(200, registry.render(), CONTENT_TYPE, head=method == b"HEAD")


async def _read_head(stream: anyio.abc.ByteStream) -> bytes | None:
    """The request head, or None if it is too large; raises EndOfStream if cut short."""
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return buf[:end] if end <= MAX_REQUEST else None
        if len(buf) > MAX_REQUEST:
            return None
        buf += await stream.receive(MAX_REQUEST + 4)


LINGER = 2.0
"""Seconds spent reading what a client sent beyond its request head, after answering."""


async def _linger(stream: anyio.abc.SocketStream) -> None:
    """Half-close and read what is left, briefly: closing a socket with unread input sends
    RST, which can destroy our answer (a 431) before the client has read it."""
    await stream.send_eof()
    with anyio.move_on_after(LINGER):
        for _ in range(64):
            await stream.receive(65536)


async def serve_metrics(
    registry: Metrics,
    host: str,
    port: int,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer GET /metrics on HOST:PORT until cancelled; `task_status.started(port)`.

    Use with `await tg.start(serve_metrics, metrics, host, port)`: the bound port (for
    port 0) comes back once it listens, and a bind failure (address in use) is raised
    there. One HTTP/1.1 request per connection, then close; each connection is on its
    own, so a broken or slow one affects only itself.
    """
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    limiter = anyio.CapacityLimiter(MAX_CONNECTIONS)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with limiter, stream:
            try:
                with anyio.fail_after(REQUEST_TIMEOUT):
                    head = await _read_head(stream)
                    if head is None:
                        reply = _response(431, b"request too large\n", "text/plain")
                    else:
                        reply = answer(registry, head)
                    await stream.send(reply)
                    await _linger(stream)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError, TimeoutError):
                pass
            except Exception:
                log.exception("metrics: a request failed")

    # A name with v4 and v6 addresses gives several listeners, all on one port.
    local = listener.extra(anyio.abc.SocketAttribute.local_address)
    async with listener:
        task_status.started(int(local[1]))
        await listener.serve(handle)

"""`amountd status`: ask a running server for its state, and show it to a person.

The wire side is one request line, `{"type":"status","version":1}`, answered by one
`status` frame after which the server closes; `format_status` is pure.
"""

from __future__ import annotations

import ssl

import anyio

from .client import ClientError, open_stream, parse_url
from .model import Error, Frame, Status
from .protocol import FrameReader, ProtocolError, StatusRequest, encode_request

__all__ = ["format_status", "query_status"]

TIMEOUT = 10.0


async def query_status(
    url: str,
    *,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = TIMEOUT,
    server_uid: int | None = None,
) -> Status:
    """The server's `status` frame. Raises ClientError saying what went wrong (no
    server, refused, an older server that does not answer status requests, a Unix
    socket served by a uid other than root, ours or `server_uid`)."""
    ep = parse_url(url)
    stream = await open_stream(ep, ssl_context, server_uid)
    reader = FrameReader("json")
    frames: list[Frame] = []
    try:
        with anyio.fail_after(timeout):
            await stream.send(encode_request(StatusRequest(token=token)))
            while True:
                try:
                    data = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
                frames += reader.feed(data)
            reader.feed_eof()
    except TimeoutError:
        raise ClientError(f"{ep} did not answer within {timeout:g} s") from None
    except ProtocolError as e:
        raise ClientError(f"{ep} answered with something that is not a frame: {e}") from None
    except OSError as e:
        raise ClientError(f"the connection to {ep} failed: {e.strerror or e}") from None
    finally:
        await anyio.aclose_forcefully(stream)
    for frame in frames:
        if isinstance(frame, Status):
            return frame
        if isinstance(frame, Error):
            if "unknown request type" in frame.message:
                raise ClientError(
                    f"{ep} does not answer status requests: is it an older amountd?", frame.code
                )
            raise ClientError(f"{ep} refused: {frame.message}", frame.code)
    raise ClientError(f"{ep} closed the connection without a status: is it amountd serve?")


def duration(seconds: float) -> str:
    """`3d 04h 05m`, `1h 02m 03s`, `2m 05s`, `4.2s`: as precise as a person needs."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h:02d}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    return f"{m}m {s:02d}s"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def format_status(st: Status) -> str:
    """The status as a few lines of text (no trailing newline)."""
    lines = [f"amountd {st.version or '?'}, pid {st.pid}, up {duration(st.uptime)}"]
    source = st.source or "?"
    lines.append(f"source:      {source}" + (f" ({st.reason})" if st.reason else ""))
    lines.append(f"listening:   {', '.join(st.listeners) or '-'}")
    lines.append(f"namespaces:  {len(st.namespaces)}")
    if st.namespaces:
        rows = [
            [
                "?" if n.ns_id is None else str(n.ns_id),
                str(n.mounts),
                n.container.short if n.container is not None else "-",
            ]
            for n in st.namespaces
        ]
        lines += _table(["NS_ID", "MOUNTS", "CONTAINER"], rows, right={1})
    lines.append(f"seq:         {st.seq}")
    lines.append(
        f"events:      {st.events} published; {_plural(st.resyncs, 'resync')} "
        f"({_plural(st.overflows, 'overflow')}); {_plural(st.drops, 'queue drop')}"
    )
    if st.max_connections:
        busiest = sorted(st.connections_by_uid.items(), key=lambda kv: -kv[1])[:3]
        per = ", ".join(f"{k}: {n}" for k, n in busiest)
        lines.append(
            f"connections: {st.connections} of {st.max_connections} (at most "
            f"{st.max_connections_per_uid} per uid{'; ' + per if per else ''}); "
            f"{st.refused_too_many} refused (too-many), {st.stalled} stalled"
        )
        lines.append(
            f"snapshots:   {_mib(st.snapshot_cache_bytes)} cached of "
            f"{_mib(st.snapshot_cache_limit)}"
        )
    lines.append(f"subscribers: {st.subscribers}")
    if st.subscriber:
        rows = [
            [
                str(s.id),
                s.peer,
                s.format,
                str(s.queued),
                str(s.lag),
                str(s.drops),
                str(s.delivered),
                s.filter or "-",
            ]
            for s in st.subscriber
        ]
        header = ["ID", "PEER", "FORMAT", "QUEUED", "LAG", "DROPS", "DELIVERED", "FILTER"]
        lines += _table(header, rows, right={0, 3, 4, 5, 6})
    pub = st.publisher
    if pub is not None:
        lines.append(
            f"publisher:   {pub.state} as host {pub.host} to {', '.join(pub.urls)}; "
            f"backlog {pub.backlog}; {pub.published} frames; "
            f"{_plural(pub.reconciles, 'reconcile')}; {_plural(pub.errors, 'error')}"
            + (f" (last: {pub.last_error})" if pub.last_error else "")
        )
    return "\n".join(lines)

"""The async client against an in-process fake server: addresses, the request it sends,
errors, reconnects with `since`, cancel-safety. No kernel and no root needed; the real
server is exercised in test_server.py."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from amountd import connect
from amountd.client import (
    STOPPING,
    ClientError,
    Endpoint,
    is_loopback,
    parse_url,
)
from amountd.errors import UsageError
from amountd.filter import Filter
from amountd.model import Action, End, Error, Event, Frame, Mount, Ready, Resync, Snapshot, fspath
from amountd.protocol import (
    Format,
    RequestReader,
    SubscribeRequest,
    encode_frame,
    frame_json,
)

from ..conftest import next_frames
from ..factories import event, mount

# --- addresses (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("unix:/run/amountd/amountd.sock", Endpoint(kind="unix", path="/run/amountd/amountd.sock")),
        ("unix:///tmp/a b.sock", Endpoint(kind="unix", path="/tmp/a b.sock")),
        ("unix:rel.sock", Endpoint(kind="unix", path="rel.sock")),
        ("tcp://127.0.0.1:7000", Endpoint(kind="tcp", host="127.0.0.1", port=7000)),
        ("tcp://example.org:7000/", Endpoint(kind="tcp", host="example.org", port=7000)),
        ("tls://[::1]:443", Endpoint(kind="tls", host="::1", port=443)),
    ],
)
def test_parse_url(url: str, want: Endpoint) -> None:
    assert parse_url(url) == want


def test_endpoint_str_round_trips() -> None:
    for url in ("unix:/x.sock", "tcp://h:1", "tls://[::1]:2"):
        assert parse_url(str(parse_url(url))) == parse_url(url)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://x:1", "unix:/path"),
        ("/run/amountd/amountd.sock", "unix:/path"),
        ("unix:", "no socket path"),
        ("tcp://x", "HOST:PORT"),
        ("tcp://:7", "HOST:PORT"),
        ("tcp://x:port", "bad port"),
        ("tcp://x:70000", "out of range"),
        ("tcp://x:0", "port 0"),
        ("tcp://::1:7", "brackets"),
    ],
)
def test_bad_urls_say_what_to_write(url: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        parse_url(url)


def test_loopback() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org")] == [False] * 4


# --- a fake server ------------------------------------------------------------------------

Handler = Callable[[int, SubscribeRequest, "Peer"], Awaitable[None]]


class Peer:
    """The server's side of one connection."""

    def __init__(self, stream: anyio.abc.ByteStream, fmt: Format) -> None:
        self.stream = stream
        self.format = fmt

    async def send(self, *frames: Frame) -> None:
        await self.stream.send(b"".join(encode_frame(self.format, f) for f in frames))


class FakeServer:
    """Records each connection's request and hands it to `handler` (with its number)."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[SubscribeRequest] = []
        self.scope = anyio.CancelScope()

    def stop(self) -> None:
        """Close the listener and every connection; the socket file goes too."""
        self.scope.cancel()

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        async with stream:
            reader = RequestReader()
            req = None
            while req is None:
                try:
                    req = reader.feed(await stream.receive())
                except anyio.EndOfStream:
                    return
            self.requests.append(req)
            await self.handler(len(self.requests), req, Peer(stream, req.format))


@asynccontextmanager
async def fake_server(path: Path, handler: Handler) -> AsyncIterator[FakeServer]:
    server = FakeServer(path, handler)
    listener = await anyio.create_unix_listener(path)

    async def run() -> None:
        async with listener:
            with server.scope:
                await listener.serve(server.handle)
        path.unlink(missing_ok=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        yield server
        tg.cancel_scope.cancel()


def mnt(key: int, target: str = "/a") -> Mount:
    return mount(key, target, None, full=False, options="rw")


def ev(seq: int, key: int = 100, action: Action = "mount") -> Event:
    return event(action, mnt(key, f"/m{key}"), seq=seq)


READY = Ready(source="fanotify", ns_id=7)


async def until_closed(peer: Peer) -> None:
    """Hold the connection open until the client closes it."""
    try:
        while True:
            await peer.stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        pass


async def drain(frames: AsyncIterator[Frame]) -> list[Frame]:
    out: list[Frame] = []
    with anyio.fail_after(10):
        async for f in frames:
            out.append(f)
    return out


# --- connecting -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_no_socket_says_start_the_server(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    with pytest.raises(ClientError, match=r"is `amountd serve` running\? no socket at .*none.sock"):
        async with connect(f"unix:{path}"):
            pass


@pytest.mark.anyio
async def test_stale_socket_says_nothing_listens(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays; nobody listens
    with pytest.raises(ClientError, match="nothing listens"):
        async with connect(f"unix:{path}"):
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_request_and_frames_in_both_formats(tmp_path: Path, fmt: Format) -> None:
    snap = Snapshot(seq=4, ns_id=7, mounts=[mnt(1, "/"), mnt(2, "/a\udcff b")])

    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        await peer.send(snap, READY, ev(5), ev(6, action="umount"), End(reason="gone"))

    flt = Filter(actions=["mount", "umount"], fstypes=["tmpfs"], under=fspath(b"/a\xff"))
    async with (
        fake_server(tmp_path / "s", handler) as server,
        connect(
            f"unix:{tmp_path / 's'}", snapshot=True, format=fmt, filter=flt, token="sekrit"
        ) as frames,
    ):
        got = await drain(frames)
    assert got == [snap, READY, ev(5), ev(6, action="umount"), End(reason="gone")]
    assert frames.last_seq == 6
    [req] = server.requests
    assert req == SubscribeRequest(format=fmt, snapshot=True, filter=flt, token="sekrit")


@pytest.mark.anyio
async def test_error_frame_raises_after_what_came_before(tmp_path: Path) -> None:
    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        await peer.send(READY, Error(code="forbidden", message="wrong token"))

    async with (
        fake_server(tmp_path / "s", handler),
        connect(f"unix:{tmp_path / 's'}", reconnect=True) as frames,
    ):
        [ready] = await next_frames(frames, 1)
        assert ready == READY
        with pytest.raises(ClientError, match="wrong token") as info:
            await anext(frames)
    assert info.value.code == "forbidden"


@pytest.mark.anyio
async def test_a_drop_without_reconnect_is_an_error(tmp_path: Path) -> None:
    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        await peer.send(READY, ev(1))
        # The msgpack frame is cut short: the connection closes inside it.
        await peer.stream.send(b"\x00\x00\x01\x00abc")

    async with (
        fake_server(tmp_path / "s", handler),
        connect(f"unix:{tmp_path / 's'}") as frames,
    ):
        assert await next_frames(frames, 2) == [READY, ev(1)]
        with pytest.raises(ClientError, match="lost the connection"):
            await anext(frames)


@pytest.mark.anyio
async def test_garbage_from_the_server_is_an_error(tmp_path: Path) -> None:
    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        await peer.stream.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await until_closed(peer)

    async with (
        fake_server(tmp_path / "s", handler),
        connect(f"unix:{tmp_path / 's'}", format="json", reconnect=True) as frames,
    ):
        with pytest.raises(ClientError, match="not a frame"):
            await anext(frames)


@pytest.mark.anyio
async def test_a_msgpack_client_reads_the_json_error_of_a_refusal(tmp_path: Path) -> None:
    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        # A refusal is always JSON: the requested format may be what was wrong.
        await peer.stream.send(frame_json(Error(code="forbidden", message="wrong token")))

    async with (
        fake_server(tmp_path / "s", handler),
        connect(f"unix:{tmp_path / 's'}", format="msgpack") as frames,
    ):
        with pytest.raises(ClientError, match="wrong token") as info:
            await anext(frames)
    assert info.value.code == "forbidden"


# --- reconnecting ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_reconnect_resumes_after_the_last_seq(tmp_path: Path) -> None:
    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        if n == 1:
            # The client asked for a snapshot only to learn where it starts.
            await peer.send(Snapshot(seq=10, ns_id=7, mounts=[]), READY, ev(11), ev(12))
            return  # drop
        if n == 2:
            await peer.send(READY, ev(13), Resync(seq=14, reason="lagged"))
            await peer.send(Snapshot(seq=14, ns_id=7, mounts=[mnt(1)]))
            await peer.send(End(reason=f"{STOPPING}"))
            return
        await peer.send(READY, ev(15), End(reason="the namespace is gone"))

    async with (
        fake_server(tmp_path / "s", handler) as server,
        connect(f"unix:{tmp_path / 's'}", reconnect=True) as frames,
    ):
        got = await drain(frames)
    assert got == [
        READY,
        ev(11),
        ev(12),
        READY,
        ev(13),
        Resync(seq=14, reason="lagged"),
        Snapshot(seq=14, ns_id=7, mounts=[mnt(1)]),
        READY,
        ev(15),
        End(reason="the namespace is gone"),
    ]
    assert frames.reconnects == 2
    first, second, third = server.requests
    assert (first.snapshot, first.since) == (True, None)
    assert (second.snapshot, second.since) == (False, 12)
    assert (third.snapshot, third.since) == (False, 14)
    assert first.format == second.format == "msgpack"


@pytest.mark.anyio
async def test_a_namespaces_end_that_a_resume_brings_again_is_handed_on_once(
    tmp_path: Path,
) -> None:
    gone = End(reason="mount namespace 8 was freed", ns_id=8)

    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        if n == 1:
            await peer.send(READY, ev(11), gone)
            return  # drop: the server cannot know whether `gone` arrived
        await peer.send(READY, gone, ev(12), End(reason="mount namespace 9 was freed", ns_id=9))
        await peer.send(End(reason="done"))

    async with (
        fake_server(tmp_path / "s", handler) as server,
        connect(f"unix:{tmp_path / 's'}", reconnect=True, since=10) as frames,
    ):
        got = await drain(frames)
    assert got == [
        READY,
        ev(11),
        gone,
        READY,
        ev(12),
        End(reason="mount namespace 9 was freed", ns_id=9),
        End(reason="done"),
    ]
    assert [r.since for r in server.requests] == [10, 11]


@pytest.mark.anyio
async def test_reconnect_with_the_consumers_own_since(tmp_path: Path) -> None:
    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        await peer.send(READY, ev(req.since + 1 if req.since is not None else 0))
        if n == 2:
            await peer.send(End(reason="bye"))

    async with (
        fake_server(tmp_path / "s", handler) as server,
        connect(f"unix:{tmp_path / 's'}", since=41, reconnect=True, format="json") as frames,
    ):
        got = await drain(frames)
    assert got == [READY, ev(42), READY, ev(43), End(reason="bye")]
    assert [(r.snapshot, r.since) for r in server.requests] == [(False, 41), (False, 42)]


@pytest.mark.anyio
async def test_gives_up_after_retry_for(tmp_path: Path) -> None:
    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        await peer.send(Snapshot(seq=1, ns_id=7, mounts=[]), READY)
        await until_closed(peer)

    async with (
        fake_server(tmp_path / "s", handler) as server,
        connect(f"unix:{tmp_path / 's'}", reconnect=True, retry_for=0.5) as frames,
    ):
        assert await next_frames(frames, 1) == [READY]
        server.stop()
        with pytest.raises(ClientError, match=r"could not reconnect within 0.5 s"):
            await drain(frames)
    assert len(server.requests) == 1


@pytest.mark.anyio
async def test_a_stopped_server_that_stays_away_ends_the_stream(tmp_path: Path) -> None:
    stop = End(reason=f"{STOPPING}: SIGTERM")
    path = tmp_path / "s"

    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        path.unlink()  # nobody can connect any more
        await peer.send(READY, ev(1), stop)
        await until_closed(peer)

    async with (
        fake_server(path, handler) as server,
        connect(f"unix:{path}", reconnect=True, since=0, retry_for=0.3) as frames,
    ):
        got = await drain(frames)
    assert got == [READY, ev(1), stop]
    assert len(server.requests) == 1


@pytest.mark.anyio
async def test_a_server_that_hangs_up_at_once_is_not_hammered(tmp_path: Path) -> None:
    stop = End(reason=STOPPING)

    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        if n == 1:
            await peer.send(READY, ev(1), stop)
            await until_closed(peer)
        # Later connections are accepted and closed without a word.

    async with (
        fake_server(tmp_path / "s", handler) as server,
        connect(f"unix:{tmp_path / 's'}", reconnect=True, since=0, retry_for=0.5) as frames,
    ):
        got = await drain(frames)
    # The server never answered again: the stream ends with the `end` it had sent.
    assert got == [READY, ev(1), stop]
    # Backoff from 50 ms: a handful of tries in half a second, not a busy loop.
    assert 2 <= len(server.requests) < 20, len(server.requests)
    assert all(r.since == 1 for r in server.requests[1:])


@pytest.mark.anyio
async def test_without_reconnect_stopping_is_the_end(tmp_path: Path) -> None:
    async def handler(n: int, req: SubscribeRequest, peer: Peer) -> None:
        await peer.send(READY, End(reason=STOPPING))
        await until_closed(peer)

    async with (
        fake_server(tmp_path / "s", handler) as server,
        connect(f"unix:{tmp_path / 's'}") as frames,
    ):
        assert await drain(frames) == [READY, End(reason=STOPPING)]
    assert len(server.requests) == 1


# --- cancel-safety ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_timeouts_around_anext_lose_nothing(tmp_path: Path) -> None:
    n = 200

    async def handler(_: int, req: SubscribeRequest, peer: Peer) -> None:
        await peer.send(READY)
        for i in range(1, n + 1):
            await peer.send(ev(i))
            if i % 7 == 0:
                await anyio.sleep(0.002)
        await peer.send(End(reason="done"))

    got: list[Frame] = []
    timeouts = 0
    async with (
        fake_server(tmp_path / "s", handler),
        connect(f"unix:{tmp_path / 's'}", buffer=4) as frames,
    ):
        with anyio.fail_after(20):
            while not got or not isinstance(got[-1], End):
                with anyio.move_on_after(0.001) as scope:
                    got.append(await anext(frames))
                timeouts += scope.cancelled_caught
    assert got == [READY, *(ev(i) for i in range(1, n + 1)), End(reason="done")]
    assert timeouts > 0, "the test never interrupted a wait"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)

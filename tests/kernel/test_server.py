"""`amountd serve` as a real process over a private namespace, with real sockets, on
trio and asyncio (the server runs on the same loop as the test's clients).

The invariant checked where it applies: a consumer that applies every frame it gets
(snapshot + events) ends with the kernel's table (listmount + statmount, read afresh).
"""

from __future__ import annotations

import grp
import os
import re
import select
import shutil
import signal
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.abc
import msgspec
import pytest

from amountd import connect
from amountd.client import STOPPING, ClientError
from amountd.filter import Filter
from amountd.model import (
    End,
    Error,
    Event,
    Frame,
    Ready,
    Resync,
    Snapshot,
    decode_json,
    encode_json,
    fspath,
)
from amountd.protocol import Format, FrameReader
from amountd.serve import ServeConfig, serve
from amountd.table import MountTable, apply_frame

from ..conftest import PrivateNs, next_events, next_frames, no_more_frames, run_cli
from ..multihelp import Serve
from ..nsharness import kernel_table

pytestmark = pytest.mark.anyio


ServerFactory = Callable[..., "Server"]


class Server(Serve):
    """`python -m amountd serve --unix DIR/amountd.sock --ns PID`, logging to a file."""

    def __init__(self, ns: PrivateNs, tmp: Path, backend: str, *extra: str) -> None:
        super().__init__(tmp / "amountd.sock", backend, "--ns", str(ns.pid), *extra)
        self.ns = ns
        self.tmp = tmp
        self.url = f"unix:{self.sock}"

    def rss_kib(self) -> int:
        return self.status("VmRSS")


@pytest.fixture
def server_for(
    private_ns: PrivateNs, tmp_path: Path, anyio_backend: str
) -> Iterator[ServerFactory]:
    """Make (and later kill) servers over the test's namespace: server_for(*flags)."""
    made: list[Server] = []

    def make(*extra: str) -> Server:
        srv = Server(private_ns, tmp_path, anyio_backend, *extra)
        made.append(srv)
        return srv.start()

    yield make
    for srv in made:
        srv.stop()


@pytest.fixture
def server(server_for: ServerFactory) -> Server:
    return server_for()


async def raw_connect(srv: Server) -> anyio.abc.SocketStream:
    return await anyio.connect_unix(srv.sock)


async def read_all(stream: anyio.abc.ByteStream, timeout: float = 10) -> bytes:
    """Everything until the server closes (failing if it does not, in time)."""
    out = b""
    with anyio.fail_after(timeout):
        while True:
            try:
                out += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return out


async def finished(proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    """A child's exit status, awaited without blocking the loop (clients keep reading)."""
    with anyio.fail_after(timeout):
        while proc.poll() is None:  # noqa: ASYNC110 (no event for a child's exit here)
            await anyio.sleep(0.02)
    return proc.returncode


def frames_of(data: bytes, fmt: Format) -> list[Frame]:
    reader = FrameReader(fmt)
    out = reader.feed(data)
    reader.feed_eof()
    return out


def strip(frame: Frame) -> bytes:
    """A frame's content without what differs between two watchers (seq, time, and
    comm: read from /proc when the event is, the process may be gone by then)."""
    if isinstance(frame, Event):
        frame = msgspec.structs.replace(frame, seq=0, time=0.0, comm=None)
    return encode_json(frame)


# --- both formats, many subscribers ------------------------------------------------------


async def test_json_and_msgpack_subscribers_see_the_same_frames(
    server: Server, private_ns: PrivateNs
) -> None:
    ns = private_ns
    odd = ns.path(b"odd \xff\n\\dir")
    a, b = ns.path("a"), ns.path("b")
    ns.mkdir(odd, a, b)
    async with (
        connect(server.url, snapshot=True, format="json") as js,
        connect(server.url, snapshot=True, format="msgpack") as mp,
    ):
        first = [await next_frames(s, 2) for s in (js, mp)]
        assert first[0] == first[1]
        snap, ready = first[0]
        assert isinstance(snap, Snapshot) and isinstance(ready, Ready)
        assert ready.source == "fanotify"
        assert apply_frame(MountTable(), snap) == kernel_table(ns)
        got: list[list[Event]] = [[], []]
        for argv in [
            ("mount", "-t", "tmpfs", "-o", "size=1m", "weird\xff".encode("latin-1"), odd),
            ("mount", "--bind", odd, a),
            ("mount", "--move", a, b),
            ("mount", "-o", "remount,bind,ro", b),  # this mount only, not the superblock
            ("umount", b),
        ]:
            ns.run(*argv)
            # One at a time: a remount is found by a sweep, which an umount right
            # after it could beat (then only the umount is reported).
            for i, s in enumerate((js, mp)):
                got[i] += await next_events(s, 1)
        assert got[0] == got[1]
        assert [e.action for e in got[0]] == ["mount", "mount", "move", "remount", "umount"]
        assert got[0][0].mount.target == fspath(odd)
        assert got[0][0].mount.source == fspath("weird\xff".encode("latin-1"))
        seqs = [e.seq for e in got[0]]
        assert seqs == list(range(snap.seq + 1, snap.seq + 6))


async def test_filters_apply_per_subscriber(server: Server, private_ns: PrivateNs) -> None:
    ns = private_ns
    top = ns.path(b"top \xfe")
    inside, outside = top + b"/in", ns.path("out")
    ns.mkdir(inside, outside)
    ns.run("mount", "-t", "tmpfs", "t", top)
    ns.mkdir(inside)
    flt = Filter(under=fspath(top), fstypes=["tmpfs"], actions=["mount", "umount"])
    async with (
        connect(server.url, snapshot=True, filter=flt, format="json") as js,
        connect(server.url, snapshot=True, filter=flt, format="msgpack") as mp,
        connect(server.url) as everything,
    ):
        for s in (js, mp):
            snap, _ = await next_frames(s, 2)
            assert isinstance(snap, Snapshot)
            assert [m.target for m in snap.mounts] == [fspath(top)]
        await next_frames(everything, 1)
        all_four: list[Event] = []
        for argv in [
            ("mount", "-t", "tmpfs", "x", inside),  # seen
            ("mount", "-t", "tmpfs", "x", outside),  # not under
            ("mount", "-o", "remount,bind,ro", inside),  # not an action asked for
            ("umount", inside),  # seen
        ]:
            ns.run(*argv)
            all_four += await next_events(everything, 1)  # one at a time (see above)
        assert [e.action for e in all_four] == ["mount", "mount", "remount", "umount"]
        for s in (js, mp):
            got = await next_events(s, 2)
            assert [(e.action, e.mount.target) for e in got] == [
                ("mount", fspath(inside)),
                ("umount", fspath(inside)),
            ]
            assert [e.seq for e in got] == [all_four[0].seq, all_four[3].seq]
            await no_more_frames(s)
    assert "under /tmp" in server.text() and "types tmpfs" in server.text()


async def test_200_subscribers_all_receive_every_event(
    server: Server, private_ns: PrivateNs
) -> None:
    ns = private_ns
    d = ns.path("d")
    ns.mkdir(d)
    n_subs, pairs = 200, 50
    results: dict[int, list[Event]] = {}

    async with anyio.create_task_group() as tg:
        armed = 0
        all_armed = anyio.Event()

        async def subscriber(i: int) -> None:
            nonlocal armed
            fmt: Format = "json" if i % 2 else "msgpack"
            async with connect(server.url, format=fmt) as frames:
                [ready] = await next_frames(frames, 1, timeout=30)
                assert isinstance(ready, Ready)
                armed += 1
                if armed == n_subs:
                    all_armed.set()
                results[i] = await next_events(frames, 2 * pairs, timeout=60)

        for i in range(n_subs):
            tg.start_soon(subscriber, i)
        with anyio.fail_after(30):
            await all_armed.wait()
        assert await finished(ns.popen_ops("pairs", d, pairs)) == 0
    assert len(results) == n_subs
    want = [encode_json(e) for e in results[0]]
    assert [e.action for e in results[0]] == ["mount", "umount"] * pairs
    for i, events in results.items():
        assert [encode_json(e) for e in events] == want, f"subscriber {i} saw something else"


# --- a subscriber that never reads -------------------------------------------------------------


async def test_a_stalled_subscriber_delays_no_one(
    server_for: ServerFactory, private_ns: PrivateNs
) -> None:
    ns = private_ns
    d = ns.path("d")
    ns.mkdir(d)
    # An unlimited kernel queue: the 20,000 events all reach the broker (none are
    # merged into a kernel-overflow resync), so what is checked is the broker's policy.
    # The changes come in batches of 2,000 events, each made once the reader that keeps
    # up has the last batch: so it is never 4,096 frames behind however busy the machine
    # is, while the stalled one overflows its queue (4,096) five times over.
    srv = server_for("--unlimited-queue", "--queue", "4096")
    pairs, batch = 10_000, 1_000
    stalled = await raw_connect(srv)
    await stalled.send(b'{"type":"subscribe","version":1,"format":"json"}\n')
    got: list[Frame] = []
    async with connect(srv.url, format="msgpack", buffer=100_000) as frames:
        [ready] = await next_frames(frames, 1)
        assert isinstance(ready, Ready)
        rss_before = srv.rss_kib()
        rss_peak = rss_before

        async def follow() -> None:
            with anyio.fail_after(120):
                while len(got) < 2 * pairs:
                    got.append(await anext(frames))

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            for done in range(batch, pairs + 1, batch):
                proc = ns.popen_ops("pairs", d, batch)
                while proc.poll() is None or len(got) < 2 * done:
                    rss_peak = max(rss_peak, srv.rss_kib())
                    await anyio.sleep(0.05)
                assert proc.returncode == 0
        rss_peak = max(rss_peak, srv.rss_kib())
        # The reader that keeps up got every event, in order, and no resync.
        assert all(isinstance(f, Event) for f in got), {type(f).__name__ for f in got}
        events = [f for f in got if isinstance(f, Event)]
        assert [e.action for e in events] == ["mount", "umount"] * pairs
        assert [e.seq for e in events] == list(range(events[0].seq, events[0].seq + 2 * pairs))
        # Memory: the ring holds the 20,000 events; the stalled subscriber costs at most
        # its queue (1,024 frames) and its socket buffer. A generous bound.
        print(f"server VmRSS {rss_before} KiB before, peak {rss_peak} KiB")
        assert rss_peak - rss_before < 200 * 1024, (rss_before, rss_peak)

        # The stalled one reads at last: what fit in its socket, then `resync`, then a
        # fresh snapshot, then live events again.
        reader = FrameReader("json")
        seen: list[Frame] = []
        with anyio.fail_after(30):
            while not any(isinstance(f, Snapshot) for f in seen):
                seen += reader.feed(await stalled.receive())
        i = next(k for k, f in enumerate(seen) if isinstance(f, Resync))
        assert isinstance(seen[0], Ready)
        before = [f for f in seen[1:i] if isinstance(f, Event)]
        assert len(before) == i - 1
        assert [e.seq for e in before] == [e.seq for e in events[: len(before)]]
        assert len(before) < 2 * pairs
        resync, snap = seen[i], seen[i + 1]
        assert isinstance(resync, Resync) and resync.reason == "lagged"
        assert isinstance(snap, Snapshot)
        table = apply_frame(MountTable(), snap)
        for f in seen[i + 2 :]:
            table = apply_frame(table, f)
        ns.run("mount", "-t", "tmpfs", "after", d)
        [live] = await next_events(frames, 1)
        with anyio.fail_after(10):
            while not any(isinstance(f, Event) and f.seq == live.seq for f in seen):
                new = reader.feed(await stalled.receive())
                seen += new
                for f in new:
                    table = apply_frame(table, f)
        assert table == kernel_table(ns)
    await stalled.aclose()


# --- resuming -----------------------------------------------------------------------------------


async def test_since_replays_exactly_what_was_missed(
    server_for: ServerFactory, private_ns: PrivateNs
) -> None:
    ns = private_ns
    dirs = [ns.path(f"m{i}") for i in range(20)]
    ns.mkdir(*dirs)
    srv = server_for("--ring", "8")
    async with connect(srv.url) as live:
        await next_frames(live, 1)
        for p in dirs[:5]:
            ns.run("mount", "-t", "tmpfs", "t", p)
        events = await next_events(live, 5)
        s = [e.seq for e in events]
        async with connect(srv.url, since=s[1], format="json") as resumed:
            got = await next_frames(resumed, 4)
            assert isinstance(got[0], Ready)
            assert got[1:] == events[2:]
            await no_more_frames(resumed)
        async with connect(srv.url, since=s[4]) as current:
            assert [type(f) for f in await next_frames(current, 1)] == [Ready]
            await no_more_frames(current)
        # Ten more: the ring (8) no longer holds what came after s[4].
        for p in dirs[5:15]:
            ns.run("mount", "-t", "tmpfs", "t", p)
        later = await next_events(live, 10)
        async with connect(srv.url, since=later[1].seq) as resumed:
            got = await next_frames(resumed, 9)
            assert got[1:] == later[2:]
        async with connect(srv.url, since=s[4]) as expired:
            resync, snap, ready = await next_frames(expired, 3)
            assert isinstance(resync, Resync) and resync.reason == "since-expired"
            assert isinstance(snap, Snapshot) and isinstance(ready, Ready)
            assert snap.seq == later[-1].seq == resync.seq
            assert apply_frame(MountTable(), snap) == kernel_table(ns)
        # A seq from the future (another server run) cannot be replayed either.
        async with connect(srv.url, since=later[-1].seq + 1000) as future:
            resync, snap, _ = await next_frames(future, 3)
            assert isinstance(resync, Resync) and isinstance(snap, Snapshot)


# --- bad input ----------------------------------------------------------------------------------


async def _refused(srv: Server, data: bytes, port: int | None = None) -> Error:
    """Send `data`, expect one `error` frame (JSON) and the connection closed."""
    stream: anyio.abc.ByteStream
    if port is None:
        stream = await raw_connect(srv)
    else:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        await stream.send(data)
        frames = frames_of(await read_all(stream), "json")
    assert len(frames) == 1 and isinstance(frames[0], Error), frames
    return frames[0]


async def test_bad_requests_get_an_error_and_close_only_their_connection(
    server_for: ServerFactory, private_ns: PrivateNs, tmp_path: Path
) -> None:
    ns = private_ns
    dirs = [ns.path(f"m{i}") for i in range(10)]
    ns.mkdir(*dirs)
    token = tmp_path / "token"
    token.write_text("s3cret-s3cret-s3cret\n")
    token.chmod(0o600)
    srv = server_for("--tcp", "127.0.0.1:0", "--token-file", str(token))
    port = srv.tcp_port()
    mounted = iter(dirs)

    async with connect(srv.url) as good:
        await next_frames(good, 1)

        async def still_served() -> None:
            p = next(mounted)
            ns.run("mount", "-t", "tmpfs", "t", p)
            [e] = await next_events(good, 1)
            assert e.mount.target == fspath(p)

        err = await _refused(srv, b"hello\n")
        assert err.code == "bad-request" and "not valid JSON" in err.message
        await still_served()
        err = await _refused(srv, b"x" * 70_000)
        assert err.code == "too-large"
        await still_served()
        err = await _refused(srv, b'{"type":"subscribe","version":2}\n')
        assert err.code == "unsupported-version"
        await still_served()
        err = await _refused(srv, b'{"type":"subscribe","version":1,"format":"xml"}\n')
        assert err.code == "bad-request" and "msgpack" in err.message
        err = await _refused(srv, b'{"type":"subscribe","version":1}\n', port)
        assert err.code == "forbidden"
        err = await _refused(srv, b'{"type":"subscribe","version":1,"token":"guess"}\n', port)
        assert (err.code, err.message) == ("forbidden", "wrong token")
        await still_served()
        with pytest.raises(ClientError, match="wrong token") as info:
            async with connect(f"tcp://127.0.0.1:{port}", token="nope") as frames:
                await anext(frames)
        assert info.value.code == "forbidden"
        # The right token over TCP; the Unix socket asks for none.
        async with connect(f"tcp://127.0.0.1:{port}", token="s3cret-s3cret-s3cret") as tcp:
            [ready] = await next_frames(tcp, 1)
            assert isinstance(ready, Ready)
            await still_served()
            [e] = await next_events(tcp, 1)
            assert e.mount.target == fspath(dirs[4])
    assert srv.proc is not None and srv.proc.poll() is None


async def test_request_timeout_and_cleanup_in_process(
    private_ns: PrivateNs, tmp_path: Path
) -> None:
    """serve() as an API: a silent connection gets `timeout`; cancelled, it cleans up."""
    sock = tmp_path / "s.sock"
    config = ServeConfig(unix=str(sock), ns=str(private_ns.pid), request_timeout=0.3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve, config)
        with anyio.fail_after(10):
            while not sock.exists():  # noqa: ASYNC110 (it appears once listening)
                await anyio.sleep(0.01)
        async with await anyio.connect_unix(sock) as silent:
            [err] = frames_of(await read_all(silent), "json")
        assert isinstance(err, Error) and err.code == "timeout"
        async with connect(f"unix:{sock}") as frames:
            assert [type(f) for f in await next_frames(frames, 1)] == [Ready]
        tg.cancel_scope.cancel()
    assert not sock.exists()


async def test_half_close_keeps_the_subscription_and_hang_up_ends_it(
    server: Server, private_ns: PrivateNs
) -> None:
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    # `printf '{...}\n' | socat ...` shuts down its writing side after the line.
    half = await raw_connect(server)
    await half.send(b'{"type":"subscribe","version":1}\n')
    await half.send_eof()
    reader = FrameReader("json")
    with anyio.fail_after(10):
        got = reader.feed(await half.receive())
    assert [type(f) for f in got] == [Ready]  # subscriber 1
    gone = await raw_connect(server)
    await gone.send(b'{"type":"subscribe","version":1}\n')
    with anyio.fail_after(10):
        assert b'"ready"' in await gone.receive()  # subscriber 2
    await gone.aclose()  # hangs up while nothing is being sent
    with anyio.fail_after(10):
        while "subscriber 2 left" not in server.text():  # noqa: ASYNC110 (a log line)
            await anyio.sleep(0.05)
    ns.run("mount", "-t", "tmpfs", "t", a)
    with anyio.fail_after(10):
        while not any(isinstance(f, Event) for f in got):
            got += reader.feed(await half.receive())
    assert "subscriber 1 left" not in server.text()
    await half.aclose()


def test_non_loopback_tcp_needs_a_token(tmp_path: Path) -> None:
    res = run_cli("serve", "--unix", str(tmp_path / "s"), "--tcp", "0.0.0.0:7000")
    assert res.returncode == 2, res.stderr
    err = res.stderr.decode()
    assert "--token-file" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    res = run_cli("serve", "--unix", str(tmp_path / "s"), "--tls-cert", "c.pem")
    assert res.returncode == 2 and "--tls-key" in res.stderr.decode()
    assert not (tmp_path / "s").exists()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls(server_for: ServerFactory, private_ns: PrivateNs, tmp_path: Path) -> None:
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    cert, key = _self_signed(tmp_path)
    srv = server_for("--tcp", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key))
    port = srv.tcp_port()
    ctx = ssl.create_default_context(cafile=str(cert))
    # A client that does not trust the certificate fails to connect, and nobody else cares.
    with pytest.raises(ClientError, match="TLS"):
        async with connect(f"tls://127.0.0.1:{port}"):
            pass
    async with connect(f"tls://127.0.0.1:{port}", ssl_context=ctx, snapshot=True) as frames:
        snap, ready = await next_frames(frames, 2)
        assert isinstance(snap, Snapshot) and isinstance(ready, Ready)
        ns.run("mount", "-t", "tmpfs", "t", a)
        [e] = await next_events(frames, 1)
        assert e.mount.target == fspath(a)


# --- crashes, restarts, stopping -----------------------------------------------------------------


async def test_kill_9_and_restart_a_reconnecting_client_keeps_the_table(
    server: Server, private_ns: PrivateNs
) -> None:
    ns = private_ns
    d = ns.path("d")
    ns.mkdir(d)
    table = MountTable()
    seen: list[Frame] = []
    async with connect(server.url, reconnect=True, snapshot=True, retry_for=60) as frames:

        async def apply_next() -> None:
            nonlocal table
            frame = await anext(frames)
            seen.append(frame)
            table = apply_frame(table, frame)

        churn = ns.popen_ops("churn", d, 4000)
        with anyio.fail_after(30):
            while sum(isinstance(f, Event) for f in seen) < 300:
                await apply_next()
        server.signal(signal.SIGKILL)
        server.wait()
        assert server.sock.exists(), "kill -9 leaves the socket file behind"
        server.start()  # replaces the stale socket
        with anyio.fail_after(60):
            while churn.poll() is None:
                with anyio.move_on_after(0.05):
                    await apply_next()
        assert churn.returncode == 0
        # Everything after the churn: the table must come to equal the kernel's.
        with anyio.fail_after(60):
            while table != kernel_table(ns):
                with anyio.move_on_after(0.5):
                    while True:
                        await apply_next()
        assert frames.reconnects == 1
    resyncs = [f for f in seen if isinstance(f, Resync)]
    assert [r.reason for r in resyncs] == ["since-expired"]
    i = seen.index(resyncs[0])
    assert isinstance(seen[i + 1], Snapshot) and isinstance(seen[i + 2], Ready)
    assert sum(isinstance(f, Ready) for f in seen) == 2
    assert all(isinstance(f, (Snapshot, Ready, Event, Resync)) for f in seen)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_sigterm_sends_end_removes_the_socket_and_exits_0(
    server: Server, private_ns: PrivateNs, sig: int
) -> None:
    async with (
        connect(server.url, format="json") as js,
        connect(server.url, format="msgpack") as mp,
        connect(server.url, reconnect=True, retry_for=0.5) as rc,
    ):
        stalled = await raw_connect(server)  # connected, never sends a request
        for s in (js, mp, rc):
            assert [type(f) for f in await next_frames(s, 1)] == [Ready]
        server.signal(sig)
        for s in (js, mp):
            [end] = await next_frames(s, 1)
            assert end == End(reason=STOPPING)
            with pytest.raises(StopAsyncIteration):
                await anext(s)
        # A reconnecting client tries again; with the server gone for good, it ends.
        [end] = await next_frames(rc, 1, timeout=15)
        assert end == End(reason=STOPPING)
        await read_all(stalled)
    assert server.wait() == 0
    assert not server.sock.exists()
    assert "Traceback" not in server.text()


async def test_namespace_end_ends_the_server(server: Server, private_ns: PrivateNs) -> None:
    async with connect(server.url) as frames:
        await next_frames(frames, 1)
        private_ns.close()  # the namespace's only process exits: it is freed
        with anyio.fail_after(15):
            got = [f async for f in frames]
    assert isinstance(got[-1], End) and not got[-1].reason.startswith(STOPPING)
    assert server.wait() == 0
    assert not server.sock.exists()


async def test_a_second_server_on_a_live_socket_is_refused(server: Server, tmp_path: Path) -> None:
    res = run_cli("serve", "--unix", str(server.sock), "--ns", str(server.ns.pid))
    assert res.returncode == 1
    assert "another server is listening" in res.stderr.decode()
    async with connect(server.url) as frames:  # the first one still serves
        assert [type(f) for f in await next_frames(frames, 1)] == [Ready]


async def test_socket_mode_group_and_peer_credentials(server_for: ServerFactory) -> None:
    try:
        group = grp.getgrgid(1)
    except KeyError:
        pytest.skip("no group with gid 1 to give the socket to")
    srv = server_for("--socket-group", group.gr_name)
    st = os.stat(srv.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, 1)
    async with connect(srv.url) as frames:
        await next_frames(frames, 1)
    assert re.search(rf"unix pid={os.getpid()} uid=0 ", srv.text()), srv.text()
    # Someone outside the group cannot connect, and is told what to do.
    res = run_cli("subscribe", "--unix", str(srv.sock), "--timeout", "1", user=65534)
    assert res.returncode == 1
    assert "permission denied" in res.stderr.decode() and "--socket-group" in res.stderr.decode()


# --- by hand: socat, nc -U ----------------------------------------------------------

SUBSCRIBE_LINE = b'{"type":"subscribe","version":1,"format":"json","snapshot":true}\n'


def _line(proc: subprocess.Popen[bytes], timeout: float = 10) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "nothing printed in time"
    return proc.stdout.readline()


@pytest.mark.parametrize("tool", ["socat", "nc"])
def test_by_hand(tool: str, private_ns: PrivateNs, tmp_path: Path) -> None:
    """The README's: `socat - UNIX-CONNECT:PATH` (or `nc -U PATH`), then type the line."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt-get install socat netcat-openbsd)")
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    srv = Server(ns, tmp_path, "asyncio").start()
    argv = (
        ["socat", "-", f"UNIX-CONNECT:{srv.sock}"]
        if tool == "socat"
        else ["nc", "-U", str(srv.sock)]
    )
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        assert proc.stdin is not None
        proc.stdin.write(SUBSCRIBE_LINE)
        proc.stdin.flush()
        snap = decode_json(_line(proc))
        assert isinstance(snap, Snapshot)
        assert isinstance(decode_json(_line(proc)), Ready)
        ns.run("mount", "-t", "tmpfs", "by-hand", a)
        ev = decode_json(_line(proc))
        assert isinstance(ev, Event) and ev.mount.target == fspath(a)
        srv.signal(signal.SIGTERM)
        assert decode_json(_line(proc)) == End(reason=STOPPING)
        assert srv.wait() == 0
    finally:
        proc.kill()
        proc.wait()
        srv.stop()


# --- `amountd subscribe` ------------------------------------------------------------


def _run(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "amountd", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("json", [False, True])
def test_subscribe_prints_what_watch_prints(
    json: bool, private_ns: PrivateNs, tmp_path: Path, anyio_backend: str
) -> None:
    ns = private_ns
    a, b = ns.path("a"), ns.path("b b")
    ns.mkdir(a, b)
    srv = Server(ns, tmp_path, anyio_backend).start()
    flags = ["--json"] if json else []
    common = [*flags, "--count", "3", "--backend", anyio_backend]
    watch = _run("watch", "--ns", str(ns.pid), *common)
    sub = _run("subscribe", "--unix", str(srv.sock), *common)
    try:
        # Both armed: each has printed its first line (the header, or `ready`).
        first = [_line(p) for p in (watch, sub)]
        assert first[0] == first[1]
        ns.run("mount", "-t", "tmpfs", "t", a)
        ns.run("mount", "--bind", a, b)
        ns.run("umount", a)
        outs = [p.communicate(timeout=20)[0] for p in (watch, sub)]
        assert [p.returncode for p in (watch, sub)] == [0, 0]
        if json:
            lines = [[strip(decode_json(x)) for x in o.splitlines()] for o in outs]
            assert lines[0] == lines[1]
            assert len(lines[0]) == 3
        else:
            assert outs[0] == outs[1]
            assert len(outs[0].splitlines()) == 3
    finally:
        for p in (watch, sub):
            p.kill()
            p.wait()
        srv.stop()


def test_subscribe_errors(tmp_path: Path) -> None:
    res = run_cli("subscribe", "--unix", str(tmp_path / "nope.sock"))
    assert res.returncode == 1
    err = res.stderr.decode().strip()
    assert err == f"amountd: is `amountd serve` running? no socket at {tmp_path / 'nope.sock'}"
    res = run_cli("subscribe", "--unix", "a", "--tcp", "h:1")
    assert res.returncode == 2
    res = run_cli("subscribe", "--tcp", "nohostport")
    assert res.returncode == 2 and "HOST:PORT" in res.stderr.decode()
    res = run_cli("subscribe", "--tls")
    assert res.returncode == 2 and "--tcp" in res.stderr.decode()
    res = run_cli("subscribe", "--since", "-1")
    assert res.returncode == 2

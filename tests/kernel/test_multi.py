"""Many mount namespaces in one server: subscribers choose namespaces and new namespaces
are picked up (the server as a process over private namespaces; and a container-like
scenario of 50 churned namespaces). The pure parts are in tests/unit/."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from amountd.filter import Filter
from amountd.model import (
    End,
    Event,
    Ready,
    Resync,
    Snapshot,
    fspath,
)
from amountd.mountinfo import parse_mountinfo
from amountd.table import MountTable

from ..conftest import MakeNs, PrivateNs, run_cli
from ..multihelp import RawSub, Serve, wait_for
from ..nsharness import kernel_table, ns_id_of


def test_serve_refuses_ns_with_all_namespaces(tmp_path: Path) -> None:
    res = run_cli("serve", "--unix", str(tmp_path / "s"), "--ns", "1", "--all-namespaces")
    assert res.returncode == 2
    assert "exclude each other" in res.stderr.decode()


# --- the server over private namespaces ------------------------------------------------------


@pytest.fixture
def serve_with(tmp_path: Path, anyio_backend: str) -> Iterator[Callable[..., Serve]]:
    made: list[Serve] = []

    def make(*args: str) -> Serve:
        srv = Serve(tmp_path / f"amountd-{len(made)}.sock", anyio_backend, *args)
        made.append(srv)
        return srv.start()

    yield make
    for srv in made:
        srv.stop()


@pytest.mark.anyio
async def test_three_namespaces_in_one_server(
    make_ns: MakeNs, serve_with: Callable[..., Serve]
) -> None:
    a, b, c = make_ns(3)
    ida, idb, idc = (ns_id_of(n.pid) for n in (a, b, c))
    srv = serve_with("--ns", str(a.pid), "--ns", str(b.pid), "--ns", str(c.pid))
    everything = await RawSub.open(srv.sock, fmt="msgpack")
    only_b = await RawSub.open(srv.sock, fmt="json", filter=Filter(namespaces=[idb]))
    by_pid = await RawSub.open(srv.sock, filter=Filter(pids=[c.pid], fstypes=["tmpfs"]))
    ready = next(f for f in everything.frames if isinstance(f, Ready))
    assert ready.source == "fanotify" and ready.ns_id is None
    assert isinstance(everything.frames[0], Snapshot)
    assert "namespaces " + str(idc) in srv.text()  # the PID was resolved to its namespace
    async with anyio.create_task_group() as tg:
        for s in (everything, only_b, by_pid):
            tg.start_soon(s.run)
        for n, i in ((a, ida), (b, idb), (c, idc)):
            assert everything.ns_table(i) == kernel_table(n.pid)
        assert only_b.table == kernel_table(b.pid)
        assert {m.fstype for m in by_pid.table} == {"tmpfs"}
        assert {m.ns_id for m in by_pid.table} == {idc}

        for n in (a, b, c):
            n.mkdir(n.path("m"))
            n.run("mount", "-t", "tmpfs", "m", n.path("m"))
        await wait_for(lambda: len(everything.events()) == 3, what="three mounts")
        assert sorted(e.mount.ns_id or 0 for e in everything.events()) == sorted([ida, idb, idc])
        await wait_for(lambda: len(only_b.events()) == 1 and len(by_pid.events()) == 1)
        assert only_b.events()[0].mount.ns_id == idb
        assert by_pid.events()[0].mount.ns_id == idc

        # B dies: its mounts go, then exactly one `end` with its ns_id; the rest goes on.
        b.close()
        await wait_for(lambda: bool(everything.ends(idb)), what="B's end")
        await wait_for(lambda: bool(only_b.ends(idb)), what="B's end (filtered)")
        assert not everything.ns_table(idb) and not only_b.table
        a.run("mount", "-t", "tmpfs", "again", a.path("m"))
        await wait_for(lambda: len(everything.events(ida)) == 2, what="A still watched")
        assert srv.running() and not only_b.closed and not by_pid.closed
        assert len(everything.ends(idb)) == 1 and len(only_b.ends(idb)) == 1
        assert everything.ends(every=True) == everything.ends(idb)
        assert by_pid.ends(every=True) == []  # B is not its namespace
        assert all(f.ns_id == idb for f in only_b.frames if isinstance(f, (End, Resync)))

        # The last listed namespaces end: so does the server, with a final `end`.
        a.close()
        c.close()
        await wait_for(lambda: everything.closed and only_b.closed and by_pid.closed)
    for s in (everything, only_b, by_pid):
        assert s.frames[-1] == End(reason="every watched mount namespace has ended")
    assert [e.ns_id for e in everything.ends(every=True)][-1] is None
    assert {e.ns_id for e in everything.ends(every=True)} == {ida, idb, idc, None}
    assert len(everything.ends(every=True)) == 4
    assert [e.ns_id for e in by_pid.ends(every=True)] == [idc, None]
    assert srv.wait() == 0
    assert not srv.sock.exists()


@pytest.mark.anyio
async def test_all_namespaces_picks_up_a_namespace_made_later(
    make_ns: MakeNs, serve_with: Callable[..., Serve]
) -> None:
    [first] = make_ns(1)
    # Every namespace of the machine is watched, other programs' busy ones too: a queue
    # they cannot fill, so this subscriber never lags (a lag would bring the new
    # namespace's table inside a fresh snapshot, not as the events checked here).
    srv = serve_with("--all-namespaces", "--queue", "1000000")
    sub = await RawSub.open(srv.sock)
    assert ns_id_of(first.pid) in {m.ns_id for m in sub.table}
    async with anyio.create_task_group() as tg:
        tg.start_soon(sub.run)
        [late] = await anyio.to_thread.run_sync(make_ns, 1)
        late_id = ns_id_of(late.pid)
        await wait_for(
            lambda: sub.ns_table(late_id) == kernel_table(late.pid), what="the new namespace"
        )
        # Its table came as `mount` events learnt by reading it (a snapshot of one
        # namespace inside the stream), then its changes come as usual.
        assert not [f for f in sub.frames if isinstance(f, Resync) and f.reason == "lagged"]
        assert sub.events(late_id)[0].via == "resync"
        late.mkdir(late.path("x"))
        late.run("mount", "-t", "tmpfs", "x", late.path("x"))
        await wait_for(
            lambda: any(e.mount.target == fspath(late.path("x")) for e in sub.events(late_id))
        )
        assert sub.events(late_id)[-1].via == "fanotify"
        assert "new mount namespace " + str(late_id) in srv.text()
        late.close()
        await wait_for(lambda: bool(sub.ends(late_id)), what="its end")
        assert len(sub.ends(late_id)) == 1 and not sub.ns_table(late_id)
        assert srv.running() and not sub.closed
        tg.cancel_scope.cancel()
    await sub.aclose()


def mountinfo_table(pid: int, ns_id: int) -> MountTable:
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        return MountTable(parse_mountinfo(f.read(), ns_id=ns_id))


@pytest.mark.anyio
async def test_a_mountinfo_watched_namespace_outlives_its_first_process(
    make_ns: MakeNs, serve_with: Callable[..., Serve]
) -> None:
    """mountinfo reads /proc/PID/: when that process exits but another one is still in
    the namespace, the server goes on watching through it; `end` comes when none is."""
    a, b = make_ns(2)
    ida = ns_id_of(a.pid)
    srv = serve_with("--ns", str(a.pid), "--ns", str(b.pid), "--source", "mountinfo")
    sub = await RawSub.open(srv.sock)
    other = subprocess.Popen(["nsenter", "-t", str(a.pid), "-m", "sleep", "infinity"])
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sub.run)
            assert sub.ns_table(ida) == mountinfo_table(a.pid, ida)
            await wait_for(lambda: ns_id_of(other.pid) == ida, what="a second process in A")
            a.close()  # A's first process; `other` keeps the namespace
            a.pid = other.pid  # a.run() from here on goes through it
            a.mkdir(a.path("m"))
            a.run("mount", "-t", "tmpfs", "m", a.path("m"))
            await wait_for(
                lambda: any(e.mount.target == fspath(a.path("m")) for e in sub.events(ida)),
                what="a mount in A after its first process exited",
            )
            assert sub.ns_table(ida) == mountinfo_table(other.pid, ida)
            assert not sub.ends(ida) and not any(isinstance(f, Resync) for f in sub.frames)
            assert f"pid {other.pid}" in srv.text()  # says which process it goes on with
            other.kill()
            other.wait()
            await wait_for(lambda: bool(sub.ends(ida)), what="A's end")
            assert len(sub.ends(ida)) == 1 and not sub.ns_table(ida)
            assert srv.running() and not sub.closed
            tg.cancel_scope.cancel()
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
        await sub.aclose()


# --- containers: 50 namespaces, churned, one server -----------------------------------------


@pytest.mark.anyio
async def test_fifty_churned_namespaces(
    make_ns: MakeNs, serve_with: Callable[..., Serve], tmp_path: Path, anyio_backend: str
) -> None:
    """50 namespaces of 20 mounts (40 made before the server starts, 10 after), a few
    changes a second in each, 10 of them killed mid-run; one server with
    --all-namespaces. At the end every subscriber's table of each live namespace is the
    kernel's, and every namespace that died was ended exactly once, for each
    subscriber that sees it."""
    if anyio_backend == "trio":
        pytest.skip("the scenario is measured once (asyncio, the default)")
    n_early, n_late, mounts, seconds, rate = 40, 10, 20, 10.0, 3.0
    early = make_ns(n_early)
    for ns in early:
        ns.ops("tree", ns.path(), mounts - 1)  # + the scratch tmpfs: 20 mounts of ours
    srv = serve_with("--all-namespaces", "--queue", "1000000")
    ids = {ns.pid: ns_id_of(ns.pid) for ns in early}
    some = [ids[ns.pid] for ns in early[:20]]
    subs = {
        "all": await RawSub.open(srv.sock, fmt="msgpack"),
        "ids": await RawSub.open(srv.sock, fmt="json", filter=Filter(namespaces=some)),
        "pids": await RawSub.open(srv.sock, filter=Filter(pids=[ns.pid for ns in early[20:]])),
    }
    sees = {
        "all": None,
        "ids": set(some),
        "pids": {ids[ns.pid] for ns in early[20:]},
    }
    cpu0 = srv.cpu_seconds()
    rss0 = srv.status("VmRSS")
    async with anyio.create_task_group() as tg:
        for s in subs.values():
            tg.start_soon(s.run)

        def make_late() -> list[PrivateNs]:
            out = make_ns(n_late)
            for ns in out:
                ns.ops("tree", ns.path(), mounts - 1)
            return out

        late = await anyio.to_thread.run_sync(make_late)
        ids.update({ns.pid: ns_id_of(ns.pid) for ns in late})
        every = early + late
        rng = random.Random(7)
        doomed = rng.sample(every, 10)
        specs = []
        for ns in every:
            spec = f"{ns.pid}:{ns.base}"
            if ns in doomed:
                spec += f":{rng.uniform(2, seconds - 2):.2f}"
            specs.append(spec)
        script = str(Path(__file__).parent.parent / "nschurn.py")
        churn = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, script, str(seconds), str(rate), "1", *specs],
                capture_output=True,
                check=False,
            )
        )
        assert churn.returncode == 0, churn.stderr.decode() + churn.stdout.decode()
        report = json.loads(churn.stdout)
        assert sorted(report["killed"]) == sorted(ns.pid for ns in doomed)
        changes = sum(report["changes"].values())
        for ns in doomed:
            ns.close()  # reap (the churner killed it once it had left the namespace)
        live = [ns for ns in every if ns not in doomed]
        dead = {ids[ns.pid] for ns in doomed}

        why: list[str] = []

        def converged() -> bool:
            why.clear()
            kernel = {ids[ns.pid]: kernel_table(ns.pid) for ns in live}
            for name, s in subs.items():
                for i, table in kernel.items():
                    want = table if sees[name] is None or i in sees[name] else MountTable()
                    have = s.ns_table(i)
                    if have != want:
                        extra = [m for m in have if want.get(m.key) != m]
                        missing = [m for m in want if have.get(m.key) != m]
                        why.append(f"{name}: ns {i}: extra {extra}, missing {missing}")
                for i in dead:
                    seen = sees[name] is None or i in sees[name]
                    if seen and (not s.ends(i) or s.ns_table(i)):
                        why.append(f"{name}: dead ns {i}: ends {s.ends(i)}, {s.ns_table(i)}")
            return not why

        with anyio.move_on_after(120):
            while not converged():  # noqa: ASYNC110 (about other tasks and the kernel)
                await anyio.sleep(0.2)
        if why:  # the server's lines about the namespaces that differ, then its tail
            bad = {w.split(": ")[1].split()[-1] for w in why}  # "ns 4703" -> "4703"
            about = [ln for ln in srv.text().splitlines() if any(b in ln for b in bad)]
            detail = "\n".join(w[:2000] for w in why[:5])
            raise AssertionError(f"{detail}\n" + "\n".join(about[-50:]) + srv.text()[-2000:])
        cpu1 = srv.cpu_seconds()
        rss1, hwm = srv.status("VmRSS"), srv.status("VmHWM")
        threads = srv.threads()
        await anyio.sleep(5)  # idle: what 40 watched namespaces cost at rest
        cpu2 = srv.cpu_seconds()
        for name, s in subs.items():
            assert not s.closed
            for i in dead:
                n = len(s.ends(i))
                assert n == (1 if sees[name] is None or i in sees[name] else 0), (name, i, n)
            lagged = [f for f in s.frames if isinstance(f, Resync) and f.reason == "lagged"]
            assert not lagged, name  # never lagged (an `error` renewal is not lag)
            allowed = sees[name]
            if allowed is not None:
                assert s.ns_ids_seen() <= allowed, name
        tg.cancel_scope.cancel()
    events = len(subs["all"].events())
    print(
        f"\n50 namespaces x {mounts} mounts, {changes} changes by the churner in "
        f"{seconds:.0f} s, {len(doomed)} namespaces killed; subscriber 'all' got {events} "
        f"events. Server: CPU {cpu1[0] - cpu0[0]:.2f} s (schedstat, live threads) / "
        f"{cpu1[1] - cpu0[1]:.2f} s (utime+stime) from subscribe to converged; "
        f"idle 5 s: {cpu2[0] - cpu1[0]:.3f} s / {cpu2[1] - cpu1[1]:.2f} s; "
        f"VmRSS {rss0} KiB -> {rss1} KiB, VmHWM {hwm} KiB; {threads} threads"
    )
    for s in subs.values():
        await s.aclose()


@pytest.mark.anyio
async def test_client_goes_on_past_one_namespaces_end(
    make_ns: MakeNs, serve_with: Callable[..., Serve]
) -> None:
    """connect() hands one namespace's `end` over as a frame and keeps the subscription."""
    from amountd.client import connect

    a, b = make_ns(2)
    ida, idb = (ns_id_of(n.pid) for n in (a, b))
    srv = serve_with("--ns", str(a.pid), "--ns", str(b.pid))
    async with connect(f"unix:{srv.sock}") as frames:
        got: list[object] = []
        with anyio.fail_after(15):
            async for frame in frames:
                got.append(frame)
                if isinstance(frame, Ready):
                    b.close()
                if isinstance(frame, End):
                    assert frame.ns_id == idb
                    a.mkdir(a.path("m"))
                    a.run("mount", "-t", "tmpfs", "after-end", a.path("m"))
                if isinstance(frame, Event) and frame.mount.source == "after-end":
                    assert frame.mount.ns_id == ida
                    break
    assert any(isinstance(f, End) for f in got)
    last = got[-1]
    assert isinstance(last, Event) and last.mount.source == "after-end", got[-3:]

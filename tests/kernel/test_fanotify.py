"""The fanotify source under load: no lost events, overflow recovery, snapshot + stream.

The invariant checked throughout: a consumer that applies every frame it gets ends
with the kernel's table (listmount + statmount, read afresh).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from amountd import watch
from amountd.model import End, Event, Frame, Ready, Resync, Snapshot
from amountd.ns import resolve_ns
from amountd.table import MountTable, apply_frame

from ..conftest import PrivateNs, next_frames, run_cli
from ..nsharness import kernel_table

pytestmark = pytest.mark.anyio


async def follow_until_equal(
    frames: AsyncIterator[Frame], table: MountTable, ns: PrivateNs, limit: float = 60
) -> tuple[MountTable, list[Frame]]:
    """Apply frames until the consumer's table is the kernel's (or fail after `limit`)."""
    seen: list[Frame] = []
    with anyio.move_on_after(limit):
        while table != kernel_table(ns):
            with anyio.move_on_after(0.5):
                while True:
                    frame = await anext(frames)
                    seen.append(frame)
                    table = apply_frame(table, frame)
    assert table == kernel_table(ns), "the consumer's table never matched the kernel's"
    return table, seen


async def test_fast_pairs_lose_nothing(private_ns: PrivateNs) -> None:
    ns = private_ns
    d = ns.path("d")
    ns.mkdir(d)
    async with watch(source="fanotify", ns=ns.pid) as frames:
        [ready] = await next_frames(frames, 1)
        assert isinstance(ready, Ready)
        ns.ops("pairs", d, 1000)
        got = await next_frames(frames, 2000, timeout=60)
    assert all(isinstance(f, Event) for f in got)
    events = [f for f in got if isinstance(f, Event)]
    assert [e.action for e in events] == ["mount", "umount"] * 1000
    ids = [e.mount.id for e in events]
    assert ids[0::2] == ids[1::2], "each umount names the mount just mounted"
    assert len(set(ids)) == 1000, "unique IDs are never reused"
    assert [e.seq for e in events] == list(range(1, 2001))
    # Each came from the driver process, named.
    assert {e.comm for e in events} <= {"python3", "python", None}
    assert sum(e.pid is not None for e in events) == 2000


async def test_overflow_recovers_the_table(private_ns: PrivateNs) -> None:
    ns = private_ns
    d = ns.path("d")
    ns.mkdir(d)
    async with watch(source="fanotify", ns=ns.pid, snapshot=True) as frames:
        snap, ready = await next_frames(frames, 2)
        assert isinstance(snap, Snapshot)
        assert isinstance(ready, Ready)
        table = apply_frame(MountTable(), snap)
        # 20,000 binds while the watcher cannot read: past the 16,384-event queue.
        ns.ops("binds", d, 20_000)
        table, seen = await follow_until_equal(frames, table, ns)
    resyncs = [f for f in seen if isinstance(f, Resync)]
    assert [r.reason for r in resyncs] == ["overflow"]
    assert any(isinstance(f, Event) and f.via == "resync" for f in seen)
    assert len(table) >= 20_000


async def test_snapshot_while_churning_never_loses_or_doubles(private_ns: PrivateNs) -> None:
    ns = private_ns
    d = ns.path("d")
    ns.mkdir(d)
    churn = ns.popen_ops("churn", d, 20_000)
    try:
        await anyio.sleep(0.2)  # the churn is under way when the watch starts
        async with watch(source="fanotify", ns=ns.pid, snapshot=True) as frames:
            snap, _ready = await next_frames(frames, 2)
            assert isinstance(snap, Snapshot)
            table = apply_frame(MountTable(), snap)
            while churn.poll() is None:
                with anyio.move_on_after(0.1):
                    while True:
                        frame = await anext(frames)
                        if isinstance(frame, Event):
                            k = frame.mount.key
                            if frame.action == "mount":
                                assert k not in table, f"mount {k} reported twice"
                            elif frame.action == "umount":
                                assert k in table, f"umount of {k}, never reported"
                        table = apply_frame(table, frame)
            assert churn.returncode == 0
            await follow_until_equal(frames, table, ns)
    finally:
        churn.kill()
        churn.wait()


async def test_namespace_end(private_ns: PrivateNs) -> None:
    ns = private_ns
    async with watch(source="fanotify", ns=ns.pid) as frames:
        await next_frames(frames, 1)
        ns.close()  # its only process exits: the namespace is freed
        got: list[Frame] = []
        with anyio.fail_after(10):
            async for frame in frames:
                got.append(frame)
    assert isinstance(got[-1], End)
    assert "freed" in got[-1].reason
    assert all(isinstance(f, Event) and f.action == "umount" for f in got[:-1])


async def test_remount_and_propagation_sweep(private_ns: PrivateNs) -> None:
    """fanotify reports neither: the POLLPRI sweep does, without a mount to trigger it."""
    ns = private_ns
    a, b = ns.path("a"), ns.path("b")
    ns.mkdir(a, b)
    ns.run("mount", "-t", "tmpfs", "-o", "size=1m", "ta", a)
    ns.run("mount", "-t", "tmpfs", "tb", b)
    async with watch(source="fanotify", ns=ns.pid) as frames:
        await next_frames(frames, 1)
        ns.run("mount", "-o", "remount,size=2m", a)
        [ev] = await next_frames(frames, 1)
        assert isinstance(ev, Event)
        assert (ev.action, ev.via, ev.mount.target) == ("remount", "fanotify", ev.old.target)  # type: ignore[union-attr]
        assert ev.mount.fs_options == "rw,size=2048k"
        # make-shared raises no POLLPRI: it is seen by the next sweep, as its own event.
        ns.run("mount", "--make-shared", b)
        ns.run("mount", "-o", "remount,bind,ro", a)
        got = await next_frames(frames, 2)
        kinds = sorted((f.action, f.mount.source) for f in got if isinstance(f, Event))
        assert kinds == [("propagation", "tb"), ("remount", "ta")]


def test_auto_falls_back_and_says_why() -> None:
    """Without CAP_SYS_ADMIN, fanotify mount marks are refused: auto says so and uses
    listmount (listmount and statmount of one's own namespace need no privilege)."""
    from amountd.model import decode_json

    from ..conftest import ROOT

    if not ROOT:
        pytest.skip("needs root to drop to another user")
    res = run_cli("watch", "--json", "--timeout", "0.3", user=65534)
    assert res.returncode == 0, res.stderr
    ready = decode_json(res.stdout.splitlines()[0])
    assert isinstance(ready, Ready)
    assert ready.source == "listmount"
    assert ready.reason is not None
    assert "fanotify" in ready.reason
    res = run_cli("watch", "--source", "fanotify", "--timeout", "0.3", user=65534)
    assert res.returncode == 1
    err = res.stderr.decode()
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "root" in err or "CAP_SYS_ADMIN" in err


def test_auto_is_fanotify_here_and_unlimited_queue_for_root(private_ns: PrivateNs) -> None:
    from amountd.model import decode_json

    res = run_cli("watch", "--json", "--ns", str(private_ns.pid), "--timeout", "0.3")
    ready = decode_json(res.stdout.splitlines()[0])
    assert isinstance(ready, Ready)
    assert (ready.source, ready.reason) == ("fanotify", None)
    res = run_cli(
        "watch", "--json", "--ns", str(private_ns.pid), "--timeout", "0.3", "--unlimited-queue"
    )
    assert res.returncode == 0, res.stderr
    assert decode_json(res.stdout.splitlines()[0]) == ready


async def test_remounts_right_after_a_mount_are_reported(private_ns: PrivateNs) -> None:
    """A remount's POLLPRI must not be taken as explained by the mount just before it."""
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    async with watch(source="fanotify", ns=ns.pid) as frames:
        await next_frames(frames, 1)
        ns.run("mount", "-t", "tmpfs", "w", a)
        [ev] = await next_frames(frames, 1)
        assert isinstance(ev, Event)
        assert ev.action == "mount"
        for opts, want in (("remount,bind,ro", "ro,relatime"), ("remount,bind,rw", "rw,relatime")):
            ns.run("mount", "-o", opts, a)
            [ev] = await next_frames(frames, 1, timeout=5)
            assert isinstance(ev, Event)
            assert (ev.action, ev.mount.options) == ("remount", want)
        ns.run("umount", a)
        [ev] = await next_frames(frames, 1)
        assert isinstance(ev, Event)
        assert ev.action == "umount"


async def test_a_consumers_exception_comes_out_as_itself(private_ns: PrivateNs) -> None:
    class Mine(Exception):
        pass

    with pytest.raises(Mine):
        async with watch(source="fanotify", ns=private_ns.pid) as frames:
            await next_frames(frames, 1)
            raise Mine


@pytest.mark.parametrize("source", ["fanotify", "mountinfo"])
async def test_subtree_watch_started_during_churn_has_no_gap(
    private_ns: PrivateNs, source: str
) -> None:
    """--under PATH, started while mounts come and go below PATH (and outside it): the
    snapshot plus the stream is the subtree, with nothing lost and nothing doubled."""
    from amountd.filter import Filter, filter_mounts
    from amountd.model import fspath

    ns = private_ns
    inside, outside = ns.path("in"), ns.path("out")
    ns.mkdir(inside, outside)
    ns.run("mount", "-t", "tmpfs", "box", inside)  # the subtree's own root, then churn below
    churn_in = ns.popen_ops("churn", inside, 4_000)
    churn_out = ns.popen_ops("churn", outside, 4_000)
    flt = Filter(under=fspath(inside))
    try:
        await anyio.sleep(0.1)
        async with watch(source=source, ns=ns.pid, snapshot=True, filter=flt) as frames:
            snap, _ = await next_frames(frames, 2)
            assert isinstance(snap, Snapshot)
            table = apply_frame(MountTable(), snap)
            while churn_in.poll() is None or churn_out.poll() is None:
                with anyio.move_on_after(0.1):
                    while True:
                        frame = await anext(frames)
                        if isinstance(frame, Event) and frame.mount.target is not None:
                            # (a mount gone before it could be described has no target:
                            # it passes every filter, so its umount can pair with it)
                            assert frame.mount.target.startswith(str(fspath(inside)))
                            if source == "fanotify" and frame.action == "mount":
                                assert frame.mount.key not in table, "doubled"
                        table = apply_frame(table, frame)
            assert (churn_in.returncode, churn_out.returncode) == (0, 0)

            def want() -> MountTable:
                if source == "fanotify":
                    return MountTable(filter_mounts(flt, kernel_table(ns)))
                from amountd.mountinfo import parse_mountinfo

                ns_id = resolve_ns(ns.pid).ns_id
                return MountTable(filter_mounts(flt, parse_mountinfo(ns.mountinfo(), ns_id=ns_id)))

            with anyio.move_on_after(20):
                while table != want():
                    with anyio.move_on_after(0.3):
                        while True:
                            table = apply_frame(table, await anext(frames))
            final = want()
            diffs = [
                (k, table.get(k), final.get(k))
                for k in set(table.keys()) | set(final.keys())
                if table.get(k) != final.get(k)
            ]
            assert not diffs, diffs[:3]
    finally:
        for p in (churn_in, churn_out):
            p.kill()
            p.wait()

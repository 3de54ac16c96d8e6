"""Many mount namespaces in one server: frames carry their namespace, one namespace's
`end` is an ordinary frame, subscribers choose namespaces, and new namespaces are
picked up (the pure parts without a kernel; the server as a process over private
namespaces; and a container-like scenario of 50 churned namespaces)."""

from __future__ import annotations

import errno
import json
import random
import subprocess
import sys
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path

import anyio
import msgspec
import pytest

from amountd.broker import Broker, Subscription
from amountd.filter import Filter, filter_event, filter_mounts
from amountd.model import (
    Action,
    End,
    Event,
    Frame,
    Mount,
    Ready,
    Resync,
    Snapshot,
    Via,
    decode_json,
    encode_json,
    fspath,
)
from amountd.mountinfo import parse_mountinfo
from amountd.ns import Namespace
from amountd.protocol import FrameReader, SubscribeRequest, parse_request
from amountd.sources import multi
from amountd.sources.base import Change, Source
from amountd.sources.multi import MultiSource, _Sub
from amountd.table import MountTable, apply_frame

from .conftest import HAVE_TOOLS, ROOT, PrivateNs, run_cli
from .multihelp import RawSub, Serve, kernel_table, ns_id_of, wait_for

U = 2**31  # unique mount IDs start above the 32-bit ones


def mnt(ns_id: int | None, key: int, target: str = "/x", *, legacy: bool = False) -> Mount:
    if legacy:
        return Mount(legacy_id=key, ns_id=ns_id, target=fspath(target), fstype="tmpfs")
    return Mount(id=key, ns_id=ns_id, target=fspath(target), fstype="tmpfs")


def ev(m: Mount, action: Action = "mount", via: Via = "fanotify") -> Event:
    return Event(seq=0, time=0.0, action=action, via=via, mount=m)


# --- frames, filter, broker: no kernel ---------------------------------------------------


def test_resync_and_end_carry_ns_id_and_old_frames_still_decode() -> None:
    assert encode_json(End(reason="x")) == b'{"type":"end","reason":"x"}'  # unchanged
    assert encode_json(Resync(seq=3, reason="overflow")) == (
        b'{"type":"resync","seq":3,"reason":"overflow"}'
    )
    end = End(reason="mount namespace 7 was freed", ns_id=7)
    assert decode_json(encode_json(end)) == end
    assert decode_json(b'{"type":"end","reason":"x"}') == End(reason="x", ns_id=None)
    r = Resync(seq=1, reason="overflow", ns_id=9)
    assert decode_json(encode_json(r)) == r


def test_filter_by_namespace() -> None:
    a, b, unknown = mnt(1, U + 1), mnt(2, U + 2), mnt(None, U + 3)
    assert Filter().is_empty and not Filter(namespaces=[]).is_empty
    assert filter_mounts(Filter(namespaces=[1]), [a, b, unknown]) == [a]
    assert filter_mounts(Filter(namespaces=[]), [a, b]) == []  # a list is exactly those
    assert filter_mounts(Filter(namespaces=None), [a, b]) == [a, b]
    f = Filter(namespaces=[2], fstypes=["tmpfs"])
    assert filter_event(f, ev(a)) is None
    assert filter_event(f, ev(b)) is not None
    assert filter_event(f, ev(unknown)) is None  # an unknown namespace is not a listed one
    assert f.ns_matches(2) and not f.ns_matches(1) and not f.ns_matches(None)
    req = parse_request(b'{"type":"subscribe","version":1,"filter":{"namespaces":[5],"pids":[1]}}')
    assert req.filter.namespaces == [5] and req.filter.pids == [1]


async def _drain(sub: Subscription) -> list[Frame]:
    reader = FrameReader(sub.format)
    out: list[Frame] = []
    with anyio.move_on_after(0.2):
        while True:
            try:
                out += reader.feed(await sub.next_chunk())
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                break
    return out


@pytest.mark.anyio
async def test_broker_delivers_one_namespace_end_as_an_ordinary_frame() -> None:
    broker = Broker(table=list)
    everything = broker.subscribe(SubscribeRequest())
    only2 = broker.subscribe(SubscribeRequest(filter=Filter(namespaces=[2])))
    first = broker.publish(ev(mnt(1, U + 1)))
    broker.publish(ev(mnt(2, U + 2)))
    broker.publish(Resync(seq=0, reason="overflow", ns_id=1))
    broker.publish(ev(mnt(1, U + 1), "umount"))
    broker.publish(End(reason="mount namespace 1 was freed", ns_id=1))
    broker.publish(ev(mnt(2, U + 3)))
    assert not broker.ended
    got = await _drain(everything)
    assert [type(f).__name__ for f in got] == [
        "Ready", "Event", "Event", "Resync", "Event", "End", "Event"
    ]  # fmt: skip
    assert got[5] == End(reason="mount namespace 1 was freed", ns_id=1)
    got2 = await _drain(only2)
    assert [type(f) for f in got2] == [Ready, Event, Event]
    assert all(f.mount.ns_id == 2 for f in got2 if isinstance(f, Event))
    assert not everything.finished and not only2.finished
    # Resuming: the ring replays the numbered frames, and the namespace's `end` (kept
    # beside the ring: it has no seq) comes in its place, after the umount before it.
    resumed = broker.subscribe(SubscribeRequest(since=first))
    replayed = await _drain(resumed)
    assert [type(f) for f in replayed] == [Ready, Event, Resync, Event, End, Event]
    assert replayed[4] == End(reason="mount namespace 1 was freed", ns_id=1)
    # ...but not to those who do not see namespace 1, nor after it (since = its last frame
    # is a resume that may or may not have seen it: it comes again, and a client that
    # already has it drops it; see the client).
    assert [type(f) for f in await _drain(broker.subscribe(SubscribeRequest(
        since=first, filter=Filter(namespaces=[2]))))] == [Ready, Event, Event]  # fmt: skip
    assert [type(f) for f in await _drain(broker.subscribe(SubscribeRequest(
        since=broker.last_seq)))] == [Ready]  # fmt: skip
    # An `end` without ns_id is the server stopping: every stream ends.
    broker.publish(End(reason="stopping"))
    assert broker.ended
    for sub in (everything, only2, resumed):
        assert await _drain(sub) == [End(reason="stopping")]
        assert sub.finished


@pytest.mark.anyio
async def test_a_subscriber_that_lagged_past_a_namespaces_end_still_gets_it() -> None:
    table = MountTable([mnt(1, U + 1, "/"), mnt(2, U + 2, "/")])
    broker = Broker(table=table.mounts, queue=4)
    slow = broker.subscribe(SubscribeRequest())
    only2 = broker.subscribe(SubscribeRequest(filter=Filter(namespaces=[2])))
    assert [type(f) for f in await _drain(slow)] == [Ready]
    await _drain(only2)
    for i in range(3, 10):  # more than the queue holds
        m = mnt(2, U + i, f"/m{i}")
        table.add(m)
        broker.publish(ev(m))
    table.pop(U + 1)
    broker.publish(ev(mnt(1, U + 1, "/"), "umount"))
    broker.publish(End(reason="mount namespace 1 was freed", ns_id=1))
    got = await _drain(slow)
    assert [type(f) for f in got] == [Resync, Snapshot, End]
    assert got[2] == End(reason="mount namespace 1 was freed", ns_id=1)
    snap = got[1]
    assert isinstance(snap, Snapshot) and all(m.ns_id == 2 for m in snap.mounts)
    # Only once: from here on it is live again.
    broker.publish(ev(mnt(2, U + 20, "/z")))
    assert [type(f) for f in await _drain(slow)] == [Event]
    # Another that lagged but does not see namespace 1 gets no `end` (and its snapshot,
    # taken now, already holds /z).
    assert [type(f) for f in await _drain(only2)] == [Resync, Snapshot]
    # A `since` the ring no longer holds: resync, snapshot, ready, and the `end`s after it;
    # a fresh snapshot subscriber knew nothing of namespace 1, so gets no `end`.
    ring = Broker(table=table.mounts, ring=2, seq=100)
    ring.publish(ev(mnt(2, U + 21, "/y")))
    ring.publish(End(reason="gone", ns_id=1))
    for i in range(3):
        ring.publish(ev(mnt(2, U + 30 + i, "/w")))
    expired = await _drain(ring.subscribe(SubscribeRequest(since=100)))
    assert [type(f) for f in expired] == [Resync, Snapshot, Ready, End]
    fresh = await _drain(ring.subscribe(SubscribeRequest(snapshot=True)))
    assert [type(f) for f in fresh] == [Snapshot, Ready]
    ahead = await _drain(ring.subscribe(SubscribeRequest(since=10**9)))
    assert [type(f) for f in ahead] == [Resync, Snapshot, Ready]


# --- MultiSource's merging, with scripted sub-sources --------------------------------------


class Scripted(Source):
    """A sub-source whose batches are given (and applied to its table as a real one's are)."""

    kind = "mountinfo"

    def __init__(self, ns: Namespace, mounts: list[Mount], batches: list[list[Change]]) -> None:
        super().__init__(ns)
        self.table = MountTable(mounts)
        self.batches = batches
        self.closed = False

    async def arm(self) -> None:
        pass

    async def changes(self) -> AsyncGenerator[list[Change], None]:
        for batch in self.batches:
            await anyio.sleep(0.01)
            for f in batch:
                if isinstance(f, Event):
                    apply_frame(self.table, f)
            yield batch
            if any(isinstance(f, End) for f in batch):
                return

    def close(self) -> None:
        self.closed = True


def nsp(ns_id: int) -> Namespace:
    return Namespace(path=None, pid=None, ns_id=ns_id, inode=ns_id, dev=1)


def test_a_reused_32_bit_id_moves_to_the_namespace_that_reports_it() -> None:
    """mountinfo IDs come from one pool for all namespaces: B's new mount 100 means A's
    mount 100 is gone, even if A has not said so yet."""
    a_old = mnt(10, 100, "/a", legacy=True)
    a_src = Scripted(nsp(10), [a_old, mnt(10, 1, "/", legacy=True)], [])
    b_src = Scripted(nsp(20), [mnt(20, 2, "/", legacy=True)], [])
    src = MultiSource([nsp(10), nsp(20)])
    sub_a, sub_b = _Sub(nsp(10), 10, a_src), _Sub(nsp(20), 20, b_src)
    src._adopt(sub_a)
    src._adopt(sub_b)
    consumer = MountTable(src.table)
    b_new = mnt(20, 100, "/b", legacy=True)
    out = src._absorb(sub_b, [ev(b_new, via="mountinfo")])
    assert [(e.action, e.mount.ns_id) for e in out if isinstance(e, Event)] == [
        ("umount", 10),
        ("mount", 20),
    ]
    assert 100 not in a_src.table  # so A's next diff does not report it again
    # A's late report about its old mount 100 is dropped: it was reported gone.
    late = src._absorb(sub_a, [ev(a_old, "remount", "mountinfo"), ev(a_old, "umount", "mountinfo")])
    assert late == []
    for f in out:
        consumer = apply_frame(consumer, f)
    assert consumer == src.table
    assert src.table_of(20) == MountTable([mnt(20, 2, "/", legacy=True), b_new])
    # A ends (a mountinfo watch: its process exited) with a mount still listed: it goes
    # as an umount before A's end; the stream goes on until B ends too.
    out = src._absorb(sub_a, [End(reason="namespace of pid 1 ended")])
    assert [type(f) for f in out] == [Event, End]
    gone = out[0]
    assert isinstance(gone, Event)
    assert (gone.action, gone.via, gone.mount) == ("umount", "resync", mnt(10, 1, "/", legacy=True))
    assert out[1] == End(reason="namespace of pid 1 ended", ns_id=10)
    for f in out:
        consumer = apply_frame(consumer, f)
    out = src._absorb(sub_b, [End(reason="gone")])
    assert [f for f in out if isinstance(f, End)] == [
        End(reason="gone", ns_id=20),
        End(reason="every watched mount namespace has ended"),
    ]
    for f in out:
        consumer = apply_frame(consumer, f)
    assert consumer == src.table == MountTable()
    src.close()


@pytest.mark.anyio
async def test_merged_stream_ends_when_every_listed_namespace_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripts = {
        10: Scripted(
            nsp(10),
            [mnt(10, U + 1, "/")],
            [
                [ev(mnt(10, U + 5, "/m"))],
                [Resync(seq=0, reason="overflow")],
                [ev(mnt(10, U + 5, "/m"), "umount"), ev(mnt(10, U + 1, "/"), "umount")],
                [End(reason="mount namespace 10 was freed")],
            ],
        ),
        20: Scripted(
            nsp(20), [mnt(20, U + 2, "/")], [[ev(mnt(20, U + 6, "/n"))], [End(reason="gone")]]
        ),
    }

    async def fake_open(
        kind: str, ns: Namespace, *, unlimited_queue: bool = False, sweep: object = None
    ) -> Source:
        assert ns.ns_id is not None
        return scripts[ns.ns_id]

    monkeypatch.setattr(multi, "open_one", fake_open)
    got: list[Change] = []
    async with MultiSource([nsp(10), nsp(20)]) as src:
        consumer = MountTable(src.table)
        assert src.ns_id is None and src.ns_ids == [10, 20]
        with anyio.fail_after(10):
            async for batch in src.changes():
                got += batch
                for f in batch:
                    consumer = apply_frame(consumer, f)
                assert consumer == src.table  # as of every batch
    assert scripts[10].closed and scripts[20].closed
    ends = [f for f in got if isinstance(f, End)]
    assert sorted(e.ns_id or 0 for e in ends[:2]) == [10, 20]
    assert ends[2] == End(reason="every watched mount namespace has ended")
    assert got[-1] is ends[2]
    assert [f for f in got if isinstance(f, Resync)] == [Resync(seq=0, reason="overflow", ns_id=10)]
    # 20 ended with its mounts still listed (as a mountinfo watch does): they went
    # first, as umounts learnt by comparing tables.
    gone = [f for f in got if isinstance(f, Event) and f.via == "resync"]
    assert sorted((e.action, e.mount.target) for e in gone) == [("umount", "/"), ("umount", "/n")]
    assert consumer == MountTable()


class Broken(Scripted):
    """A fanotify-like sub-source that fails after its batches, as a broken fd would."""

    kind = "fanotify"

    async def changes(self) -> AsyncGenerator[list[Change], None]:
        async for batch in super().changes():
            yield batch
        raise OSError(errno.EBADF, "Bad file descriptor")


class Fan(Scripted):
    kind = "fanotify"


async def _consume(src: MultiSource) -> tuple[list[Change], MountTable]:
    """Every frame of the merged stream, applied to a consumer's table, which must equal
    the union after every batch."""
    got: list[Change] = []
    consumer = MountTable(src.table)
    with anyio.fail_after(10):
        async for batch in src.changes():
            got += batch
            for f in batch:
                consumer = apply_frame(consumer, f)
            assert consumer == src.table
    return got, consumer


@pytest.mark.anyio
async def test_a_failing_sub_source_is_renewed_not_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sub-source that fails does not end its namespace (nor the server): a fresh one
    takes over, and the consumer gets `resync` and the difference."""
    opened: list[Source] = [
        Broken(nsp(10), [mnt(10, U + 1, "/"), mnt(10, U + 2, "/m")], [[ev(mnt(10, U + 3, "/k"))]]),
        Fan(
            nsp(10),
            [mnt(10, U + 1, "/"), mnt(10, U + 3, "/k"), mnt(10, U + 4, "/n")],
            [[ev(mnt(10, U + 5, "/p"))], [End(reason="mount namespace 10 was freed")]],
        ),
    ]
    queue = list(opened)

    async def fake_open(
        kind: str, ns: Namespace, *, unlimited_queue: bool = False, sweep: object = None
    ) -> Source:
        return queue.pop(0)

    monkeypatch.setattr(multi, "open_one", fake_open)
    monkeypatch.setattr(multi, "locate", lambda ns: ns)
    monkeypatch.setattr(multi, "_CALM", 0.0)  # no backoff for a first failure
    async with MultiSource([nsp(10)]) as src:
        got, consumer = await _consume(src)
    assert not queue and all(isinstance(s, Scripted) and s.closed for s in opened)
    assert [(type(f).__name__, getattr(f, "action", None)) for f in got] == [
        ("Event", "mount"), ("Resync", None), ("Event", "umount"), ("Event", "mount"),
        ("Event", "mount"), ("Event", "umount"), ("Event", "umount"), ("Event", "umount"),
        ("Event", "umount"), ("End", None), ("End", None),
    ]  # fmt: skip
    assert got[1] == Resync(seq=0, reason="error", ns_id=10)
    assert [(f.mount.target, f.via) for f in got[2:4] if isinstance(f, Event)] == [
        ("/m", "resync"),
        ("/n", "resync"),
    ]
    assert next(f for f in got if isinstance(f, End)) == End(
        reason="mount namespace 10 was freed", ns_id=10
    )
    assert consumer == MountTable()


@pytest.mark.anyio
async def test_a_mountinfo_watch_follows_its_namespace_to_another_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watched process exits but the namespace lives on: the watch goes on through
    another process of it (no `end`, no `resync`), until no process is left."""
    first = Scripted(nsp(10), [mnt(10, 1, "/", legacy=True)], [[End(reason="pid 5 exited")]])
    second = Scripted(
        nsp(10),
        [mnt(10, 1, "/", legacy=True), mnt(10, 7, "/q", legacy=True)],
        [[End(reason="pid 6 exited")]],
    )
    queue: list[Source] = [first, second]
    opened_with: list[Namespace] = []

    async def fake_open(
        kind: str, ns: Namespace, *, unlimited_queue: bool = False, sweep: object = None
    ) -> Source:
        opened_with.append(ns)
        return queue.pop(0)

    lives = [msgspec.structs.replace(nsp(10), pid=6), None]
    monkeypatch.setattr(multi, "open_one", fake_open)
    monkeypatch.setattr(multi, "locate", lambda ns: lives.pop(0))
    async with MultiSource([nsp(10)], source="mountinfo") as src:
        got, consumer = await _consume(src)
    assert [ns.pid for ns in opened_with] == [None, 6]
    assert not any(isinstance(f, Resync) for f in got)
    q = got[0]
    assert isinstance(q, Event)
    assert (q.action, q.mount.target, q.via) == ("mount", "/q", "mountinfo")
    ends = [f for f in got if isinstance(f, End)]
    assert ends[0] == End(reason="pid 6 exited", ns_id=10)  # once, when no process is left
    assert len(ends) == 2 and consumer == MountTable()


def test_serve_refuses_ns_with_all_namespaces(tmp_path: Path) -> None:
    res = run_cli("serve", "--unix", str(tmp_path / "s"), "--ns", "1", "--all-namespaces")
    assert res.returncode == 2
    assert "exclude each other" in res.stderr.decode()


# --- the server over private namespaces ------------------------------------------------------

MakeNs = Callable[[int], list[PrivateNs]]


@pytest.fixture
def make_ns(tmp_path: Path) -> Iterator[MakeNs]:
    """make_ns(n): n private namespaces, each with a tmpfs scratch area; all killed after."""
    if not (ROOT and HAVE_TOOLS):
        pytest.skip("needs root and util-linux unshare/nsenter/mount for private namespaces")
    made: list[PrivateNs] = []

    def make(n: int) -> list[PrivateNs]:
        out = []
        for _ in range(n):
            base = tmp_path / f"ns{len(made)}"
            base.mkdir()
            ns = PrivateNs(base)
            made.append(ns)
            out.append(ns)
        return out

    yield make
    for ns in made:
        ns.close()


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
    srv = serve_with("--all-namespaces")
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
        script = str(Path(__file__).with_name("nschurn.py"))
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
    from amountd.model import Event

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

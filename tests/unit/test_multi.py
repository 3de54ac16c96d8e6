"""Many mount namespaces in one stream, without a kernel: frames carry their namespace,
one namespace's `end` is an ordinary frame, and MultiSource merges scripted sub-sources."""

from __future__ import annotations

import errno
from collections.abc import AsyncGenerator

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
)
from amountd.ns import Namespace
from amountd.protocol import FrameReader, SubscribeRequest, parse_request
from amountd.sources import multi
from amountd.sources.base import Change, Source
from amountd.sources.multi import MultiSource, _Sub
from amountd.table import MountTable, apply_frame

from ..factories import event, mount

U = 2**31  # unique mount IDs start above the 32-bit ones


def mnt(ns_id: int | None, key: int, target: str = "/x", *, legacy: bool = False) -> Mount:
    return mount(key, target, None, ids="legacy" if legacy else "unique", full=False, ns_id=ns_id)


def ev(m: Mount, action: Action = "mount", via: Via = "fanotify") -> Event:
    return event(action, m, seq=0, time=0.0, via=via)


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
    # What is queued now: next_chunk() hands ready frames over with no checkpoint, so
    # an expired deadline stops it only where it would wait (publish() is synchronous).
    with anyio.move_on_after(0):
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

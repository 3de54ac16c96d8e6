"""The broker: fan-out in order, slow subscribers, `since`, filters, End, the invariant."""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import anyio.lowlevel
import msgspec
import pytest

from amountd.broker import Broker, Subscription
from amountd.filter import Filter, filter_mounts
from amountd.model import (
    End,
    Event,
    Frame,
    Mount,
    Ready,
    Resync,
    Snapshot,
    fspath,
)
from amountd.protocol import Format, FrameReader, SubscribeRequest
from amountd.table import MountTable, apply_frame

from ..factories import event, mount

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def mnt(key: int, target: str, fstype: str = "tmpfs", options: str = "rw") -> Mount:
    return mount(key, target, legacy_id=key % 1000, source=fstype, fstype=fstype, options=options)


class Source:
    """A publisher that keeps its table as the broker expects: update, then publish."""

    def __init__(self, *, queue: int = 1024, ring: int = 65536) -> None:
        self.table = MountTable([mnt(1, "/", "ext4")])
        self.broker = Broker(ring=ring, queue=queue, table=self.mounts, ns_id=77, source="test")

    def mounts(self) -> list[Mount]:
        return self.table.mounts()

    def emit(self, e: Event) -> int:
        self.table = apply_frame(self.table, e)
        return self.broker.publish(e)

    def mount(self, key: int, target: str, fstype: str = "tmpfs") -> int:
        return self.emit(event("mount", mnt(key, target, fstype)))

    def umount(self, key: int) -> int:
        m = self.table[key]
        return self.emit(event("umount", m))


def read_now(sub: Subscription) -> list[Frame]:
    """What a subscriber can read right now, without waiting."""
    chunk = sub._collect()
    return [] if chunk is None else FrameReader(sub.format).feed(chunk)


async def read_all(sub: Subscription) -> list[Frame]:
    reader = FrameReader(sub.format)
    out: list[Frame] = []
    async for chunk in sub:
        out += reader.feed(chunk)
    reader.feed_eof()
    return out


def seqs(frames: list[Frame]) -> list[int]:
    return [f.seq for f in frames if isinstance(f, Event)]


def kinds(frames: list[Frame]) -> list[str]:
    return [type(f).__name__ for f in frames]


# --- fan-out --------------------------------------------------------------------------


async def test_many_subscribers_receive_every_frame_in_order() -> None:
    src = Source()
    n = 500
    results: dict[int, list[Frame]] = {}

    async def consume(i: int, sub: Subscription) -> None:
        results[i] = await read_all(sub)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            fmt: Format = "msgpack" if i % 2 else "json"
            tg.start_soon(consume, i, src.broker.subscribe(SubscribeRequest(format=fmt)))
        for k in range(n):
            src.mount(1000 + k, f"/m/{k}")
            if k % 7 == 0:
                await anyio.lowlevel.checkpoint()
        src.broker.publish(End(reason="done"))
    assert len(results) == 20
    for frames in results.values():
        assert frames[0] == Ready(source="test", ns_id=77, reason=None)
        assert seqs(frames) == list(range(1, n + 1))
        assert frames[-1] == End(reason="done")
        assert len(frames) == n + 2
    assert src.broker.subscribers == 0


async def test_encoded_once_and_shared() -> None:
    src = Source()
    subs = [src.broker.subscribe(SubscribeRequest(format="msgpack")) for _ in range(3)]
    js = src.broker.subscribe(SubscribeRequest(format="json"))
    for s in [*subs, js]:
        read_now(s)  # ready
    src.mount(10, "/x")
    chunks = [await s.next_chunk() for s in subs]
    assert chunks[0] is chunks[1] is chunks[2]
    assert (await js.next_chunk()).startswith(b'{"type":"event"')


async def test_queued_frames_are_coalesced() -> None:
    src = Source()
    sub = src.broker.subscribe()
    for k in range(5):
        src.mount(10 + k, f"/x{k}")
    chunk = await sub.next_chunk()
    frames = FrameReader("json").feed(chunk)
    assert kinds(frames) == ["Ready"] + ["Event"] * 5
    assert seqs(frames) == [1, 2, 3, 4, 5]


async def test_seq_only_grows_and_is_assigned() -> None:
    src = Source()
    assert src.broker.last_seq == 0
    sub = src.broker.subscribe()
    e = msgspec.structs.replace(event("mount", mnt(5, "/a")), seq=999)
    assert src.emit(e) == 1
    assert e.seq == 999  # frames are frozen: the broker numbers a copy
    r = Resync(seq=0, reason="overflow")
    assert src.broker.publish(r) == 2
    assert r.seq == 0
    assert src.broker.last_seq == 2
    got = read_now(sub)
    assert got[1:] == [msgspec.structs.replace(e, seq=1), Resync(seq=2, reason="overflow")]
    with pytest.raises(TypeError):
        src.broker.publish(Ready(source="x", ns_id=None))  # type: ignore[arg-type]


async def test_snapshot_then_ready_then_live() -> None:
    src = Source()
    src.mount(2, "/a")
    sub = src.broker.subscribe(SubscribeRequest(snapshot=True))
    src.mount(3, "/b")  # published before the first read: already in the snapshot
    first = read_now(sub)
    assert kinds(first) == ["Snapshot", "Ready"]
    snap = first[0]
    assert isinstance(snap, Snapshot)
    assert snap.seq == 2
    assert snap.ns_id == 77
    assert [m.key for m in snap.mounts] == [1, 2, 3]
    src.mount(4, "/c")
    assert seqs(read_now(sub)) == [3]


async def test_subscribe_misses_nothing_published_after_it() -> None:
    src = Source()
    src.mount(2, "/a")
    sub = src.broker.subscribe()
    src.mount(3, "/b")
    frames = read_now(sub)
    assert kinds(frames) == ["Ready", "Event"]
    assert seqs(frames) == [2]


# --- slow subscribers -------------------------------------------------------------------


async def test_slow_subscriber_gets_resync_and_snapshot_others_unaffected() -> None:
    src = Source(queue=8)
    slow = src.broker.subscribe()
    fast = src.broker.subscribe(SubscribeRequest(format="msgpack"))
    got: list[Frame] = []

    async def consume() -> None:
        got.extend(await read_all(fast))

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        for k in range(200):
            src.mount(100 + k, f"/m{k}")  # sync: the publisher cannot block
            if k % 4 == 3:
                await anyio.wait_all_tasks_blocked()  # let the fast one drain
        assert slow.queued <= 8
        st = slow.stats()
        assert st.lagged
        assert st.drops >= 1
        assert fast.stats().drops == 0
        assert src.broker.stats().drops == st.drops

        frames = read_now(slow)
        assert kinds(frames) == ["Resync", "Snapshot", "Ready"]
        resync, snap = frames[0], frames[1]
        assert isinstance(resync, Resync)
        assert isinstance(snap, Snapshot)
        assert resync == Resync(seq=200, reason="lagged")
        assert snap.seq == 200
        assert MountTable(snap.mounts) == src.table
        assert not slow.stats().lagged
        src.mount(999, "/after")
        assert seqs(read_now(slow)) == [201]
        src.broker.publish(End(reason="done"))
    assert seqs(got) == list(range(1, 202))


async def test_lag_while_not_reading_is_bounded() -> None:
    src = Source(queue=16)
    sub = src.broker.subscribe()
    for k in range(10_000):
        src.mount(100 + k, f"/m{k}")
        assert sub.queued <= 16
    assert sub.stats().lag == 10_000


# --- since ------------------------------------------------------------------------------


async def test_since_replays_exactly() -> None:
    src = Source()
    for k in range(10):
        src.mount(100 + k, f"/m{k}")
    sub = src.broker.subscribe(SubscribeRequest(since=4, snapshot=True))
    src.mount(200, "/live")
    frames = read_now(sub)
    assert kinds(frames) == ["Ready"] + ["Event"] * 7
    assert seqs(frames) == list(range(5, 12))


@pytest.mark.parametrize(("since", "replayed"), [(10, []), (0, list(range(1, 11)))])
async def test_since_edges(since: int, replayed: list[int]) -> None:
    src = Source()
    for k in range(10):
        src.mount(100 + k, f"/m{k}")
    sub = src.broker.subscribe(SubscribeRequest(since=since))
    frames = read_now(sub)
    assert kinds(frames)[0] == "Ready"
    assert seqs(frames) == replayed


@pytest.mark.parametrize("since", [0, 3, 11, 10**9])
async def test_since_expired(since: int) -> None:
    src = Source(ring=6)
    for k in range(10):
        src.mount(100 + k, f"/m{k}")
    sub = src.broker.subscribe(SubscribeRequest(since=since))
    src.mount(300, "/x")
    frames = read_now(sub)
    assert kinds(frames) == ["Resync", "Snapshot", "Ready"]
    assert frames[0] == Resync(seq=11, reason="since-expired")
    snap = frames[1]
    assert isinstance(snap, Snapshot)
    assert MountTable(snap.mounts) == src.table
    src.mount(301, "/y")
    assert seqs(read_now(sub)) == [12]


async def test_since_just_inside_ring() -> None:
    src = Source(ring=6)
    for k in range(10):
        src.mount(100 + k, f"/m{k}")  # ring holds 5..10
    frames = read_now(src.broker.subscribe(SubscribeRequest(since=4)))
    assert seqs(frames) == [5, 6, 7, 8, 9, 10]


async def test_long_replay_comes_in_several_chunks() -> None:
    src = Source(queue=4)
    for k in range(10):
        src.mount(100 + k, f"/m{k}")
    sub = src.broker.subscribe(SubscribeRequest(since=0))
    src.mount(500, "/live")
    frames: list[Frame] = []
    for _ in range(4):
        frames += read_now(sub)
    assert seqs(frames) == list(range(1, 12))


# --- filters ----------------------------------------------------------------------------


async def test_filters() -> None:
    src = Source()
    src.mount(2, "/srv/a", "ext4")
    tmp = src.broker.subscribe(SubscribeRequest(snapshot=True, filter=Filter(fstypes=["tmpfs"])))
    under = [
        src.broker.subscribe(SubscribeRequest(snapshot=True, filter=Filter(under=fspath("/srv"))))
        for _ in range(2)
    ]
    only_umount = src.broker.subscribe(SubscribeRequest(filter=Filter(actions=["umount"])))
    snap = read_now(tmp)[0]
    assert isinstance(snap, Snapshot)
    assert snap.mounts == []
    snaps = [read_now(u)[0] for u in under]
    assert isinstance(snaps[0], Snapshot)
    assert [m.key for m in snaps[0].mounts] == [2]
    read_now(only_umount)

    src.mount(3, "/srv/b")  # tmpfs under /srv
    src.mount(4, "/other", "ext4")
    moved = mnt(4, "/srv/c", "ext4")
    src.emit(event("move", moved, src.table[4]))  # into /srv: a mount for `under`
    src.umount(3)

    t = read_now(tmp)
    assert [(e.action, e.seq) for e in t if isinstance(e, Event)] == [("mount", 2), ("umount", 5)]
    chunks = [under[0]._collect(), under[1]._collect()]
    assert chunks[0] is not None
    assert chunks[0] == chunks[1]
    u = FrameReader("json").feed(chunks[0])
    assert [(e.action, e.mount.key, e.old) for e in u if isinstance(e, Event)] == [
        ("mount", 3, None),
        ("mount", 4, None),
        ("umount", 3, None),
    ]
    assert [e.seq for e in read_now(only_umount) if isinstance(e, Event)] == [5]


async def test_filtered_subscribers_share_translated_frames() -> None:
    src = Source()
    src.mount(2, "/out")
    a = src.broker.subscribe(SubscribeRequest(filter=Filter(under=fspath("/in"))))
    b = src.broker.subscribe(SubscribeRequest(filter=Filter(under=fspath("/in"))))
    read_now(a)
    read_now(b)
    src.emit(event("move", mnt(2, "/in/x"), src.table[2]))
    assert a._queue[0] is b._queue[0]
    ca, cb = a._collect(), b._collect()
    assert ca is cb


# --- End, close, stats ------------------------------------------------------------------


async def test_end_terminates_after_draining() -> None:
    src = Source(queue=4)
    lagging = src.broker.subscribe()
    normal = src.broker.subscribe()
    read_now(normal)
    for k in range(6):
        src.mount(100 + k, f"/m{k}")
    read_now(normal)
    src.mount(200, "/last")
    src.broker.publish(End(reason="namespace gone"))
    frames = await read_all(normal)
    assert kinds(frames) == ["Event", "End"]
    frames = await read_all(lagging)
    assert kinds(frames) == ["Resync", "Snapshot", "Ready", "End"]
    assert lagging.finished
    with pytest.raises(anyio.EndOfStream):
        await normal.next_chunk()
    assert src.broker.subscribers == 0
    with pytest.raises(RuntimeError):
        src.mount(300, "/late")
    late = await read_all(src.broker.subscribe(SubscribeRequest(snapshot=True)))
    assert late == [End(reason="namespace gone")]


async def test_end_wakes_a_waiting_subscriber() -> None:
    src = Source()
    sub = src.broker.subscribe(SubscribeRequest(format="msgpack"))
    result: list[Frame] = []

    async def consume() -> None:
        result.extend(await read_all(sub))

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        src.broker.publish(End(reason="stop"))
    assert kinds(result) == ["Ready", "End"]


async def test_close_wakes_and_unregisters() -> None:
    src = Source()
    sub = src.broker.subscribe()
    result: list[Frame] = []

    async def consume() -> None:
        result.extend(await read_all(sub))

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        assert src.broker.subscribers == 1
        sub.close()
    assert kinds(result) == ["Ready"]
    assert src.broker.subscribers == 0
    src.mount(5, "/a")  # publishing to nobody is fine
    with pytest.raises(anyio.ClosedResourceError):
        await sub.next_chunk()


async def test_set_ready_and_stats() -> None:
    src = Source()
    src.broker.set_ready("mountinfo", "fanotify needs CAP_SYS_ADMIN")
    sub = src.broker.subscribe(SubscribeRequest(filter=Filter(fstypes=["tmpfs"])))
    assert read_now(sub) == [
        Ready(source="mountinfo", ns_id=77, reason="fanotify needs CAP_SYS_ADMIN")
    ]
    src.mount(2, "/a")
    src.mount(3, "/b", "ext4")
    st = src.broker.stats()
    assert (st.subscribers, st.published, st.last_seq, st.ring, st.drops) == (1, 2, 2, 2, 0)
    (s,) = st.subscriber
    assert (s.queued, s.lag, s.filtered, s.format, s.delivered) == (1, 2, True, "json", 1)
    read_now(sub)
    assert sub.stats().lag == 0


# --- the invariant ----------------------------------------------------------------------

FILTERS = [
    Filter(),
    Filter(fstypes=["tmpfs"]),
    Filter(under=fspath("/a")),
    Filter(under=fspath("/a"), fstypes=["notmpfs"]),
]


def random_op(rng: random.Random, src: Source, next_key: Callable[[], int]) -> None:
    keys = [m.key for m in src.table if m.key != 1]
    roll = rng.random()
    if not keys or roll < 0.4:
        top = rng.choice("ab")
        key = next_key()
        src.mount(key, f"/{top}/{key}", rng.choice(["tmpfs", "ext4"]))
    elif roll < 0.65:
        src.umount(rng.choice(keys))
    elif roll < 0.85:
        old = src.table[rng.choice(keys)]
        top = rng.choice("ab")
        new = mnt(old.key, f"/{top}/{old.key}", old.fstype or "tmpfs", old.options or "rw")
        src.emit(event("move", new, old))
    elif roll < 0.97:
        old = src.table[rng.choice(keys)]
        opts = "ro" if old.options == "rw" else "rw"
        src.emit(event("remount", mnt(old.key, old.target or "/", old.fstype or "", opts), old))
    else:
        src.broker.publish(Resync(seq=0, reason="overflow"))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_consumers_end_with_the_publishers_table(seed: int) -> None:
    rng = random.Random(seed)
    src = Source(queue=32, ring=200)
    counter = iter(range(2, 10**9))
    for _ in range(50):
        random_op(rng, src, lambda: next(counter))
    tables: dict[int, MountTable] = {}
    consumers: list[tuple[int, Filter, Subscription, bool]] = []
    for i in range(16):
        f = FILTERS[i % len(FILTERS)]
        # half read eagerly, half are slow enough to lag; some resume with `since`
        since = rng.choice([None, 40]) if f.is_empty else None
        req = SubscribeRequest(
            format=rng.choice(["json", "msgpack"]), snapshot=since is None, filter=f, since=since
        )
        consumers.append((i, f, src.broker.subscribe(req), i % 2 == 1))
    at_40 = replay_table(src, 40)

    async def consume(i: int, sub: Subscription, slow: bool) -> None:
        table = MountTable()
        if sub.request.since is not None:
            table = MountTable(filter_mounts(sub.request.filter, at_40))
        reader = FrameReader(sub.format)
        async for chunk in sub:
            for frame in reader.feed(chunk):
                table = apply_frame(table, frame)
            # a slow reader lets 300 frames go by: far more than its queue holds
            target = src.broker.last_seq + 300
            while slow and src.broker.last_seq < target and not src.broker.ended:  # noqa: ASYNC110
                await anyio.sleep(0.001)
        tables[i] = table

    async with anyio.create_task_group() as tg:
        for i, _, sub, slow in consumers:
            tg.start_soon(consume, i, sub, slow)
        for step in range(3000):
            random_op(rng, src, lambda: next(counter))
            if step % 16 == 0:
                await anyio.lowlevel.checkpoint()
        src.broker.publish(End(reason="done"))
    assert len(tables) == len(consumers)
    for i, f, sub, slow in consumers:
        assert tables[i] == MountTable(filter_mounts(f, src.table)), f"consumer {i}"
        if slow:
            assert sub.drops > 0  # the slow ones really went through lag


def replay_table(src: Source, seq: int) -> MountTable:
    """The publisher's table as of `seq`, rebuilt from the ring (test helper)."""
    table = MountTable([mnt(1, "/", "ext4")])
    for item in src.broker._ring:
        if item.seq <= seq and isinstance(item.frame, Event):
            table = apply_frame(table, item.frame)
    return table


async def test_since_replay_is_filtered() -> None:
    src = Source()
    src.mount(2, "/a/x", "ext4")
    src.mount(3, "/b/y")
    src.emit(event("move", mnt(3, "/a/y"), src.table[3]))
    src.umount(2)
    sub = src.broker.subscribe(SubscribeRequest(since=0, filter=Filter(under=fspath("/a"))))
    frames = read_now(sub)
    assert [(e.seq, e.action, e.mount.key) for e in frames if isinstance(e, Event)] == [
        (1, "mount", 2),
        (3, "mount", 3),
        (4, "umount", 2),
    ]

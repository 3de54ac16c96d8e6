"""One published table: the pump publishes the source's batches in slices while the
broker's snapshots come from the source's own table, waiting for an open batch."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anyio
import anyio.lowlevel
import pytest

from amountd.broker import Broker, Subscription
from amountd.model import End, Event, Frame, Resync, Snapshot
from amountd.ns import Namespace
from amountd.protocol import FrameReader, SubscribeRequest
from amountd.serve.pump import Pump
from amountd.sources.base import Change, Source
from amountd.table import MountTable, apply, apply_frame

from ..factories import event, mount

pytestmark = pytest.mark.anyio

NS = Namespace(path=None, pid=None, ns_id=None, inode=0, dev=0)


class Scripted(Source):
    """A source that yields the batches it is given, each applied to its table first
    (the Source contract), then ends."""

    kind = "scripted"

    def __init__(self, batches: list[list[Change]]) -> None:
        super().__init__(NS)
        self.table = MountTable([mount(1, "/", full=False)])
        self.batches = batches
        self.yielded = anyio.Event()

    async def arm(self) -> None:
        pass

    async def changes(self) -> AsyncGenerator[list[Change], None]:
        for batch in self.batches:
            for frame in batch:
                if isinstance(frame, Event):
                    apply(self.table, frame)
            self.yielded.set()
            yield batch
        yield [End(reason="scripted")]

    def close(self) -> None:
        pass


def mounts(first: int, n: int) -> list[Change]:
    return [event("mount", mount(k, f"/m{k}", full=False)) for k in range(first, first + n)]


def rig(src: Scripted, *, queue: int = 1024, step: int = 4) -> tuple[Broker, Pump]:
    broker = Broker(table=src.table.mounts, queue=queue)  # Scripted keeps its table
    return broker, Pump(broker, broker.publish, lambda: None, step=step)


async def read_all(sub: Subscription) -> list[Frame]:
    reader = FrameReader(sub.format)
    out: list[Frame] = []
    async for chunk in sub:
        out += reader.feed(chunk)
    return out


def replay(frames: list[Frame]) -> MountTable:
    table = MountTable()
    for f in frames:
        table = apply_frame(table, f)
    return table


# --- the broker's batch state, alone -------------------------------------------------------


def test_a_batch_opens_and_closes_once() -> None:
    broker = Broker(table=list)
    assert broker.settled
    broker.open_batch()
    assert not broker.settled
    with pytest.raises(RuntimeError, match="open already"):
        broker.open_batch()
    broker.close_batch()
    assert broker.settled
    with pytest.raises(RuntimeError, match="no batch is open"):
        broker.close_batch()


async def test_a_snapshot_waits_for_the_open_batch() -> None:
    """The table is ahead of last_seq while a batch is open: a snapshot taken then
    would hold mounts whose events come after it (applied twice by the client)."""
    table = MountTable([mount(1, "/", full=False)])
    broker = Broker(table=table.mounts)
    batch = mounts(2, 3)
    for ev in batch:
        apply(table, ev)  # the source applied its whole batch before yielding it
    broker.open_batch()
    broker.publish(batch[0])
    sub = broker.subscribe(SubscribeRequest(snapshot=True))
    got: list[Frame] = []
    reader = FrameReader(sub.format)

    async def first_read() -> None:
        got.extend(reader.feed(await sub.next_chunk()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first_read)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        assert got == []  # it waits: nothing, not even `ready`, before the snapshot
        for ev in batch[1:]:
            broker.publish(ev)
        broker.close_batch()
    snap = got[0]
    assert isinstance(snap, Snapshot)
    assert snap.seq == broker.last_seq
    assert {m.target for m in snap.mounts} == {"/", "/m2", "/m3", "/m4"}


async def test_wait_settled_returns_once_the_batch_is_out() -> None:
    broker = Broker(table=list)
    await broker.wait_settled()  # none open: at once
    broker.open_batch()
    done: list[bool] = []

    async def waiter() -> None:
        await broker.wait_settled()
        done.append(True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        assert done == []
        broker.close_batch()
    assert done == [True]


# --- the pump over the one table -----------------------------------------------------------


async def test_subscribers_rebuild_the_sources_table_through_sliced_batches() -> None:
    """Batches longer than the queue, in slices: a subscriber that lags mid-batch, one
    that asks for a snapshot mid-batch and one that reads along all end with the
    source's table, each frame applied once."""
    src = Scripted([mounts(2, 40), mounts(100, 3), mounts(200, 40)])
    broker, pump = rig(src, queue=8, step=4)
    live = broker.subscribe(SubscribeRequest(snapshot=True))
    slow = broker.subscribe(SubscribeRequest())  # reads nothing until the end: lags
    late: list[Subscription] = []
    results: dict[str, list[Frame]] = {}

    async def reader(name: str, sub: Subscription) -> None:
        results[name] = await read_all(sub)

    async def join_mid_batch() -> None:
        await src.yielded.wait()  # the first batch is being published in slices
        sub = broker.subscribe(SubscribeRequest(snapshot=True))
        late.append(sub)
        await reader("late", sub)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:  # the readers end on `end`
            tg.start_soon(reader, "live", live)
            tg.start_soon(join_mid_batch)
            await pump.run(src, anyio.CancelScope())  # the scope it cancels when done
            tg.start_soon(reader, "slow", slow)
    assert pump.failure is None
    want = src.table
    assert len(want) == 84
    for name, frames in results.items():
        assert replay(frames) == want, name
        assert isinstance(frames[-1], End), name
    assert any(isinstance(f, Resync) and f.reason == "lagged" for f in results["slow"])
    assert not any(isinstance(f, Resync) for f in results["live"])
    [snap] = [f for f in results["late"] if isinstance(f, Snapshot)]
    last = broker.last_seq  # the batches end at last - 43, last - 40 and last
    assert snap.seq in {last - 43, last - 40, last}  # never inside a batch
    assert late[0].finished

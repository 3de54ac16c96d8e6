"""The byte-bounded snapshot cache (amountd.snapcache): pure, no kernel."""

from __future__ import annotations

import pytest

from amountd.broker import Broker
from amountd.filter import Filter
from amountd.model import Mount, Snapshot
from amountd.protocol import FrameReader, SubscribeRequest
from amountd.snapcache import SnapshotCache

from ..factories import mount


def test_hit_miss_and_lru_order() -> None:
    c = SnapshotCache(limit=30)
    c.put("a", 1, b"x" * 10)
    c.put("b", 1, b"y" * 10)
    c.put("c", 1, b"z" * 10)
    assert c.bytes == 30 and len(c) == 3
    assert c.get("a", 1) == b"x" * 10  # a is now the most recently used
    c.put("d", 1, b"w" * 10)  # b goes: least recently used
    assert c.get("b", 1) is None
    assert c.get("a", 1) is not None and c.get("c", 1) is not None
    assert c.bytes == 30
    assert c.get("a", 2) is None  # another seq is a miss


def test_bytes_never_exceed_the_limit_whatever_is_put() -> None:
    c = SnapshotCache(limit=1000)
    for i in range(500):
        c.put(("json", i), 7, bytes(i * 7 % 400))
        assert c.bytes <= 1000
        assert c.bytes == sum(len(c.get(k, 7) or b"") for k in [("json", j) for j in range(i + 1)])
    c.put("huge", 7, bytes(1001))  # larger than the whole cache: not kept
    assert c.get("huge", 7) is None and c.bytes <= 1000


def test_a_newer_seq_drops_every_older_entry() -> None:
    c = SnapshotCache(limit=100)
    c.put("a", 1, b"1")
    c.put("b", 2, b"22")
    assert len(c) == 1 and c.bytes == 2 and c.get("a", 1) is None
    c.put("a", 1, b"stale")  # older than what is held: ignored
    assert c.get("a", 1) is None and c.bytes == 2
    c.put("b", 2, b"2222")  # replaced, counted once
    assert c.bytes == 4


def test_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        SnapshotCache(limit=-1)


def _mount(i: int) -> Mount:
    return mount(i, f"/m{i}", source="tmpfs", options="rw")


@pytest.mark.anyio
async def test_broker_distinct_filters_stay_within_the_cache_limit() -> None:
    """The issue's flood, in process: many filters, no event in between."""
    mounts = [_mount(i) for i in range(200)]
    broker = Broker(table=lambda: mounts, snapshot_cache=64 * 1024)
    for i in range(300):
        req = SubscribeRequest(snapshot=True, filter=Filter(fstypes=[f"nofs{i}"]))
        sub = broker.subscribe(req)
        chunk = await sub.next_chunk()
        frames = FrameReader("json").feed(chunk)
        assert isinstance(frames[0], Snapshot) and len(frames[0].mounts) == 200
        sub.close()
        assert broker.snapshot_cache.bytes <= 64 * 1024
    assert len(broker.snapshot_cache) >= 1  # it still caches what fits

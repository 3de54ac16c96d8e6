"""The client keeps the table: after a resync, the follower turns a fresh snapshot into the
difference (pure; the command against a restarted server is in tests/kernel/)."""

from __future__ import annotations

from amountd.model import Event, Mount, Resync, Snapshot
from amountd.table import Follower

from ..factories import event, mount


def _table(*targets: tuple[int, str]) -> list[Mount]:
    return [mount(key, target, ids="legacy", full=False) for key, target in targets]


def test_follower_turns_a_fresh_snapshot_into_the_difference() -> None:
    f = Follower()
    first = Snapshot(seq=5, ns_id=None, mounts=_table((1, "/"), (2, "/a"), (3, "/b")))
    assert f.feed(first, 0.0) == [first]
    ev = event("mount", _table((4, "/c"))[0], seq=6, time=0.0)
    assert f.feed(ev, 0.0) == [ev]
    assert f.feed(Resync(seq=7, reason="since-expired"), 0.0) == [
        Resync(seq=7, reason="since-expired")
    ]
    fresh = Snapshot(seq=9, ns_id=None, mounts=_table((1, "/"), (3, "/b"), (4, "/c"), (5, "/d")))
    out = f.feed(fresh, 1.0)
    got = [(e.action, e.mount.target, e.via, e.seq) for e in out if isinstance(e, Event)]
    assert got == [("umount", "/a", "resync", 9), ("mount", "/d", "resync", 9)]
    assert len(out) == 2

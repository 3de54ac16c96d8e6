"""The listmount source's pure core: the tracker's events and the sweep budget.

No kernel here: `stat` hands out canned answers (bytes) and `describe` decodes them
from a dict, so what the tracker does with ID lists and answers is checked alone.
The source against the kernel is in tests/kernel/test_listmount_live.py.
"""

from __future__ import annotations

import random

import msgspec
import pytest

from amountd.kernel.layouts import pack_ids, unpack_ids
from amountd.model import Event, Mount, encode_msgpack, fspath
from amountd.sources.listmount import SweepBudget, Tracker
from amountd.table import MountTable, apply

from ..factories import mount

BASE = 2**31


def mk(i: int, parent: int, target: str, **kw: object) -> Mount:
    return mount(i, target, parent, id=BASE + i, parent_id=BASE + parent, **kw)


class Kernel:
    """What statmount would answer: one record per live ID, as canned bytes."""

    def __init__(self, *mounts: Mount) -> None:
        self.live = {m.key: m for m in mounts}
        self.ghosts: set[int] = set()  # listed, but gone before statmount answers
        self.asked = 0

    def stat(self, mid: int) -> bytes | None:
        self.asked += 1
        m = self.live.get(mid)
        return None if m is None else encode_msgpack(m)

    def describe(self, raw: bytes) -> Mount:
        return self.live_by_raw[raw]

    def ids(self) -> bytes:
        """The whole list, as listmount_raw gives it."""
        return pack_ids(sorted(self.live.keys() | self.ghosts))

    def above(self, top: int) -> bytes:
        """The IDs above `top` (listmount_raw's `after`)."""
        return pack_ids(sorted(mid for mid in self.live.keys() | self.ghosts if mid > top))

    def put(self, m: Mount) -> None:
        self.live[m.key] = m

    @property
    def live_by_raw(self) -> dict[bytes, Mount]:
        return {encode_msgpack(m): m for m in self.live.values()}


def tracker(k: Kernel) -> Tracker:
    t = Tracker(k.stat, k.describe, ns_id=7)
    t.load(k.ids())
    return t


def sweep(t: Tracker) -> list[tuple[str, int]]:
    out = []
    for mid in list(t.table.keys()):
        out += [(e.action, e.mount.key - BASE) for e in t.check(mid, 1.0)]
    return out


def test_new_ids_only_are_described_and_gone_ones_come_from_the_table() -> None:
    root, a = mk(1, 1, "/"), mk(2, 1, "/a")
    k = Kernel(root, a)
    t = tracker(k)
    assert t.top == BASE + 2
    b, bb = mk(3, 2, "/a/b"), mk(4, 3, "/a/b/c")
    k.put(bb)  # listed in ID order; still reported parents first
    k.put(b)
    fresh = k.above(t.top)
    assert t.expected(fresh) == len(k.live)
    k.asked = 0
    evs = t.relist(fresh, whole=False, now=1.0)
    assert [(e.action, e.mount.key - BASE) for e in evs] == [("mount", 3), ("mount", 4)]
    assert k.asked == 2  # only the new mounts were asked about
    assert t.ids == k.ids() and t.top == BASE + 4  # the fresh IDs appended to the list
    assert all(e.via == "mountinfo" and e.pid is None and e.old is None for e in evs)
    # a lazy umount of the tree: the kernel can no longer describe them, the table does
    for key in (BASE + 2, BASE + 3, BASE + 4):
        del k.live[key]
    assert t.expected(b"") != len(k.live)  # the count tells: list them all
    k.asked = 0
    evs = t.relist(k.ids(), whole=True, now=2.0)
    assert [(e.action, e.mount.key - BASE) for e in evs] == [
        ("umount", 4),
        ("umount", 3),
        ("umount", 2),
    ]
    assert evs[2].mount == a and k.asked == 0
    assert t.table == MountTable([root]) and t.ids == k.ids()


def test_a_mount_that_came_and_went_before_it_was_described_is_not_reported() -> None:
    k = Kernel(mk(1, 1, "/"))
    t = tracker(k)
    evs = t.relist(pack_ids([BASE + 9]), whole=False, now=1.0)  # gone before statmount
    assert evs == [] and BASE + 9 not in t.table
    assert t.top == BASE + 9  # listed all the same: not listed as fresh again
    # the next whole list no longer has it: no umount for what was never reported
    assert t.relist(k.ids(), whole=True, now=2.0) == []
    assert t.ids == k.ids()


def test_an_umount_hidden_by_an_old_id_moved_in_is_found_by_the_sweep() -> None:
    # A clone made early (its ID below `top`) is attached as another mount goes: the
    # count holds and no ID above `top` appears, so the cheap relist sees nothing.
    root, a, b = mk(1, 1, "/"), mk(2, 1, "/a"), mk(5, 1, "/b")
    k = Kernel(root, a, b)
    t = tracker(k)
    del k.live[a.key]
    clone = mk(3, 1, "/clone")
    k.put(clone)
    fresh = k.above(t.top)
    assert fresh == b"" and t.expected(fresh) == len(k.live)
    assert t.relist(fresh, whole=False, now=1.0) == []
    assert not t.in_doubt
    assert sweep(t) == []  # the check finds /a gone ...
    assert t.in_doubt  # ... and the ID set is no longer trusted
    evs = t.relist(k.ids(), whole=True, now=2.0)
    assert [(e.action, e.mount.key - BASE) for e in evs] == [("umount", 2), ("mount", 3)]
    assert not t.in_doubt
    assert t.table == MountTable(k.live.values())


def _relist(t: Tracker, k: Kernel) -> list[Event]:
    """ListmountSource._relist, the count being the kernel's."""
    if not t.in_doubt:
        fresh = k.above(t.top)
        if len(k.live) + len(k.ghosts) == t.expected(fresh):
            return t.relist(fresh, whole=False, now=1.0)
    return t.relist(k.ids(), whole=True, now=1.0)


@pytest.mark.parametrize("seed", range(40))
def test_random_histories_keep_the_table_and_order_the_events(seed: int) -> None:
    """Mounts, subtree umounts, old clones attached, mounts gone before described:
    whatever the relists (cheap or whole, diffed by bytes) report, applied in order,
    is the kernel's table, umounts children first and mounts parents first."""
    rnd = random.Random(seed)
    k = Kernel(mk(1, 1, "/"))
    nxt = 2
    clones: list[int] = []  # IDs taken early, attached later: below `top`
    for _ in range(rnd.randrange(0, 30)):
        k.put(mk(nxt, rnd.choice(sorted(k.live)) - BASE, f"/m{nxt}"))
        nxt += 1
    t = tracker(k)
    consumer = MountTable(t.table)
    for _ in range(60):
        k.ghosts.clear()  # they were gone before anyone described them
        for _ in range(rnd.randrange(1, 4)):
            op = rnd.random()
            keys = sorted(k.live)
            if op < 0.35:
                k.put(mk(nxt, rnd.choice(keys) - BASE, f"/m{nxt}"))
            elif op < 0.45:
                clones.append(nxt)
            elif op < 0.55 and clones:
                i = clones.pop(rnd.randrange(len(clones)))
                k.put(mk(i, rnd.choice(keys) - BASE, f"/c{i}"))
            elif op < 0.6:
                k.ghosts.add(BASE + nxt)
            elif len(keys) > 1:  # a lazy umount: the mount and all below it
                doomed = {rnd.choice(keys[1:])}
                while more := {m.key for m in k.live.values() if m.parent_id in doomed} - doomed:
                    doomed |= more
                for key in doomed:
                    del k.live[key]
            nxt += 1
        before = MountTable(t.table)
        batches = [_relist(t, k)]
        if t.table.keys() != k.live.keys():  # hidden by an old clone: the sweep finds it
            assert sweep(t) == [] and t.in_doubt
            batches.append(_relist(t, k))
        assert t.table == MountTable(k.live.values())
        listed = unpack_ids(t.ids)  # may still hold ghosts; the table's IDs are all in it
        assert listed == sorted(set(listed)) and t.table.keys() <= set(listed)
        assert listed[-1] <= t.top
        for evs in batches:
            kinds = [e.action for e in evs]
            assert kinds == sorted(kinds, key=["umount", "mount"].index)
            for n, e in enumerate(evs):  # umounts: children first; mounts: parents first
                later = [x.mount for x in evs[n + 1 :] if x.action == e.action]
                if e.action == "umount":
                    assert all(m.parent_id != e.mount.key for m in later)
                else:
                    assert all(m.key != e.mount.parent_id for m in later)
            for e in evs:
                apply(consumer, e)
        evs = [e for b in batches for e in b]
        gone = [e.mount.key for e in evs if e.action == "umount"]
        added = [e.mount.key for e in evs if e.action == "mount"]
        assert sorted(gone) == sorted(before.keys() - k.live.keys())
        assert sorted(added) == sorted(k.live.keys() - before.keys())
        assert consumer == t.table


def test_sweep_finds_remount_move_propagation_and_skips_unchanged_answers() -> None:
    root, a, b, c = mk(1, 1, "/"), mk(2, 1, "/a"), mk(3, 1, "/b"), mk(4, 1, "/c")
    k = Kernel(root, a, b, c)
    t = tracker(k)
    assert sweep(t) == [] and t.parsed == 0  # every answer as at load: none parsed
    k.put(msgspec.structs.replace(a, options="ro,relatime"))
    k.put(msgspec.structs.replace(b, target=fspath("/moved")))
    k.put(msgspec.structs.replace(c, propagation="shared:3"))
    assert sweep(t) == [("remount", 2), ("move", 3), ("propagation", 4)]
    assert t.parsed == 3 and t.checked == 8
    assert t.table == MountTable(k.live.values())
    assert sweep(t) == [] and t.parsed == 3  # nothing new: nothing parsed


def test_sweep_gives_one_event_per_kind_of_change() -> None:
    root, a = mk(1, 1, "/"), mk(2, 1, "/a", fs_options=fspath("rw,size=1024k"))
    k = Kernel(root, a)
    t = tracker(k)
    consumer = MountTable(t.table)
    new = msgspec.structs.replace(
        a, options="ro,relatime", fs_options=fspath("ro,size=2048k"), propagation="shared:5"
    )
    k.put(new)
    evs = t.check(a.key, 1.0)
    assert [e.action for e in evs] == ["propagation", "remount"]
    assert evs[0].old == a and evs[0].mount == msgspec.structs.replace(a, propagation="shared:5")
    assert evs[1].old == evs[0].mount and evs[1].mount == new
    for e in evs:
        apply(consumer, e)
    assert consumer == MountTable(k.live.values())


def test_budget_bursts_then_holds_to_its_share() -> None:
    b = SweepBudget(0.05, 0.1, now=0.0)
    assert b.allows(0.0) and b.wait(0.0) == 0.0
    b.spend(0.12, 0.0)  # a slice may overrun; the debt is paid back
    assert not b.allows(0.0)
    assert b.wait(0.0) == pytest.approx((0.02 + 1e-4) / 0.05)
    assert not b.allows(0.3)  # 0.015 s of CPU accrued in 0.3 s: still in debt
    assert b.allows(0.5)
    assert b.allows(100.0) and b.tokens == pytest.approx(0.1)  # capped at the burst
    # over a long run, what it lets through is the share, plus one burst
    b = SweepBudget(0.05, 0.1, now=0.0)
    spent, now = 0.0, 0.0
    while now < 60.0:
        if b.allows(now):
            b.spend(0.001, now)
            spent += 0.001
        now += 0.0005
    assert spent == pytest.approx(0.05 * 60 + 0.1, rel=0.02)
    with pytest.raises(ValueError):
        SweepBudget(0.0, 0.1, now=0.0)

"""The fanotify tracker against a dictionary standing in for the kernel: no root, no
namespace, no clock. Each test changes the dictionary as the kernel would change the
namespace, feeds the tracker the events the kernel would send, and checks both what
the tracker says and that a consumer applying it ends with the kernel's table."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import msgspec
import pytest

from amountd.kernel import consts as c
from amountd.kernel.layouts import FanEvent
from amountd.model import End, Event, Mount, Resync, encode_msgpack, fspath
from amountd.sweep import SweepPlan
from amountd.table import MountTable, apply
from amountd.tracker import FanotifyTracker, Phase, Swept, TrackerError

NS = 4026531840
ATTACH, DETACH, OVERFLOW = c.FAN_MNT_ATTACH, c.FAN_MNT_DETACH, c.FAN_Q_OVERFLOW
MOVE = ATTACH | DETACH
HIDDEN = 1  # the namespace's hidden rootfs: the root's parent, never listed
ROOT = 1 << 31
PID = 4242


def mnt(mid: int, parent: int, target: str, **kw: Any) -> Mount:
    fields: dict[str, Any] = {
        "source": fspath(f"s{mid}"),
        "fstype": "tmpfs",
        "root": fspath("/"),
        "options": "rw,relatime",
        "fs_options": fspath("rw"),
        "propagation": "",
        "dev": f"0:{mid % 1000}",
    }
    fields.update(kw)
    for k in ("source", "root", "fs_options"):
        fields[k] = fspath(fields[k])
    return Mount(id=mid, parent_id=parent, ns_id=NS, target=fspath(target), **fields)


class FakeKernel:
    """The namespace as a dict of mount ID -> Mount, which the test changes."""

    def __init__(self, mounts: Iterable[Mount]) -> None:
        self.mounts: dict[int, Mount] = {}
        for m in mounts:
            self.put(m)
        self.gone = False
        self.described: list[int] = []
        self.decoded = 0
        self.comms = {PID: "mount"}

    def put(self, m: Mount) -> None:
        assert m.id is not None
        self.mounts[m.id] = m

    def change(self, mid: int, **kw: Any) -> Mount:
        m = self.mounts[mid] = msgspec.structs.replace(self.mounts[mid], **kw)
        return m

    def table(self) -> MountTable:
        return MountTable(self.mounts.values())

    # the tracker's Kernel
    def describe(self, mnt_id: int) -> Mount | None:
        self.described.append(mnt_id)
        return None if self.gone else self.mounts.get(mnt_id)

    def list_ids(self) -> Sequence[int] | None:
        return None if self.gone else sorted(self.mounts)

    def probe(self, mnt_id: int) -> Hashable | None:
        m = None if self.gone else self.mounts.get(mnt_id)
        if m is None:
            return None
        return Swept(m.parent_id, m.options, m.fs_options, m.propagation)

    def decode(self, answer: Any) -> Swept:
        self.decoded += 1
        assert isinstance(answer, Swept)
        return answer

    def comm(self, pid: int) -> str | None:
        return self.comms.get(pid)


class World:
    """A kernel, a tracker of it, and a consumer applying what the tracker says."""

    def __init__(self, *mounts: Mount) -> None:
        self.k = FakeKernel([mnt(ROOT, HIDDEN, "/"), *mounts])
        self.t = FanotifyTracker(NS, self.k, self.k.table(), plan=SweepPlan(now=50.0))
        self.consumer = self.k.table()
        self.now = 1000.0
        self.mono = 50.0

    def feed(self, *events: tuple[int, int | None]) -> list[Event | Resync | End]:
        self.now += 1
        out = self.t.feed([FanEvent(mask, PID, mid) for mask, mid in events], self.now)
        self._apply(out)
        return out

    def woke(self, dt: float = 0.0, *, pollpri: bool = False) -> list[Event | Resync | End]:
        """`dt` seconds later, maybe a POLLPRI; then the slices the plan wants now,
        each charged 5 us of CPU per check (the source measures it)."""
        self.mono += dt
        self.now += dt
        if pollpri:
            self.t.pollpri()
        out: list[Event | Resync | End] = []
        while True:
            at = self.t.wake_at(self.mono)
            if at is None or at > self.mono:
                break
            checks = self.t.plan.checks
            out += self.t.sweep_slice(self.mono, self.now)
            self.t.spent(5e-6 * (self.t.plan.checks - checks), self.mono)
            if self.t.plan.checks == checks:
                break
        self._apply(out)
        return out

    def _apply(self, out: list[Event | Resync | End]) -> None:
        for ch in out:
            if isinstance(ch, Event):
                apply(self.consumer, ch)

    def agree(self) -> None:
        """The consumer, the tracker and the kernel hold the same table."""
        assert self.t.table == self.k.table()
        assert self.consumer == self.t.table


def actions(out: list[Event | Resync | End]) -> list[tuple[str, int | None]]:
    got: list[tuple[str, int | None]] = []
    for ch in out:
        if isinstance(ch, Event):
            got.append((ch.action, ch.mount.id))
        else:
            got.append((ch.__class__.__name__.lower(), None))
    return got


# ------------------------------------------------------------------------ fanotify events


def test_plain_mount_is_described_and_named() -> None:
    w = World()
    w.k.put(mnt(ROOT + 1, ROOT, "/a"))
    [ev] = w.feed((ATTACH, ROOT + 1))
    assert isinstance(ev, Event)
    assert (ev.action, ev.via, ev.old, ev.pid, ev.comm) == ("mount", "fanotify", None, PID, "mount")
    assert ev.mount == w.k.mounts[ROOT + 1]
    assert ev.time == w.now
    w.agree()


def test_attach_of_a_listed_mount_is_not_reported_twice() -> None:
    w = World(mnt(ROOT + 1, ROOT, "/a"))
    assert w.feed((ATTACH, ROOT + 1)) == []
    w.agree()


def test_umount_reports_the_record_from_the_table() -> None:
    w = World(mnt(ROOT + 1, ROOT, "/a"))
    before = w.k.mounts.pop(ROOT + 1)
    w.k.described.clear()
    [ev] = w.feed((DETACH, ROOT + 1))
    assert isinstance(ev, Event)
    assert (ev.action, ev.mount) == ("umount", before)
    assert ROOT + 1 not in w.k.described  # a detached mount cannot be described
    assert w.feed((DETACH, ROOT + 1)) == []  # once
    w.agree()


def test_move_is_one_event_with_both_bits() -> None:
    w = World(mnt(ROOT + 1, ROOT, "/a"))
    old = w.k.mounts[ROOT + 1]
    new = w.k.change(ROOT + 1, target=fspath("/b"))
    [ev] = w.feed((MOVE, ROOT + 1))
    assert isinstance(ev, Event)
    assert (ev.action, ev.mount, ev.old) == ("move", new, old)
    assert w.feed((MOVE, ROOT + 1)) == []  # already described at its new place
    w.agree()


def test_move_of_an_unknown_mount_is_a_mount() -> None:
    w = World()
    w.k.put(mnt(ROOT + 1, ROOT, "/b"))
    assert actions(w.feed((MOVE, ROOT + 1))) == [("mount", ROOT + 1)]
    w.agree()


def test_moved_then_gone_waits_for_its_detach() -> None:
    w = World(mnt(ROOT + 1, ROOT, "/a"))
    old = w.k.mounts.pop(ROOT + 1)
    assert w.feed((MOVE, ROOT + 1)) == []
    [ev] = w.feed((DETACH, ROOT + 1))
    assert isinstance(ev, Event)
    assert (ev.action, ev.mount) == ("umount", old)
    w.agree()


def test_tree_move_redescribes_the_subtree() -> None:
    """`mount --move /a /x`: the kernel reports /a alone; its subtree moved with it."""
    a, b, cc = ROOT + 1, ROOT + 2, ROOT + 3
    w = World(
        mnt(a, ROOT, "/a"), mnt(b, a, "/a/b"), mnt(cc, b, "/a/b/c"), mnt(ROOT + 4, ROOT, "/o")
    )
    w.k.change(a, target=fspath("/x"))
    w.k.change(b, target=fspath("/x/b"))
    w.k.change(cc, target=fspath("/x/b/c"))
    out = w.feed((MOVE, a))
    assert sorted(actions(out)) == [("move", a), ("move", b), ("move", cc)]
    assert actions(out)[0] == ("move", a)
    assert all(isinstance(e, Event) and e.pid == PID for e in out)
    assert ROOT + 4 not in w.k.described  # outside the moved tree: not asked
    w.agree()


def test_tree_move_seen_by_a_sweep_before_its_event() -> None:
    """A POLLPRI comes before its fanotify event, and its sweep may run first: a move to
    another parent found by the sweep takes the subtree along, and the event that
    follows finds the table as the kernel's."""
    a, b, cc, o = ROOT + 1, ROOT + 2, ROOT + 3, ROOT + 4
    w = World(mnt(a, ROOT, "/a"), mnt(b, a, "/a/b"), mnt(cc, b, "/a/b/c"), mnt(o, ROOT, "/o"))
    w.t.schedule(w.mono)
    w.k.change(a, parent_id=o, target=fspath("/o/a"))
    w.k.change(b, target=fspath("/o/a/b"))
    w.k.change(cc, target=fspath("/o/a/b/c"))
    out = w.woke(pollpri=True)
    assert sorted(actions(out)) == [("move", a), ("move", b), ("move", cc)]
    w.agree()
    assert w.feed((MOVE, a)) == []
    w.agree()


def test_pivot_root_two_events_with_both_bits() -> None:
    """pivot_root(new, new/old): the old root goes under the new one, the new one
    becomes the root; the kernel reports the two roots, not what hangs below."""
    new, kid = ROOT + 1, ROOT + 2
    w = World(mnt(new, ROOT, "/new"), mnt(kid, new, "/new/k"))
    w.k.change(new, parent_id=HIDDEN, target=fspath("/"))
    w.k.change(ROOT, parent_id=new, target=fspath("/old"))
    w.k.change(kid, target=fspath("/k"))
    out = w.feed((MOVE, ROOT), (MOVE, new))
    assert sorted(actions(out)) == [("move", ROOT), ("move", new), ("move", kid)]
    assert w.feed((MOVE, ROOT), (MOVE, new)) == []
    w.agree()


def test_mount_slid_beneath_by_propagation_reparents_the_covering_mount() -> None:
    """A mount propagated to /a, where X already stands, is slid in underneath X: X's
    parent changes with no event for X. An umount of the slid mount hands X back."""
    x, y = ROOT + 1, ROOT + 2
    w = World(mnt(x, ROOT, "/a"))
    old_x = w.k.mounts[x]
    w.k.put(mnt(y, ROOT, "/a"))
    new_x = w.k.change(x, parent_id=y)
    out = w.feed((ATTACH, y))
    assert actions(out) == [("mount", y), ("move", x)]
    assert isinstance(out[1], Event)
    assert (out[1].old, out[1].mount) == (old_x, new_x)
    w.agree()
    del w.k.mounts[y]
    w.k.change(x, parent_id=ROOT)
    assert actions(w.feed((DETACH, y))) == [("umount", y), ("move", x)]
    w.agree()


def test_mount_that_came_and_went_before_it_was_described() -> None:
    """ATTACH then DETACH of a mount statmount never saw: reported with its ID and
    nulls, so the pair still balances for every consumer."""
    w = World()
    gone = ROOT + 9
    out = w.feed((ATTACH, gone), (DETACH, gone))
    assert actions(out) == [("mount", gone), ("umount", gone)]
    for ev in out:
        assert isinstance(ev, Event)
        assert ev.mount == Mount(id=gone, ns_id=NS)
    w.agree()


def test_events_without_a_mount_id_are_skipped() -> None:
    w = World()
    assert w.feed((ATTACH, None)) == []
    w.agree()


def test_overflow_resyncs_and_diffs_against_a_fresh_listing() -> None:
    a, b, cc = ROOT + 1, ROOT + 2, ROOT + 3
    w = World(mnt(a, ROOT, "/a"), mnt(b, ROOT, "/b"))
    del w.k.mounts[a]  # lost umount
    w.k.put(mnt(cc, ROOT, "/c"))  # lost mount
    w.k.change(b, options="ro,relatime")  # a remount nobody reported
    out = w.feed((ATTACH, ROOT + 7), (OVERFLOW, None))  # 7: came and went, lost too
    assert isinstance(out[0], Event) and out[0].mount.id == ROOT + 7
    assert isinstance(out[1], Resync) and out[1].reason == "overflow"
    rest = out[2:]
    assert all(isinstance(e, Event) and e.via == "resync" for e in rest)
    assert sorted(actions(rest)) == [
        ("mount", cc),
        ("remount", b),
        ("umount", a),
        ("umount", ROOT + 7),
    ]
    w.agree()
    # Events queued after the overflow that the listing already holds: nothing twice.
    assert w.feed((ATTACH, cc)) == []
    assert w.t.phase is Phase.LIVE


def test_events_after_an_overflow_in_the_same_read_apply_to_the_new_table() -> None:
    w = World()
    d = ROOT + 5
    w.k.put(mnt(d, ROOT, "/d"))
    out = w.feed((OVERFLOW, None), (ATTACH, d))  # the listing already has d
    assert actions(out) == [("resync", None), ("mount", d)]  # once: by the resync
    assert isinstance(out[1], Event) and out[1].via == "resync"
    w.agree()


def test_namespace_end_every_mount_detached() -> None:
    a = ROOT + 1
    w = World(mnt(a, ROOT, "/a"))
    w.k.mounts.clear()
    w.k.gone = True
    out = w.feed((DETACH, a), (DETACH, ROOT), (DETACH, HIDDEN))
    assert actions(out) == [("umount", a), ("umount", ROOT), ("end", None)]
    assert isinstance(out[-1], End)
    assert "freed" in out[-1].reason
    assert w.t.phase is Phase.ENDED
    with pytest.raises(TrackerError):
        w.t.feed([FanEvent(DETACH, 0, HIDDEN)], w.now)
    with pytest.raises(TrackerError):
        w.t.sweep(w.now)


def test_namespace_freed_during_an_overflow_ends() -> None:
    """issue 11: the namespace died while the queue was full: its DETACHes were lost
    with the overflow, so the resync's listing (none: the namespace is gone) ends it."""
    mounts = [mnt(ROOT + i, ROOT, f"/m{i}") for i in range(1, 50)]
    w = World(*mounts)
    w.k.mounts.clear()
    w.k.gone = True
    out = w.feed(*[(DETACH, ROOT + i) for i in range(1, 20)], (OVERFLOW, None))
    assert actions(out)[:19] == [("umount", ROOT + i) for i in range(1, 20)]
    assert isinstance(out[19], Resync)
    assert sorted(actions(out[20:-1])) == sorted(
        [("umount", ROOT + i) for i in range(20, 50)] + [("umount", ROOT)]
    )
    assert isinstance(out[-1], End) and "freed" in out[-1].reason
    assert w.t.phase is Phase.ENDED
    w.agree()


def test_overflow_with_an_empty_listing_ends() -> None:
    w = World(mnt(ROOT + 1, ROOT, "/a"))
    w.k.mounts.clear()  # listable, but nothing left: freed as we listed it
    out = w.feed((OVERFLOW, None))
    assert actions(out) == [("resync", None), ("umount", ROOT + 1), ("umount", ROOT), ("end", None)]
    assert w.t.phase is Phase.ENDED


def test_resync_on_request_keeps_a_live_namespace_live() -> None:
    w = World(mnt(ROOT + 1, ROOT, "/a"))
    w.k.change(ROOT + 1, propagation="shared:1")
    out = w.t.resync("lagged", w.now)
    assert actions(out) == [("resync", None), ("propagation", ROOT + 1)]
    assert w.t.phase is Phase.LIVE


# ------------------------------------------------------------------- POLLPRI and sweeps


def test_every_pollpri_owes_a_sweep_which_finds_a_remount_at_once() -> None:
    a = ROOT + 1
    w = World(mnt(a, ROOT, "/a", fs_options="rw,size=1024k"))
    w.t.schedule(w.mono)
    old = w.k.mounts[a]
    new = w.k.change(a, fs_options=fspath("rw,size=2048k"))
    out = w.woke(pollpri=True)
    [ev] = out
    assert isinstance(ev, Event)
    assert (ev.action, ev.via, ev.mount, ev.old, ev.pid) == ("remount", "fanotify", new, old, None)
    assert w.t.sweeps == 1 and not w.t.plan.owed
    w.agree()


def test_a_remount_hidden_behind_a_mount_is_found() -> None:
    """issue 13: a mount and a remount at the same instant raise one POLLPRI, which the
    mount's fanotify event explains; the remount is found all the same."""
    a, b = ROOT + 1, ROOT + 2
    w = World(mnt(a, ROOT, "/a"))
    w.t.schedule(w.mono)
    w.k.put(mnt(b, ROOT, "/b"))
    new = w.k.change(a, options="ro,relatime")
    w.t.pollpri()
    assert actions(w.feed((ATTACH, b))) == [("mount", b)]
    out = w.woke()
    assert actions(out) == [("remount", a)]
    [ev] = out
    assert isinstance(ev, Event) and ev.mount == new
    w.agree()


def test_a_dead_namespace_wants_no_sweep() -> None:
    w = World(mnt(ROOT + 1, ROOT, "/a"))
    w.t.schedule(w.mono)
    w.t.pollpri()
    w.feed((DETACH, ROOT + 1), (DETACH, ROOT))
    assert w.t.phase is Phase.ENDED
    assert w.t.wake_at(w.mono) is None
    with pytest.raises(TrackerError):
        w.t.pollpri()


def test_sweep_finds_propagation_changes_and_moves_no_event_told_of() -> None:
    a, b, x = ROOT + 1, ROOT + 2, ROOT + 3
    w = World(mnt(a, ROOT, "/a"), mnt(b, ROOT, "/b"), mnt(x, ROOT, "/b"))
    w.k.change(a, propagation="shared:7")
    w.k.change(x, parent_id=b)  # slid beneath, its event never seen
    out = w.t.sweep(w.now)
    w._apply(out)
    assert sorted(actions(out)) == [("move", x), ("propagation", a)]
    w.agree()


def test_sweep_skips_unchanged_answers_and_trusts_none_after_a_redescription() -> None:
    a = ROOT + 1
    w = World(mnt(a, ROOT, "/a"), *[mnt(ROOT + i, ROOT, f"/m{i}") for i in range(2, 10)])
    w.t.sweep(w.now)
    assert w.k.decoded == 10  # first sweep: everything decoded once
    w.k.decoded = 0
    assert w.t.sweep(w.now) == []
    assert w.k.decoded == 0  # nothing changed: nothing decoded
    # A remount, then a move re-describes it (already ro), then a remount back to rw:
    # the answer equals the first sweep's, but the table holds ro: it must be decoded.
    w.k.change(a, options="ro,relatime")
    w.k.change(a, target=fspath("/a2"))
    w.feed((MOVE, a))
    w.k.change(a, options="rw,relatime")
    out = w.t.sweep(w.now)
    w._apply(out)
    assert actions(out) == [("remount", a)]
    w.agree()


def test_sweep_leaves_new_and_gone_mounts_to_their_events() -> None:
    w = World(mnt(ROOT + 1, ROOT, "/a"))
    w.k.put(mnt(ROOT + 2, ROOT, "/b"))  # its ATTACH is on the way
    del w.k.mounts[ROOT + 1]  # its DETACH is on the way
    assert w.t.sweep(w.now) == []
    assert actions(w.feed((ATTACH, ROOT + 2), (DETACH, ROOT + 1))) == [
        ("mount", ROOT + 2),
        ("umount", ROOT + 1),
    ]
    w.agree()


def test_sweep_of_a_gone_namespace_says_nothing() -> None:
    w = World(mnt(ROOT + 1, ROOT, "/a"))
    w.k.gone = True
    assert w.t.sweep(w.now) == []
    assert w.t.phase is Phase.LIVE  # the DETACHes end it


def test_records_are_never_changed_after_they_are_handed_out() -> None:
    """Frames are frozen values: what the tracker returned stays as it was returned."""
    a = ROOT + 1
    w = World(mnt(a, ROOT, "/a"))
    w.k.change(a, options="ro,relatime")
    out = w.t.sweep(w.now)
    w._apply(out)
    frozen = [encode_msgpack(e) for e in out if isinstance(e, Event)]
    w.k.change(a, target=fspath("/z"), options="rw,relatime")
    w.feed((MOVE, a))
    w.t.sweep(w.now)
    w.t.resync("lagged", w.now)
    assert [encode_msgpack(e) for e in out if isinstance(e, Event)] == frozen


def test_sweep_reports_propagation_then_remount_as_two_events() -> None:
    """issue 13: both changed on one mount: `propagation`, then `remount`, whose
    application in order gives the kernel's record."""
    a = ROOT + 1
    w = World(mnt(a, ROOT, "/a"))
    old = w.k.mounts[a]
    new = w.k.change(a, propagation="shared:3", options="ro,relatime", fs_options="ro")
    out = w.t.sweep(w.now)
    w._apply(out)
    assert actions(out) == [("propagation", a), ("remount", a)]
    prop, rem = out
    assert isinstance(prop, Event) and isinstance(rem, Event)
    assert prop.old == old
    assert prop.mount == msgspec.structs.replace(old, propagation="shared:3")
    assert (rem.old, rem.mount) == (prop.mount, new)
    w.agree()


def test_background_sweep_finds_a_propagation_change_within_the_interval() -> None:
    """make-shared raises neither POLLPRI nor an event: only the background sweep,
    every `sweep_interval` seconds from `schedule()`, finds it."""
    a = ROOT + 1
    w = World(mnt(a, ROOT, "/a"))
    w.t = FanotifyTracker(NS, w.k, w.k.table(), plan=SweepPlan(interval=30.0, now=w.mono))
    assert w.t.wake_at(w.mono) is None  # not scheduled yet
    w.t.schedule(w.mono)
    assert w.t.wake_at(w.mono) == w.mono + 30.0
    w.k.change(a, propagation="shared:1")
    assert w.woke(29.0) == []
    assert actions(w.woke(1.0)) == [("propagation", a)]
    assert w.t.wake_at(w.mono) == pytest.approx(w.mono + 30.0)  # the next one
    w.agree()


def test_any_sweep_puts_the_background_sweep_back() -> None:
    w = World()
    w.t = FanotifyTracker(NS, w.k, w.k.table(), plan=SweepPlan(interval=1.0, now=w.mono))
    w.t.schedule(w.mono)
    w.woke(0.5, pollpri=True)
    assert w.t.sweeps == 1
    assert w.t.wake_at(w.mono) == pytest.approx(w.mono + 1.0)


def test_no_background_sweep_without_an_interval() -> None:
    w = World()
    w.t = FanotifyTracker(NS, w.k, w.k.table(), plan=SweepPlan(interval=None, now=w.mono))
    w.t.schedule(w.mono)
    assert w.t.wake_at(w.mono) is None
    w.woke(3600.0)
    assert w.t.sweeps == 0

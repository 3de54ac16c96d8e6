"""Pure: one mount namespace's table, followed through fanotify mount events (sans-IO).

The fanotify source (sources/fanotify.py) waits, reads and parses; the tracker decides.
It takes parsed kernel events (`layouts.FanEvent`), the wake-ups of the namespace's
mountinfo POLLPRI, and the time, and returns the changes the source emits (`Event`,
`Resync`, `End`), keeping the table they lead to. What it must ask the kernel it asks
through a `Kernel`: the source answers with statmount and listmount, a test with a
dictionary. No clock, no fd and no syscall here, so every case runs without root.

The phase is explicit, an Enum with its transitions (`Phase`): LIVE until the
namespace is freed, then ENDED (an `End` was returned); feeding an ended tracker raises
`TrackerError`. The kernel reports a freed namespace as one DETACH per mount; when those
were lost in a queue overflow, the resync's listing says it instead (the namespace can
no longer be listed, or lists nothing).

Remounts and propagation changes come with no event: every mountinfo POLLPRI (`pollpri`)
owes a sweep, and so does every `sweep_interval` seconds, for propagation changes, which
raise no POLLPRI. When and what to sweep is the `SweepPlan`'s (amountd/sweep.py): in
slices (`sweep_slice`) between the source's reads, under a CPU budget (`spent`).

Records are built once and never changed (msgspec.structs.replace): the tracker hands
out the same values it keeps.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from enum import Enum
from typing import Any, NamedTuple, Protocol

import msgspec

from .kernel import consts as c
from .kernel.layouts import FanEvent, StatMount, fs_options_of, options_of, propagation_of
from .model import Action, End, Event, FsPath, Mount, Resync, fspath
from .sweep import SweepPlan
from .table import MountTable, diff

__all__ = [
    "FanotifyTracker",
    "Kernel",
    "Phase",
    "Swept",
    "TrackerError",
    "swept_of",
]

Change = Event | Resync | End


class TrackerError(RuntimeError):
    """The tracker was driven in a way its phase forbids (a bug in the caller)."""


class Swept(NamedTuple):
    """What a sweep compares for one mount (a statmount without paths).

    A field the answer lacks is None; then only `parent_id` is looked at.
    """

    parent_id: int | None
    options: str | None
    fs_options: FsPath | None
    propagation: str | None


def swept_of(sm: StatMount) -> Swept:
    """The sweep's view of a statmount answer (SB_BASIC | MNT_BASIC | MNT_OPTS)."""
    if sm.mnt_attr is None or sm.sb_flags is None or sm.mnt_propagation is None:
        return Swept(sm.mnt_parent_id, None, None, None)
    return Swept(
        sm.mnt_parent_id,
        options_of(sm.mnt_attr),
        fspath(fs_options_of(sm.sb_flags, sm.mnt_opts)),
        propagation_of(
            sm.mnt_propagation,
            sm.mnt_peer_group or 0,
            sm.mnt_master or 0,
            sm.propagate_from or 0,
        ),
    )


class Kernel(Protocol):
    """What the tracker asks the kernel about the namespace it follows."""

    def describe(self, mnt_id: int) -> Mount | None:
        """The mount as it is now (a full statmount); None: gone (ENOENT)."""

    def list_ids(self) -> Sequence[int] | None:
        """Every mount ID in the namespace (listmount); None: the namespace is gone."""

    def probe(self, mnt_id: int) -> Hashable | None:
        """A sweep's cheap answer for one mount (equal answers: nothing changed since);
        None: gone. Only an answer that differs from the last is `decode`d."""

    def decode(self, answer: Any) -> Swept:
        """What a `probe` answer says."""

    def comm(self, pid: int) -> str | None:
        """The command name of a process (None: gone or unknown)."""


class Phase(Enum):
    LIVE = "live"  # events are applied
    ENDED = "ended"  # the namespace was freed: an End went out, nothing more comes


class FanotifyTracker:
    """A namespace's table, kept by fanotify events, POLLPRI wake-ups and sweeps.

    `table` is the table as of the last change returned. Times come in: `now` (wall
    clock, stamped on events) and `mono` (a monotonic clock, for the sweep plan).
    """

    def __init__(
        self,
        ns_id: int,
        kernel: Kernel,
        table: MountTable,
        *,
        plan: SweepPlan | None = None,
    ) -> None:
        self.ns_id = ns_id
        self.plan = plan if plan is not None else SweepPlan()
        self._kernel = kernel
        self._table = table
        self._phase = Phase.LIVE
        self._swept: dict[int, int] = {}  # mount ID -> hash of its last sweep answer
        self._at: dict[tuple[int | None, str | None], set[int]] = {}  # (parent, target)
        self._reindex()

    # ------------------------------------------------------------------------ state

    @property
    def table(self) -> MountTable:
        return self._table

    @property
    def phase(self) -> Phase:
        return self._phase

    def schedule(self, mono: float) -> None:
        """Start the background sweeps' clock and the budget's (the source is armed)."""
        self.plan.start(mono)

    def _check_live(self) -> None:
        if self._phase is not Phase.LIVE:
            raise TrackerError(f"the tracker of mount namespace {self.ns_id} has ended")

    def _end(self, out: list[Change]) -> None:
        out.append(End(reason=f"mount namespace {self.ns_id} was freed"))
        self._phase = Phase.ENDED

    # ------------------------------------------------------------------ fanotify

    def feed(self, events: Iterable[FanEvent], now: float) -> list[Change]:
        """Turn one read's kernel events into changes (an End last, if the namespace
        was freed: the tracker is ENDED then)."""
        self._check_live()
        out: list[Change] = []
        kernel = self._kernel
        comms: dict[int, str | None] = {}
        for ev in events:
            if ev.mask & c.FAN_Q_OVERFLOW:
                self._resync("overflow", out, now)
                if self._phase is Phase.ENDED:
                    return out
                continue
            mid = ev.mnt_id
            if mid is None:
                continue
            table = self._table
            pid = ev.pid if ev.pid > 0 else None
            comm = None
            if pid is not None:
                comm = comms[pid] if pid in comms else comms.setdefault(pid, kernel.comm(pid))
            attach = ev.mask & c.FAN_MNT_ATTACH
            detach = ev.mask & c.FAN_MNT_DETACH
            if attach and detach:  # a move (or pivot_root): same mount, new place
                old = table.get(mid)
                new = kernel.describe(mid)
                if new is None:
                    if old is not None:  # moved, then gone before we asked
                        continue  # its DETACH follows and reports it
                    new = Mount(id=mid, ns_id=self.ns_id)
                if new == old:
                    continue  # described at its new place already, by an earlier event
                self._put(new)
                action: Action = "move" if old is not None else "mount"
                out.append(_event(now, action, new, old, pid=pid, comm=comm))
                if old is not None and new.target != old.target:
                    self._refresh_below(mid, now, pid, comm, out)
                self._retuck(new.parent_id, new.target, mid, out, now=now, pid=pid, comm=comm)
            elif attach:
                if mid in table:
                    continue  # listed at arm or resync time already
                new = kernel.describe(mid)
                if new is None:  # came and went: report it, with what we know
                    new = Mount(id=mid, ns_id=self.ns_id)
                self._put(new)
                out.append(_event(now, "mount", new, pid=pid, comm=comm))
                self._retuck(new.parent_id, new.target, mid, out, now=now, pid=pid, comm=comm)
            elif detach:
                old = self._remove(mid)
                if old is None:
                    continue
                out.append(_event(now, "umount", old, pid=pid, comm=comm))
                self._retuck(mid, old.target, None, out, now=now, pid=pid, comm=comm)
                if not len(self._table):
                    self._end(out)
                    return out
        return out

    def resync(self, reason: str, now: float) -> list[Change]:
        """Rebuild from a fresh listing; the difference goes out `via: resync`."""
        self._check_live()
        out: list[Change] = []
        self._resync(reason, out, now)
        return out

    def _resync(self, reason: str, out: list[Change], now: float) -> None:
        out.append(Resync(seq=0, reason=reason))
        new = MountTable()
        ids = self._kernel.list_ids()
        for mnt_id in ids or ():
            m = self._kernel.describe(mnt_id)
            if m is not None:  # gone between listmount and statmount: not in the table
                new.add(m)
        out.extend(diff(self._table, new, via="resync", time=now, ns_id=self.ns_id))
        self._table = new
        self._reindex()
        self._swept.clear()
        if not len(new):
            # Freed: its DETACHes (one per mount) were lost with the overflow, or went
            # out before this listing and were not read; none will come again.
            self._end(out)

    # --------------------------------------------------------- the table and its index

    def _put(self, m: Mount) -> None:
        """A record freshly described: the sweep must not trust its old answer for it."""
        old = self._table.get(m.key)
        if old is not None:
            self._at.get((old.parent_id, old.target), set()).discard(m.key)
        self._table.add(m)
        self._at.setdefault((m.parent_id, m.target), set()).add(m.key)
        self._swept.pop(m.key, None)

    def _remove(self, key: int) -> Mount | None:
        old = self._table.pop(key)
        self._swept.pop(key, None)
        if old is not None:
            self._at.get((old.parent_id, old.target), set()).discard(key)
        return old

    def _reindex(self) -> None:
        self._at = {}
        for m in self._table:
            self._at.setdefault((m.parent_id, m.target), set()).add(m.key)

    def _retuck(
        self,
        parent: int | None,
        target: str | None,
        skip: int | None,
        out: list[Change],
        *,
        now: float,
        pid: int | None,
        comm: str | None,
    ) -> None:
        """A mount propagated to a place another mount covers is slid in underneath it,
        and an umount there hands the covering mount back to the parent below: either
        way the covering mount gets a new parent, and the kernel says nothing of it. So
        after an attach at (parent, target), and after a detach of X (its covering
        mount sits at (X, X's target)), re-describe what stands there."""
        for key in list(self._at.get((parent, target), ())):
            if key == skip:
                continue
            old = self._table.get(key)
            new = self._kernel.describe(key)
            if old is None or new is None or new == old:
                continue
            self._put(new)
            out.append(_event(now, "move", new, old, pid=pid, comm=comm))

    def _refresh_below(
        self, top: int, now: float, pid: int | None, comm: str | None, out: list[Change]
    ) -> None:
        """A moved mount takes its subtree along, but the kernel reports only the mount
        itself (and pivot_root only the two roots): re-describe the descendants and
        report each one whose place changed as a move, as the mountinfo diff would."""
        table = self._table
        kids: dict[int, list[int]] = {}
        for key, m in table.items():
            if m.parent_id is not None and m.parent_id != key:
                kids.setdefault(m.parent_id, []).append(key)
        todo = list(kids.get(top, ()))
        seen = {top}
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            todo.extend(kids.get(key, ()))
            old = table.get(key)
            new = self._kernel.describe(key)
            if old is None or new is None or new == old:
                continue  # gone: its DETACH follows
            self._put(new)
            out.append(_event(now, "move", new, old, pid=pid, comm=comm))

    # ------------------------------------------------------------- POLLPRI and sweeps

    def pollpri(self) -> None:
        """mountinfo's POLLPRI fired: a sweep is owed, whatever else explains it (a
        remount made while a mount or umount is under way raises no POLLPRI of its own)."""
        self._check_live()
        self.plan.poke()

    def wake_at(self, mono: float) -> float | None:
        """When (mono) the source should run `sweep_slice`: now, or when the budget
        or the background interval allows; None: only an fd wakes it."""
        if self._phase is not Phase.LIVE:
            return None
        return self.plan.wake_at(mono)

    def sweep_slice(self, mono: float, now: float) -> list[Change]:
        """Check the next few mounts the plan hands out (about one slice of CPU, or
        none when nothing is owed or the budget says wait); the source then reports
        what the slice cost with `spent`."""
        self._check_live()
        out: list[Change] = []
        ids = self.plan.take(mono, self._table.keys)
        for mid in ids:
            self._check(mid, now, out)
        return out

    def spent(self, cpu: float, mono: float) -> None:
        """The CPU seconds the last `sweep_slice` took."""
        self.plan.spent(cpu, mono)

    @property
    def sweeps(self) -> int:
        """Laps finished: sweeps that covered a POLLPRI or the interval."""
        return self.plan.laps

    def sweep(self, now: float) -> list[Change]:
        """A whole sweep at once, outside the plan and its budget (tests, tools)."""
        self._check_live()
        out: list[Change] = []
        for mid in sorted(self._table.keys()):
            self._check(mid, now, out)
        return out

    def _check(self, mid: int, now: float, out: list[Change]) -> None:
        """One step of a sweep: the mount's flags and fs options against the table's.

        An answer equal (by hash) to the last one for that mount is skipped undecoded;
        a mount whose options or propagation differ is replaced and reported.
        """
        answer = self._kernel.probe(mid)
        if answer is None:
            return  # gone: its DETACH is on the way
        digest = hash(answer)
        swept = self._swept
        if swept.get(mid) == digest:
            return  # unchanged since the last sweep, and not re-described since
        old = self._table.get(mid)
        if old is None:
            return  # new: its ATTACH is on the way
        swept[mid] = digest
        kernel = self._kernel
        s = kernel.decode(answer)
        if s.parent_id is not None and s.parent_id != old.parent_id:
            # a new parent no event told of (see _retuck): describe it anew
            moved = kernel.describe(mid)
            if moved is not None and moved != old:
                self._put(moved)
                out.append(_event(now, "move", moved, old))
                if moved.target != old.target:  # a move whose event is still on its way:
                    self._refresh_below(mid, now, None, None, out)  # its subtree came along
            return
        if s.options is None or s.fs_options is None or s.propagation is None:
            return
        if (s.options, s.fs_options, s.propagation) == (
            old.options,
            old.fs_options,
            old.propagation,
        ):
            return
        # One event per kind of change, propagation first: applied in order, they
        # give the kernel's record (a consumer filtering on either sees its own).
        cur = old
        if s.propagation != old.propagation:
            new = msgspec.structs.replace(cur, propagation=s.propagation)
            out.append(_event(now, "propagation", new, cur))
            cur = new
        if (s.options, s.fs_options) != (old.options, old.fs_options):
            new = msgspec.structs.replace(cur, options=s.options, fs_options=s.fs_options)
            out.append(_event(now, "remount", new, cur))
            cur = new
        self._table.add(cur)


def _event(
    now: float,
    action: Action,
    new: Mount,
    old: Mount | None = None,
    *,
    pid: int | None = None,
    comm: str | None = None,
) -> Event:
    return Event(
        seq=0, time=now, action=action, via="fanotify", mount=new, old=old, pid=pid, comm=comm
    )

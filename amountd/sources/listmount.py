"""The listmount source: unique IDs without fanotify mount events (Linux 6.8 to 6.14).

Waits for POLLPRI on /proc/PID/mountinfo like the mountinfo source (the kernel polls
the file for us, see loop.py), but never reads it: a wake-up asks the namespace's mount
count (one ioctl) and lists only the IDs above the highest one known (unique IDs only
grow; listmount pages by `param`, 512 IDs a page as libmount does). When the count is
what the table plus those new IDs make, nothing went away and only the new mounts are
described (one statmount each); otherwise the whole ID list is taken, as raw bytes, and
diffed with the last one by memcmp (layouts.diff_id_lists: ~0.5 ms of CPU at 10,000
mounts, nearly all of it the listmount calls, where ints and sets took ~1.5 ms), and the
gone mounts are described from the table. So a mount costs O(new mounts), and an umount
O(mounts) only in the kernel's listing and memcmp.

A remount, a move or a propagation change leaves the ID set as it was, and any POLLPRI
may hide one behind a mount or umount made at the same instant. So each POLLPRI makes
a sweep due: one statmount per mount, its answer hashed and skipped unparsed when it is
the same as last time's (`Tracker.check`), reported as `remount`, `propagation` or
`move` where it differs. When and what to sweep is the fanotify source's plan
(amountd/sweep.py's `SweepPlan`): slices of ~1 ms after the wake-up's mounts and
umounts, so none is held back by more than a slice; rounds paced to one per SWEEP_LAP
(1.2 s) under churn, within a CPU budget (a share of one core, with a burst so that a
lone remount in a quiet namespace is found at once); one round over the mounts in ID
order, a POLLPRI covered once the round is back where it came, so under churn a hidden
remount waits one round at most (SWEEP_LAP, or its CPU / the budget). A round also
starts every `sweep_interval` seconds, for propagation changes, which raise no POLLPRI.

Events say `via: mountinfo` (learnt from mountinfo's POLLPRI; `ready.source` says
`listmount`), carry unique IDs and no pid. Records are the fanotify source's: statmount,
with `propagate_from` of slave mounts asked from a thread inside the namespace.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Callable

import anyio
import anyio.lowlevel
import msgspec

from ..errors import AmountdError, NamespaceError
from ..kernel import consts as c
from ..kernel.errors import KernelError, MountGone, NamespaceGone
from ..kernel.layouts import (
    StatMount,
    diff_id_lists,
    parse_statmount,
    statmount_to_mount,
    unpack_ids,
)
from ..kernel.syscalls import listmount_raw, mntns_info, statmount
from ..loop import FdWatch, PriorityWatch, close_fd, fd_is_readable
from ..model import Action, End, Event, Mount
from ..ns import Namespace, own_ns_id
from ..sweep import SWEEP_BUDGET, SWEEP_INTERVAL, SweepBudget, SweepPlan
from ..table import MountTable, split_change
from .base import Change, Source
from .fanotify import Inside

__all__ = ["ListmountSource", "SweepBudget", "Tracker"]

PAGE = 512  # IDs per listmount call, as libmount asks
Stat = Callable[[int], bytes | None]
"""The raw statmount answer for a mount ID, None when the mount is gone."""
Describe = Callable[[bytes], Mount]
"""A raw statmount answer as the Mount mountinfo would show."""


class Tracker:
    """Sans-IO: the table of a namespace by unique ID, and the events that ID lists and
    statmount answers imply. The kernel is reached only through the `stat`/`describe`
    callables, so this is tested with plain values. ID lists are listmount's raw
    buffers (layouts.pack_ids makes one), ascending."""

    def __init__(self, stat: Stat, describe: Describe, *, ns_id: int | None = None) -> None:
        self.stat = stat
        self.describe = describe
        self.ns_id = ns_id
        self.table = MountTable()
        self._digests: dict[int, int] = {}  # mount ID -> hash of its last statmount answer
        self.top = 0  # the highest ID known
        # The IDs as last listed (a whole list, plus the fresh IDs listed since): a whole
        # relist is diffed against it by memcmp. It may hold IDs that are not in the
        # table (gone before they were described); the table's are all in it.
        self.ids = b""
        self.parsed = 0  # answers parsed by sweeps (the rest were skipped by their hash)
        self.checked = 0
        # A check found a mount of the table gone: the ID set is in doubt until it is
        # listed whole (an umount and a mount attached with an ID below `top`, e.g. a
        # clone made earlier, keep the count, so the count alone never tells).
        self.in_doubt = False

    def _read(self, mid: int) -> Mount | None:
        raw = self.stat(mid)
        if raw is None:
            return None
        self._digests[mid] = hash(raw)
        return self.describe(raw)

    def load(self, ids: bytes) -> None:
        """The first table: every listed mount described (one gone meanwhile is left out)."""
        listed = unpack_ids(ids)
        for mid in listed:
            m = self._read(mid)
            if m is not None:
                self.table.add(m)
        self.ids = ids
        if listed:
            self.top = max(self.top, listed[-1])

    def expected(self, fresh: bytes) -> int:
        """The mount count if the IDs above `top` (`fresh`) are all that changed."""
        table = self.table
        return len(table) + sum(1 for mid in unpack_ids(fresh) if mid not in table)

    def relist(self, ids: bytes, *, whole: bool, now: float) -> list[Event]:
        """Mounts and umounts: `ids` is the whole ID list (`whole`), or only the IDs
        above `top` when nothing went away. Umounts first, children before parents,
        then mounts, parents before children: each described by one statmount. A mount
        gone before it could be described was never seen, and is not reported."""
        table = self.table
        gone: list[Mount] = []
        if whole:  # diffed with the last list by memcmp: ints only for what differs
            self.in_doubt = False
            was, listed = diff_id_lists(self.ids, ids)
            self.ids = ids
            gone = [m for m in map(table.get, was) if m is not None]
            new = [mid for mid in listed if mid not in table]
        else:  # all above `top`, so above every ID of the last list
            self.ids += ids
            new = [mid for mid in unpack_ids(ids) if mid not in table]
        old_depth = {m.key: table.depth(m.key) for m in gone}  # before they leave
        for m in gone:
            table.pop(m.key)
            self._digests.pop(m.key, None)
        added: list[Mount] = []
        for mid in new:
            got = self._read(mid)
            if got is not None:
                table.add(got)
                added.append(got)
        if new:
            self.top = max(self.top, new[-1])
        gone.sort(key=lambda m: (-old_depth[m.key], m.target or "", m.key))
        added.sort(key=lambda m: (table.depth(m.key), m.target or "", m.key))
        out = [self._event("umount", m, None, now) for m in gone]
        out += [self._event("mount", m, None, now) for m in added]
        return out

    def check(self, mid: int, now: float) -> list[Event]:
        """One step of a sweep: the mount's answer against the table's record."""
        old = self.table.get(mid)
        if old is None:
            return []
        raw = self.stat(mid)
        if raw is None:  # gone: its umount's POLLPRI may have been explained away
            self.in_doubt = True
            return []
        self.checked += 1
        digest = hash(raw)
        if self._digests.get(mid) == digest:
            return []  # the same answer as last time: unchanged, and not parsed
        self._digests[mid] = digest
        self.parsed += 1
        new = self.describe(raw)
        if new == old:
            return []
        self.table.add(new)
        return [self._event(a, n, o, now) for a, o, n in split_change(old, new)]

    def _event(self, action: Action, m: Mount, old: Mount | None, now: float) -> Event:
        return Event(seq=0, time=now, action=action, via="mountinfo", mount=m, old=old)


def _inside(ns: Namespace, pid: int) -> Inside | None:
    """A thread inside the namespace, for slave mounts' propagate_from (None: not
    needed, our own namespace, or not allowed: they then read 0, as from outside)."""
    if ns.ns_id is None or ns.ns_id == own_ns_id():
        return None
    try:
        return Inside(f"/proc/{pid}/ns/mnt")
    except (AmountdError, OSError):
        return None


class ListmountSource(Source):
    kind = "listmount"

    def __init__(
        self,
        ns: Namespace,
        *,
        sweep_budget: float = SWEEP_BUDGET,
        sweep_interval: float = SWEEP_INTERVAL,
        sweep_burst: float | None = None,
    ) -> None:
        super().__init__(ns)
        if ns.pid is None:
            raise NamespaceError(
                f"no process lives in {ns.path}: the listmount source polls /proc/PID/mountinfo "
                "for changes; use --ns PID"
            )
        if ns.ns_id is None:
            raise AmountdError(
                f"this kernel ({os.uname().release}) gives no mount namespace IDs: "
                "listmount needs Linux 6.8+; use the mountinfo source"
            )
        self.pid: int = ns.pid
        self._ns_id: int = ns.ns_id
        self.sweep_interval = sweep_interval
        self._plan = SweepPlan(
            budget=sweep_budget,
            interval=sweep_interval,
            burst=sweep_burst,
            now=time.monotonic(),
        )
        self._watch: FdWatch | None = None
        self._pri: PriorityWatch | None = None
        self._mi = self._pidfd = self._nsfd = -1
        self._inside: Inside | None = None
        self.tracker = Tracker(self._stat, self._describe, ns_id=self._ns_id)
        self.relists = 0  # whole ID lists taken

    # ------------------------------------------------------------------- kernel shells

    def _stat(self, mid: int) -> bytes | None:
        try:
            return statmount(mid, self._ns_id)
        except MountGone:
            return None

    def _describe(self, raw: bytes) -> Mount:
        sm = parse_statmount(raw)
        return statmount_to_mount(self._fix_slave(sm))

    def _fix_slave(self, sm: StatMount) -> StatMount:
        """statmount gives a slave's propagate_from only to a caller inside the namespace."""
        inside = self._inside
        if inside is None or not (sm.mnt_propagation or 0) & c.MS_SLAVE or sm.mnt_id is None:
            return sm
        pf = inside.propagate_from(sm.mnt_id, self._ns_id)
        if pf is None:
            return sm
        return msgspec.structs.replace(sm, propagate_from=pf)

    def _count(self) -> int | None:
        if self._nsfd < 0:
            return None
        try:
            return mntns_info(self._nsfd)[0]
        except KernelError:
            return None

    # ------------------------------------------------------------------------- source

    @property
    def ns_id(self) -> int | None:
        return self._ns_id

    @property
    def parsed(self) -> int:
        return self.tracker.parsed

    async def arm(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
            self._mi = os.open(f"/proc/{self.pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        except (ProcessLookupError, FileNotFoundError):
            raise NamespaceError(f"process {self.pid} has exited") from None
        except PermissionError:
            raise NamespaceError(
                f"cannot read /proc/{self.pid}/mountinfo: watching another process's "
                "mounts needs root"
            ) from None
        try:
            self._nsfd = os.open(f"/proc/{self.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            mntns_info(self._nsfd)
        except (OSError, KernelError):  # before Linux 6.12: every wake-up lists all IDs
            if self._nsfd >= 0:
                os.close(self._nsfd)
            self._nsfd = -1
        self._pri = PriorityWatch(self._mi)
        self._watch = FdWatch()
        self._watch.add_readable(self._pri.fd)
        self._watch.add_readable(self._pidfd)
        self._inside = _inside(self.ns, self.pid)
        # Armed before listing: a change from here on raises POLLPRI.
        try:
            self.tracker.load(listmount_raw(self._ns_id, page=PAGE))
        except NamespaceGone:
            raise NamespaceError(f"the mount namespace of {self.ns.label} is gone") from None
        self.table = self.tracker.table
        self._plan.start(time.monotonic())

    def _relist(self, now: float) -> list[Event]:
        tr = self.tracker
        if not tr.in_doubt:
            nr = self._count()
            fresh = listmount_raw(self._ns_id, after=tr.top, page=PAGE)
            if nr is not None and nr == tr.expected(fresh):
                return tr.relist(fresh, whole=False, now=now)
        self.relists += 1
        return tr.relist(listmount_raw(self._ns_id, page=PAGE), whole=True, now=now)

    @property
    def sweeps(self) -> int:
        """Sweeps finished (rounds that covered a POLLPRI or the interval)."""
        return self._plan.laps

    @property
    def sweep_cpu(self) -> float:
        """CPU seconds the sweeps took (for benchmarks and tests)."""
        return self._plan.cpu

    @property
    def sweep_checks(self) -> int:
        """Mounts checked by sweeps (one statmount each)."""
        return self._plan.checks

    def _slice(self) -> list[Change]:
        """The mounts the plan hands out now (about one slice of CPU, or none),
        checked, and what that cost charged to the budget."""
        cpu = time.thread_time()
        now = time.time()
        out: list[Change] = []
        tr = self.tracker
        for mid in self._plan.take(time.monotonic(), tr.table.keys):
            out.extend(tr.check(mid, now))
        if tr.in_doubt:
            out.extend(self._relist(now))
        self._plan.spent(time.thread_time() - cpu, time.monotonic())
        return out

    async def changes(self) -> AsyncGenerator[list[Change], None]:
        watch, pri = self._watch, self._pri
        assert watch is not None and pri is not None, "arm() first"
        ended = f"namespace of pid {self.pid} ended: the process exited"
        while True:
            at = self._plan.wake_at(time.monotonic())
            if at is None or at > time.monotonic():
                await watch.wait(at)  # an fd, or the time a slice is owed
            else:
                await anyio.lowlevel.checkpoint()  # a slice at a time: others run between
            if fd_is_readable(self._pidfd):
                yield [End(reason=ended)]
                return
            if pri.fired():
                self._plan.poke()
                try:
                    out: list[Change] = [*self._relist(time.time())]
                except NamespaceGone:
                    yield [End(reason=ended)]
                    return
                if out:
                    yield out  # mounts and umounts first; then a slice, if one is owed
            try:
                swept = self._slice()
            except NamespaceGone:  # the whole list a gone mount asked for
                yield [End(reason=ended)]
                return
            if swept:
                yield swept

    def close(self) -> None:
        if self._inside is not None:
            self._inside.close()
            self._inside = None
        if self._pri is not None:
            self._pri.close()
            self._pri = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._pidfd >= 0:
            close_fd(self._pidfd)
        for fd in (self._mi, self._nsfd):
            if fd >= 0:
                os.close(fd)
        self._mi = self._pidfd = self._nsfd = -1

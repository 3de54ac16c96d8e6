"""The fanotify source: O(1) work per mount change (Linux 6.15+ mount events).

A FAN_REPORT_MNT group with a FAN_MARK_MNTNS mark reports attach and detach with the
mount's unique ID; statmount() describes what attached, the table describes what went
away. fanotify says nothing of remounts or propagation changes, so the namespace's
mountinfo is polled for POLLPRI alongside (the kernel polls it for us, see loop.py).

Every POLLPRI may hide a remount, whatever else explains it (a mount and a remount made
at the same instant raise one POLLPRI), so each one owes a verification sweep: one
statmount per mount without paths, compared to the table, an answer equal to the last
one skipped undecoded. Sweeps run in slices of about a millisecond between two reads
of the fanotify queue, so a mount or umount is never held back by more than a slice,
paced to one round per SWEEP_LAP under churn, and under a CPU budget (`sweep_budget`,
a share of one core); a background sweep every
`sweep_interval` seconds finds propagation changes, which raise no POLLPRI. The plan
(which mounts, when) is amountd/sweep.py's; this module only does the statmounts.

The mountinfo file we poll keeps the namespace alive, so it is dropped when the last
process we know in it exits; the namespace's end then arrives as fanotify DETACHes, one
per mount (or, when they overflow the queue, as a resync that can no longer list the
namespace).

What the events mean is decided by the pure FanotifyTracker (amountd/tracker.py);
this module waits, reads, parses, and answers the tracker's questions with syscalls.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor

import anyio
import anyio.lowlevel
import msgspec

from ..errors import AmountdError, NamespaceError
from ..kernel import consts as c
from ..kernel.errors import MountGone, NamespaceGone, PermissionDenied
from ..kernel.layouts import StatMount, parse_fanotify_events, parse_statmount, statmount_to_mount
from ..kernel.syscalls import (
    enter_mntns,
    fanotify_init,
    fanotify_mark,
    listmount,
    mntns_id,
    statmount,
)
from ..loop import FdWatch, PriorityWatch, close_fd
from ..model import Mount
from ..ns import Namespace, find_pid, open_ns, own_ns_id
from ..sweep import SWEEP_BUDGET, SWEEP_INTERVAL, SweepPlan
from ..table import MountTable
from ..tracker import FanotifyTracker, Phase, Swept, swept_of
from .base import Change, Source

__all__ = ["FanotifySource", "read_kernel_table"]

_SWEEP_MASK = (
    c.STATMOUNT_SB_BASIC | c.STATMOUNT_MNT_BASIC | c.STATMOUNT_PROPAGATE_FROM | c.STATMOUNT_MNT_OPTS
)
_READ_SIZE = 1 << 18  # ~6,500 events a read


class Inside:
    """A thread of ours inside the watched namespace, for what statmount computes
    against the caller's root: `propagate_from` is always 0 when asked from outside,
    and what the namespace's mountinfo shows when asked from in here.

    The thread keeps the namespace alive, so it lives only as long as a known process
    of the namespace does (like the mountinfo file the source polls).
    """

    def __init__(self, ns_path: str) -> None:
        fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
        failed: list[BaseException] = []
        try:
            self._pool = ThreadPoolExecutor(
                1, thread_name_prefix="amountd-ns", initializer=_enter, initargs=(fd, failed)
            )
            self._pool.submit(int).result()  # the thread is inside before the fd closes
        finally:
            os.close(fd)
        if failed:
            self._pool.shutdown()
            err = failed[0]
            why = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err)
            raise AmountdError(f"cannot enter the namespace: setns: {why}")

    def propagate_from(self, mnt_id: int, ns_id: int) -> int | None:
        try:
            return self._pool.submit(_propagate_from, mnt_id, ns_id).result()
        except MountGone:
            return None

    def close(self) -> None:
        self._pool.shutdown()


def _enter(fd: int, failed: list[BaseException]) -> None:
    try:
        enter_mntns(fd)  # setns(CLONE_NEWNS) needs CAP_SYS_ADMIN and CAP_SYS_CHROOT
    except Exception as e:  # reported by Inside(), not logged as a crash by the pool
        failed.append(e)


def _propagate_from(mnt_id: int, ns_id: int) -> int:
    sm = parse_statmount(statmount(mnt_id, ns_id, c.STATMOUNT_PROPAGATE_FROM))
    return sm.propagate_from or 0


def _fix_slave(sm: StatMount, inside: Inside | None, ns_id: int) -> StatMount:
    if inside is None or not (sm.mnt_propagation or 0) & c.MS_SLAVE or sm.mnt_id is None:
        return sm
    pf = inside.propagate_from(sm.mnt_id, ns_id)
    return sm if pf is None else msgspec.structs.replace(sm, propagate_from=pf)


def _describe(mnt_id: int, ns_id: int, inside: Inside | None = None) -> Mount | None:
    try:
        sm = parse_statmount(statmount(mnt_id, ns_id))
    except MountGone:
        return None
    return statmount_to_mount(_fix_slave(sm, inside, ns_id))


def _kernel_table(ns_id: int, inside: Inside | None = None) -> MountTable:
    table = MountTable()
    for mnt_id in listmount(ns_id):
        m = _describe(mnt_id, ns_id, inside)
        if m is not None:  # gone between listmount and statmount: not in the table
            table.add(m)
    return table


def _inside(ns: Namespace) -> Inside | None:
    """A thread inside `ns` where one is needed (not our own namespace) and allowed;
    raises AmountdError where it is needed and not allowed."""
    if ns.path is None or ns.ns_id is None or ns.ns_id == own_ns_id():
        return None
    try:
        return Inside(ns.path)
    except OSError as e:
        raise AmountdError(f"cannot enter the namespace ({e.strerror})") from None


def _inside_or_none(ns: Namespace) -> Inside | None:
    try:
        return _inside(ns)
    except AmountdError:
        return None


def read_kernel_table(ns: Namespace) -> MountTable:
    """listmount + statmount of every mount: the table with unique IDs."""
    if ns.ns_id is None:
        raise AmountdError(
            f"this kernel ({os.uname().release}) gives no mount namespace IDs (Linux 6.8+)"
        )
    inside = _inside_or_none(ns)
    try:
        return _kernel_table(ns.ns_id, inside)
    except NamespaceGone:
        raise NamespaceError(f"the mount namespace of {ns.label} is gone") from None
    finally:
        if inside is not None:
            inside.close()


def in_user_namespace() -> bool:
    """Whether we run in a user namespace other than the initial one (identity map)."""
    try:
        with open("/proc/self/uid_map", "rb") as f:
            lines = f.read().split()
    except OSError:
        return False
    return lines != [b"0", b"0", b"4294967295"]


def _comm(pid: int) -> str | None:
    # os.open/read: 3 syscalls per event, where open() makes 9 (fstat, isatty, seeks).
    try:
        fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 64).rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


_COMM_TTL = 1.0  # s a process's name is reused for its next events
_COMM_KEEP = 256  # names kept at most (then forgotten all at once)


class _Statmount:
    """The tracker's questions, answered by the kernel (the tracker's `Kernel`)."""

    def __init__(self, ns_id: int) -> None:
        self.ns_id = ns_id
        self.inside: Inside | None = None  # set while a process of the namespace is followed
        self._comms: dict[int, tuple[float, str | None]] = {}  # pid -> (read at, name)

    def describe(self, mnt_id: int) -> Mount | None:
        return _describe(mnt_id, self.ns_id, self.inside)

    def list_ids(self) -> list[int] | None:
        try:
            return listmount(self.ns_id)
        except NamespaceGone:
            return None

    def probe(self, mnt_id: int) -> bytes | None:
        """One statmount without paths: flags, fs options, propagation."""
        try:
            return statmount(mnt_id, self.ns_id, _SWEEP_MASK)
        except MountGone:
            return None

    def decode(self, answer: bytes) -> Swept:
        return swept_of(_fix_slave(parse_statmount(answer), self.inside, self.ns_id))

    def comm(self, pid: int) -> str | None:
        """A process's name, read once for the changes it makes within _COMM_TTL (3
        syscalls an event saved); a name changed (exec, prctl) or a PID reused within
        that second shows the old name."""
        now = time.monotonic()
        hit = self._comms.get(pid)
        if hit is not None and now - hit[0] < _COMM_TTL:
            return hit[1]
        name = _comm(pid)
        if len(self._comms) >= _COMM_KEEP:
            self._comms.clear()
        self._comms[pid] = (now, name)
        return name


class _Followed:
    """A process of the watched namespace: its pidfd (to notice its exit), its mountinfo
    (POLLPRI) and a thread inside it (for propagate_from). Each keeps the namespace
    alive: they are let go together."""

    def __init__(self, pid: int, pidfd: int, mi: int) -> None:
        self.pid, self.pidfd, self.mi = pid, pidfd, mi
        self.pri = PriorityWatch(mi)
        self.inside: Inside | None = None

    @classmethod
    def open(cls, pid: int) -> _Followed | None:
        """None when the process is gone (or its mountinfo cannot be opened)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        try:
            mi = os.open(f"/proc/{pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(pidfd)
            return None
        return cls(pid, pidfd, mi)

    def close(self, watch: FdWatch | None) -> None:
        if self.inside is not None:
            self.inside.close()
            self.inside = None
        if watch is not None:
            watch.remove(self.pri.fd)
        self.pri.close()
        if self.pidfd >= 0:
            if watch is not None:
                watch.remove(self.pidfd)
            close_fd(self.pidfd)
        if self.mi >= 0:
            os.close(self.mi)
        self.mi = self.pidfd = -1


class FanotifySource(Source):
    """Waits, reads and parses; the FanotifyTracker decides what the events mean."""

    kind = "fanotify"

    def __init__(
        self,
        ns: Namespace,
        *,
        unlimited_queue: bool = False,
        sweep_interval: float | None = SWEEP_INTERVAL,
        sweep_budget: float = SWEEP_BUDGET,
    ):
        super().__init__(ns)
        self.unlimited_queue = unlimited_queue
        self.sweep_interval = sweep_interval  # background sweeps (propagation changes)
        self.sweep_budget = sweep_budget  # the sweeps' share of one CPU
        self.inside_error: str | None = None
        self._ns_id = ns.ns_id
        self._fan = -1
        self._watch: FdWatch | None = None
        self._followed: _Followed | None = None
        self._kernel: _Statmount | None = None
        self._tracker: FanotifyTracker | None = None
        self._buf = bytearray(_READ_SIZE)

    @property
    def ns_id(self) -> int | None:
        return self._ns_id

    @property
    def sweeps(self) -> int:
        """Sweeps finished (laps that covered a POLLPRI or the interval)."""
        return 0 if self._tracker is None else self._tracker.sweeps

    @property
    def sweep_cpu(self) -> float:
        """CPU seconds the sweeps took (for benchmarks and tests)."""
        return 0.0 if self._tracker is None else self._tracker.plan.cpu

    @property
    def sweep_checks(self) -> int:
        """Mounts checked by sweeps (one statmount each)."""
        return 0 if self._tracker is None else self._tracker.plan.checks

    async def arm(self) -> None:
        flags = c.FAN_REPORT_MNT | c.FAN_CLOEXEC | c.FAN_NONBLOCK
        notes: list[str] = []
        if self.unlimited_queue:
            try:
                self._fan = fanotify_init(flags | c.FAN_UNLIMITED_QUEUE, os.O_RDONLY | os.O_CLOEXEC)
            except PermissionDenied:
                # Only real root may let a queue pin kernel memory without bound (a user
                # namespace's root may not): keep the bounded queue, recover by resync.
                notes.append(
                    "--unlimited-queue needs real root (not root in a user namespace): "
                    "using the bounded queue; an overflow is recovered by resync"
                )
        if self._fan < 0:
            self._fan = fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC)
        nsfd = open_ns(self.ns)
        try:
            fanotify_mark(
                self._fan,
                c.FAN_MARK_ADD | c.FAN_MARK_MNTNS,
                c.FAN_MNT_ATTACH | c.FAN_MNT_DETACH,
                nsfd,
                None,
            )
            ns_id = self._ns_id = mntns_id(nsfd)
        finally:
            os.close(nsfd)  # an open ns fd would keep the namespace (and its end) alive
        self._kernel = _Statmount(ns_id)
        self._watch = FdWatch()
        self._watch.add_readable(self._fan)
        if self.ns.pid is not None:
            self._follow(self.ns.pid)
        if in_user_namespace():
            notes.append(
                "pid and comm are not reported: fanotify names the process behind a change "
                "only to real root, not to root in a user namespace"
            )
        if self.inside_error is not None:
            notes.append(
                f"propagate_from of slave mounts reads 0 ({self.inside_error}; "
                "entering needs CAP_SYS_ADMIN and CAP_SYS_CHROOT)"
            )
        if self._followed is None:
            when = (
                "are not reported"
                if self.sweep_interval is None
                else f"are reported only by the sweep every {self.sweep_interval:g} s"
            )
            notes.append(
                f"remounts and propagation changes {when}: no process is known in "
                "the namespace to poll its mountinfo (give --ns a PID)"
            )
        self.reason = "; ".join(notes) or None
        # Marked before listing: a mount attached from here on is either listed or
        # reported (or both: an ATTACH for a listed mount is skipped).
        self.table = _kernel_table(ns_id, self._kernel.inside)
        mono = time.monotonic()
        plan = SweepPlan(budget=self.sweep_budget, interval=self.sweep_interval, now=mono)
        self._tracker = FanotifyTracker(ns_id, self._kernel, self.table, plan=plan)
        self._tracker.schedule(mono)

    # ---------------------------------------------------------------- mountinfo pollers

    def _follow(self, pid: int) -> None:
        """Poll /proc/PID/mountinfo for POLLPRI, and notice when PID exits."""
        self._drop_pid()
        f = _Followed.open(pid)
        if f is None:
            return
        assert self._watch is not None and self._kernel is not None
        self._followed = f
        self._watch.add_readable(f.pri.fd)
        self._watch.add_readable(f.pidfd)
        try:
            f.inside = _inside(msgspec.structs.replace(self.ns, path=f"/proc/{pid}/ns/mnt"))
        except AmountdError as e:
            self.inside_error = str(e)
        self._kernel.inside = f.inside

    def _drop_pid(self) -> None:
        """Let go of the namespace: an open mountinfo file keeps it alive."""
        if self._kernel is not None:
            self._kernel.inside = None
        if self._followed is not None:
            self._followed.close(self._watch)
            self._followed = None

    def _pid_exited(self) -> None:
        """Follow another process of the namespace, or let the namespace go."""
        self._drop_pid()
        pid = find_pid(self.ns)
        if pid is not None:
            self._follow(pid)

    # ------------------------------------------------------------------------ reading

    def _drain(self, tracker: FanotifyTracker, out: list[Change]) -> int:
        """Read every queued event into the tracker; how many were read."""
        n = 0
        while True:
            try:
                got = os.readv(self._fan, (self._buf,))  # no 256 KiB allocation per read
            except BlockingIOError:
                return n
            except OSError as e:
                raise AmountdError(f"reading fanotify events failed: {e.strerror}") from None
            events = parse_fanotify_events(memoryview(self._buf)[:got])
            n += len(events)
            out += tracker.feed(events, time.time())
            if tracker.phase is Phase.ENDED:
                return n
            if got < _READ_SIZE - 1024:
                return n  # a short read emptied the queue; what comes next wakes us

    async def changes(self) -> AsyncGenerator[list[Change], None]:
        watch, tracker = self._watch, self._tracker
        assert watch is not None and tracker is not None, "arm() first"
        while True:
            at = tracker.wake_at(time.monotonic())
            if at is None or at > time.monotonic():
                # An fd, or the time a sweep is owed (when the budget allows) or the
                # background interval is up: one wait, the fds registered across waits.
                ready = await watch.wait(at)
            else:  # between two slices of a sweep: let others run, look at the fds
                await anyio.lowlevel.checkpoint()
                ready = watch.ready()
            out: list[Change] = []
            if self._fan in ready:
                self._drain(tracker, out)
            f = self._followed
            pri = f is not None and f.pri.fd in ready and f.pri.fired()
            if pri and tracker.phase is Phase.LIVE:
                tracker.pollpri()
            self.table = tracker.table  # a resync builds a new one
            if tracker.phase is Phase.ENDED:
                yield out
                return
            if f is not None and f.pidfd in ready:
                self._pid_exited()
            if out:
                yield out  # events first; then a slice, if one is owed and allowed
            mono = time.monotonic()
            due = tracker.wake_at(mono)
            if due is None or due > mono:
                continue  # no slice owed now, or the budget says wait: no clock reads
            cpu = time.thread_time()
            swept = tracker.sweep_slice(mono, time.time())
            tracker.spent(time.thread_time() - cpu, time.monotonic())
            if swept:
                yield swept

    def close(self) -> None:
        self._drop_pid()
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._fan >= 0:
            close_fd(self._fan)
            self._fan = -1

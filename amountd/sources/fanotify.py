"""The fanotify source: O(1) work per mount change (Linux 6.15+ mount events).

A FAN_REPORT_MNT group with a FAN_MARK_MNTNS mark reports attach and detach with the
mount's unique ID; statmount() describes what attached, the table describes what went
away. fanotify says nothing of remounts or propagation changes, so the namespace's
mountinfo is polled for POLLPRI alongside: a POLLPRI that no fanotify event explains
starts a sweep (one statmount per mount, without paths) that finds what changed.

POLLPRI is raised by every mount change, remounts included, and before the change's
fanotify event is queued: a POLLPRI that the namespace's mount count (one ioctl) or a
fanotify event does not explain gives an event a moment (`grace`) to land, and the
loop sweeps only when none came. The kernel polls mountinfo for us (AIO, see loop.py),
so a change wakes the loop, and nothing else, once or twice. The mountinfo file we poll
keeps the namespace alive, so it is dropped when the last process we know in it exits;
the namespace's end then arrives as fanotify DETACHes, one per mount.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor

import anyio
import msgspec

from ..errors import AmountdError, NamespaceError
from ..kernel import consts as c
from ..kernel.errors import KernelError, MountGone, NamespaceGone, PermissionDenied
from ..kernel.layouts import (
    FanEvent,
    StatMount,
    fs_options_of,
    options_of,
    parse_fanotify_events,
    parse_statmount,
    propagation_of,
    statmount_to_mount,
)
from ..kernel.syscalls import (
    enter_mntns,
    fanotify_init,
    fanotify_mark,
    listmount,
    mntns_id,
    mntns_info,
    statmount,
)
from ..loop import FdWatch, PriorityWatch, close_fd
from ..model import Action, End, Event, Mount, Resync, fspath
from ..ns import Namespace, find_pid, open_ns, own_ns_id
from ..table import MountTable, diff
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


def _fan_event(
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


class FanotifySource(Source):
    kind = "fanotify"

    def __init__(self, ns: Namespace, *, unlimited_queue: bool = False, grace: float = 0.02):
        super().__init__(ns)
        self.unlimited_queue = unlimited_queue
        self.grace = grace
        self._ns_id = ns.ns_id
        self._fan = -1
        self._watch: FdWatch | None = None
        self._pid: int | None = None
        self._pidfd = -1
        self._mi = -1  # /proc/PID/mountinfo, for POLLPRI
        self._pri: PriorityWatch | None = None
        self._in: Inside | None = None  # a thread in the namespace, for propagate_from
        self._swept: dict[int, int] = {}  # mount ID -> hash of its last sweep answer
        self.inside_error: str | None = None
        self._nsfd = -1  # the namespace, for its mount count (kept as long as `_mi`)
        self._nr = -1  # its mount count when a POLLPRI was last explained
        self._unexplained: float | None = None  # when an unexplained POLLPRI's grace ends
        self._at: dict[tuple[int | None, str | None], set[int]] = {}  # (parent, target)
        self._buf = bytearray(_READ_SIZE)
        self.sweeps = 0

    @property
    def ns_id(self) -> int | None:
        return self._ns_id

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
            self._ns_id = mntns_id(nsfd)
        finally:
            os.close(nsfd)  # an open ns fd would keep the namespace (and its end) alive
        self._watch = FdWatch()
        self._watch.add_readable(self._fan)
        self._fan_poll = select.poll()  # is an event queued? (consumes nothing)
        self._fan_poll.register(self._fan, select.POLLIN)
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
        if self._pid is None:
            notes.append(
                "remounts and propagation changes are not reported: no process is known in "
                "the namespace to poll its mountinfo (give --ns a PID)"
            )
        self.reason = "; ".join(notes) or None
        # Marked before listing: a mount attached from here on is either listed or
        # reported (or both: an ATTACH for a listed mount is skipped).
        self.table = _kernel_table(self._ns_id, self._in)
        self._reindex()

    # ---------------------------------------------------------------- mountinfo pollers

    def _follow(self, pid: int) -> None:
        """Poll /proc/PID/mountinfo for POLLPRI, and notice when PID exits."""
        self._drop_pid()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            mi = os.open(f"/proc/{pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(pidfd)
            return
        assert self._watch is not None
        self._pid, self._pidfd, self._mi = pid, pidfd, mi
        try:
            self._nsfd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            self._nr = mntns_info(self._nsfd)[0]
        except (OSError, KernelError):  # before Linux 6.12: the grace alone decides
            if self._nsfd >= 0:
                os.close(self._nsfd)
            self._nsfd = -1
        self._pri = PriorityWatch(mi)
        self._watch.add_readable(self._pri.fd)
        self._watch.add_readable(pidfd)
        try:
            self._in = _inside(msgspec.structs.replace(self.ns, path=f"/proc/{pid}/ns/mnt"))
        except AmountdError as e:
            self.inside_error = str(e)

    def _drop_pid(self) -> None:
        """Let go of the namespace: an open mountinfo file keeps it alive."""
        if self._in is not None:
            self._in.close()
            self._in = None
        if self._pri is not None:
            if self._watch is not None:
                self._watch.remove(self._pri.fd)
            self._pri.close()
            self._pri = None
        if self._pidfd >= 0:
            if self._watch is not None:
                self._watch.remove(self._pidfd)
            close_fd(self._pidfd)
        for fd in (self._mi, self._nsfd):
            if fd >= 0:
                os.close(fd)
        self._pid = None
        self._mi = self._pidfd = self._nsfd = -1

    def _pid_exited(self) -> None:
        """Follow another process of the namespace, or let the namespace go."""
        self._drop_pid()
        pid = find_pid(self.ns)
        if pid is not None:
            self._follow(pid)

    def _apply(self, events: list[FanEvent], out: list[Change]) -> bool:
        """Turn kernel events into changes; False once the namespace is gone."""
        now = time.time()
        table = self.table
        ns_id = self._ns_id
        assert ns_id is not None
        comms: dict[int, str | None] = {}
        for ev in events:
            if ev.mask & c.FAN_Q_OVERFLOW:
                self._resync("overflow", out)
                continue
            mid = ev.mnt_id
            if mid is None:
                continue
            pid = ev.pid if ev.pid > 0 else None
            comm = None
            if pid is not None:
                comm = comms[pid] if pid in comms else comms.setdefault(pid, _comm(pid))
            attach = ev.mask & c.FAN_MNT_ATTACH
            detach = ev.mask & c.FAN_MNT_DETACH
            if attach and detach:  # a move (or pivot_root): same mount, new place
                old = table.get(mid)
                new = _describe(mid, ns_id, self._in)
                if new is None:
                    if old is not None:  # moved, then gone before we asked
                        continue  # its DETACH follows and reports it
                    new = Mount(id=mid, ns_id=ns_id)
                if new == old:
                    continue  # described at its new place already, by an earlier event
                self._put(new)
                action: Action = "move" if old is not None else "mount"
                out.append(_fan_event(now, action, new, old, pid=pid, comm=comm))
                if old is not None and new.target != old.target:
                    self._refresh_below(mid, now, pid, comm, out)
                self._retuck(new.parent_id, new.target, mid, out, now=now, pid=pid, comm=comm)
            elif attach:
                if mid in table:
                    continue  # listed at arm or resync time already
                new = _describe(mid, ns_id, self._in)
                if new is None:  # came and went: report it, with what we know
                    new = Mount(id=mid, ns_id=ns_id)
                self._put(new)
                out.append(_fan_event(now, "mount", new, pid=pid, comm=comm))
                self._retuck(new.parent_id, new.target, mid, out, now=now, pid=pid, comm=comm)
            elif detach:
                old = self._remove(mid)
                if old is None:
                    continue
                out.append(_fan_event(now, "umount", old, pid=pid, comm=comm))
                self._retuck(mid, old.target, None, out, now=now, pid=pid, comm=comm)
                if not len(table):
                    out.append(End(reason=f"mount namespace {ns_id} was freed"))
                    return False
        return True

    def _put(self, m: Mount) -> None:
        """A record freshly described: the sweep must not trust its old answer for it."""
        old = self.table.get(m.key)
        if old is not None:
            self._at.get((old.parent_id, old.target), set()).discard(m.key)
        self.table.add(m)
        self._at.setdefault((m.parent_id, m.target), set()).add(m.key)
        self._swept.pop(m.key, None)

    def _remove(self, key: int) -> Mount | None:
        old = self.table.pop(key)
        if old is not None:
            self._at.get((old.parent_id, old.target), set()).discard(key)
        return old

    def _reindex(self) -> None:
        self._at = {}
        for m in self.table:
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
            old = self.table.get(key)
            assert self._ns_id is not None
            new = _describe(key, self._ns_id, self._in)
            if old is None or new is None or new == old:
                continue
            self._put(new)
            out.append(_fan_event(now, "move", new, old, pid=pid, comm=comm))

    def _refresh_below(
        self, top: int, now: float, pid: int | None, comm: str | None, out: list[Change]
    ) -> None:
        """A moved mount takes its subtree along, but the kernel reports only the mount
        itself (and pivot_root only the two roots): re-describe the descendants and
        report each one whose place changed as a move, as the mountinfo diff would."""
        table = self.table
        ns_id = self._ns_id
        assert ns_id is not None
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
            new = _describe(key, ns_id, self._in)
            if old is None or new is None or new == old:
                continue  # gone: its DETACH follows
            self._put(new)
            out.append(_fan_event(now, "move", new, old, pid=pid, comm=comm))

    def _resync(self, reason: str, out: list[Change]) -> None:
        """Rebuild from listmount + statmount; the difference goes out `via: resync`."""
        out.append(Resync(seq=0, reason=reason))
        assert self._ns_id is not None
        try:
            new = _kernel_table(self._ns_id, self._in)
        except NamespaceGone:
            new = MountTable()
        out.extend(diff(self.table, new, via="resync", time=time.time(), ns_id=self._ns_id))
        self.table = new
        self._reindex()
        self._swept.clear()

    def _sweep(self, out: list[Change]) -> None:
        """Find remounts and propagation changes: flags and fs options of every mount.

        One statmount without paths per mount; an answer equal to the last sweep's for
        that mount (by hash) is skipped unparsed, and a mount whose options or
        propagation differ from the table's is replaced and reported.
        """
        self.sweeps += 1
        ns_id = self._ns_id
        assert ns_id is not None
        table = self.table
        swept = self._swept
        now = time.time()
        try:
            ids = listmount(ns_id)
        except NamespaceGone:
            return
        if len(swept) > 2 * len(ids):  # forget mounts that are gone
            live = set(ids)
            self._swept = swept = {k: v for k, v in swept.items() if k in live}
        for mid in ids:
            old = table.get(mid)
            if old is None:
                continue  # new: its ATTACH is on the way
            try:
                raw = statmount(mid, ns_id, _SWEEP_MASK)
            except MountGone:
                continue  # its DETACH is on the way
            digest = hash(raw)
            if swept.get(mid) == digest:
                continue  # unchanged since the last sweep, and not re-described since
            swept[mid] = digest
            sm = parse_statmount(raw)
            sm = _fix_slave(sm, self._in, ns_id)
            if sm.mnt_parent_id is not None and sm.mnt_parent_id != old.parent_id:
                # a new parent no event told of (see _retuck): describe it anew
                moved = _describe(mid, ns_id, self._in)
                if moved is not None and moved != old:
                    self._put(moved)
                    out.append(_fan_event(now, "move", moved, old))
                continue
            if sm.mnt_attr is None or sm.sb_flags is None or sm.mnt_propagation is None:
                continue
            options = options_of(sm.mnt_attr)
            fs_options = fspath(fs_options_of(sm.sb_flags, sm.mnt_opts))
            propagation = propagation_of(
                sm.mnt_propagation,
                sm.mnt_peer_group or 0,
                sm.mnt_master or 0,
                sm.propagate_from or 0,
            )
            if (options, fs_options, propagation) == (old.options, old.fs_options, old.propagation):
                continue
            new = msgspec.structs.replace(
                old, options=options, fs_options=fs_options, propagation=propagation
            )
            action: Action = (
                "remount"
                if (options, fs_options) != (old.options, old.fs_options)
                else "propagation"
            )
            table.add(new)
            out.append(_fan_event(now, action, new, old))

    def _drain(self, out: list[Change]) -> tuple[int, bool]:
        """Read every queued event; (how many, whether the namespace lives on)."""
        n = 0
        while True:
            try:
                got = os.readv(self._fan, (self._buf,))  # no 256 KiB allocation per read
            except BlockingIOError:
                return n, True
            except OSError as e:
                raise AmountdError(f"reading fanotify events failed: {e.strerror}") from None
            events = parse_fanotify_events(memoryview(self._buf)[:got])
            n += len(events)
            if not self._apply(events, out):
                return n, False
            if got < _READ_SIZE - 1024:
                return n, True  # a short read emptied the queue; what comes next wakes us

    def _explained(self, drained: int) -> bool:
        """Does a fanotify event account for the POLLPRI that just came?

        A mount or umount changes the namespace's mount count (NS_MNT_GET_INFO, one
        ioctl) and a remount does not: a changed count is explained at once, whenever
        its fanotify event lands (measured: up to ~20 ms after the POLLPRI under load).
        An unchanged count is a remount, a propagation change, a move, or a mount and
        umount taken together: an event read in the same wake-up, queued, or landing
        within `grace` explains it; else the loop sweeps. Polling the fanotify fd
        consumes nothing.
        """
        if self._nsfd >= 0:
            try:
                nr = mntns_info(self._nsfd)[0]
            except KernelError:
                nr = -1
            if nr != self._nr:  # a mount or umount: fanotify reports it, now or soon
                self._nr = nr
                return True
        return drained > 0 or bool(self._fan_poll.poll(0))

    async def changes(self) -> AsyncGenerator[list[Change], None]:
        watch = self._watch
        assert watch is not None, "arm() first"
        while True:
            due = self._unexplained
            if due is None:
                ready = await watch.wait()
            else:  # an unexplained POLLPRI: wake by its grace's end at the latest
                ready = []
                with anyio.move_on_after(due - anyio.current_time()):
                    ready = await watch.wait()
            out: list[Change] = []
            alive = True
            drained = 0
            if self._fan in ready:
                drained, alive = self._drain(out)
            pri = self._pri
            if alive and pri is not None:
                if pri.fd in ready and pri.fired() and not self._explained(drained):
                    if self._unexplained is None:
                        self._unexplained = anyio.current_time() + self.grace
                elif drained:
                    self._unexplained = None  # the event it waited for came
                if self._unexplained is not None and anyio.current_time() >= self._unexplained:
                    self._unexplained = None
                    self._sweep(out)  # a POLLPRI that no fanotify event explained
            if not alive:
                yield out
                return
            if self._pidfd >= 0 and self._pidfd in ready:
                self._pid_exited()
            if out:
                yield out

    def close(self) -> None:
        self._drop_pid()
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._fan >= 0:
            close_fd(self._fan)
            self._fan = -1

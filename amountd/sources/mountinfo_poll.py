"""The fallback source: POLLPRI on /proc/PID/mountinfo, re-read, diff.

O(mounts) per change by nature; it exists for kernels without fanotify mount events.
The mountinfo file we poll stays open (POLLPRI is per open file), but every re-read
opens the file afresh: an open mountinfo file keeps the root it was opened with, so
after a pivot_root it would show the old view. The watched process's exit is noticed
through a pidfd in the same epoll set, and ends the watch.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import AsyncGenerator

from ..errors import NamespaceError
from ..loop import FdWatch, PriorityWatch, close_fd, fd_is_readable
from ..model import End
from ..mountinfo import parse_mountinfo
from ..ns import Namespace
from ..table import MountTable, diff
from .base import Change, Source

__all__ = ["MountinfoSource", "read_mountinfo"]

_CHUNK = 1 << 20


def read_mountinfo(path: str) -> bytes:
    """The whole file in as few reads as the kernel allows (seq_file hands out pages)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, _CHUNK):
            parts.append(chunk)
    finally:
        os.close(fd)
    return b"".join(parts)


_EXITED = frozenset({errno.ENOENT, errno.ESRCH, errno.EINVAL})
"""What opening /proc/PID/mountinfo says of a process that is gone or exiting (EINVAL:
it has already let go of its namespaces)."""


class MountinfoSource(Source):
    kind = "mountinfo"

    def __init__(self, ns: Namespace) -> None:
        super().__init__(ns)
        if ns.pid is None:
            raise NamespaceError(
                f"no process lives in {ns.path}: the mountinfo source reads /proc/PID/mountinfo; "
                "use --ns PID or --source fanotify"
            )
        self.pid: int = ns.pid
        self._path = f"/proc/{self.pid}/mountinfo"
        self._watch: FdWatch | None = None
        self._pri: PriorityWatch | None = None
        self._mi_fd = -1
        self._pidfd = -1

    async def arm(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
            self._mi_fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            raise NamespaceError(
                f"cannot read {self._path}: watching another process's mounts needs root"
            ) from None
        except OSError as e:
            if e.errno in _EXITED:
                raise NamespaceError(f"process {self.pid} has exited") from None
            raise
        self._pri = PriorityWatch(self._mi_fd)
        self._watch = FdWatch()
        self._watch.add_readable(self._pri.fd)
        self._watch.add_readable(self._pidfd)
        # Armed before the first read: a change from here on raises POLLPRI, and a
        # re-read that finds nothing new yields nothing.
        self.table = self.read()

    def read(self) -> MountTable:
        """The table as /proc/PID/mountinfo shows it now (a fresh open each time)."""
        try:
            data = read_mountinfo(self._path)
        except OSError as e:
            if e.errno in _EXITED:
                raise NamespaceError(f"process {self.pid} has exited") from None
            raise
        return MountTable(parse_mountinfo(data, ns_id=self.ns_id))

    async def changes(self) -> AsyncGenerator[list[Change], None]:
        watch, pri = self._watch, self._pri
        assert watch is not None and pri is not None, "arm() first"
        while True:
            await watch.wait()
            if fd_is_readable(self._pidfd):
                yield [End(reason=f"namespace of pid {self.pid} ended: the process exited")]
                return
            if not pri.fired():
                continue
            try:
                new = self.read()
            except NamespaceError:
                yield [End(reason=f"namespace of pid {self.pid} ended: the process exited")]
                return
            events = diff(self.table, new, via="mountinfo", time=time.time(), ns_id=self.ns_id)
            self.table = new  # what applying `events` to the old table gives, for free
            if events:
                yield list(events)

    def close(self) -> None:
        if self._pri is not None:
            self._pri.close()
            self._pri = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        for fd in (self._mi_fd, self._pidfd):
            if fd >= 0:
                close_fd(fd)
        self._mi_fd = self._pidfd = -1

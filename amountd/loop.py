"""The one place that waits on kernel fds, through anyio (trio and asyncio alike).

Readable fds (fanotify, pidfds, eventfds) go into an epoll set whose own fd the loop
awaits. POLLPRI on a mountinfo file cannot go there: the kernel reports a mountinfo
change once per open file, to whichever poll looks first, and asyncio re-registers a
reader on every wait, so the kernel's check at registration eats the change before the
loop is told. So one thread of ours is the only poller of that file (blocked in
poll(), costing nothing while idle) and turns each POLLPRI into an eventfd count, which
stays readable until read.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable

import anyio

__all__ = ["FdWatch", "PriorityWatch", "close_fd", "fd_is_readable", "wait_readable"]


async def wait_readable(fd: int) -> None:
    await anyio.wait_readable(fd)


def _notify_closing(fd: int) -> None:
    with contextlib.suppress(RuntimeError):  # no event loop running: nobody waits
        anyio.notify_closing(fd)


def close_fd(fd: int) -> None:
    """Close an fd the loop might be waiting on, telling the loop first."""
    _notify_closing(fd)
    os.close(fd)


def fd_is_readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


class FdWatch:
    """Several readable fds behind one epoll fd the event loop can await."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._closed = False

    def add_readable(self, fd: int) -> None:
        self._ep.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        self._ep.unregister(fd)

    async def wait(self) -> list[int]:
        """Wait until one fd is readable; the fds that are (level-triggered: still so)."""
        await anyio.wait_readable(self._ep.fileno())
        return [fd for fd, _ in self._ep.poll(0)]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _notify_closing(self._ep.fileno())
            self._ep.close()


class PriorityWatch:
    """POLLPRI on one fd, seen by our thread alone, counted in an eventfd (`fd`).

    `explained`, when given, runs in that thread on each POLLPRI: if it returns True
    the POLLPRI is not passed on, so the loop is not woken for what something else
    (fanotify) reports anyway.
    """

    def __init__(self, fd: int, explained: Callable[[], bool] | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._explained = explained
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLPRI)
        self._poll.register(self._stop, select.POLLIN)
        self._thread = threading.Thread(target=self._run, name="amountd-pollpri", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        explained = self._explained
        while True:
            for fd, ev in self._poll.poll():
                if fd == self._stop or ev & select.POLLNVAL:
                    return
                if ev & select.POLLPRI and (explained is None or not explained()):
                    os.eventfd_write(self.fd, 1)

    def fired(self) -> bool:
        """Whether a POLLPRI came (and was not explained) since the last call."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self._stop < 0:
            return
        os.eventfd_write(self._stop, 1)
        self._thread.join()
        os.close(self._stop)
        self._stop = -1
        close_fd(self.fd)

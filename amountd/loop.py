"""The one place that waits on kernel fds, through anyio (trio and asyncio alike).

Readable fds (fanotify, pidfds, eventfds) go into an epoll set whose own fd the loop
awaits. POLLPRI on a mountinfo file cannot go there: the kernel reports a mountinfo
change once per open file, to whichever poll looks first, and asyncio re-registers a
reader on every wait, so the kernel's check at registration eats the change before the
loop is told. So the file is polled by the kernel itself, through a Linux AIO poll
request that signals an eventfd (which stays readable until read), and only where AIO
is not to be had by one thread of ours, blocked in poll(), doing the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
import time

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
    """Several readable fds behind one epoll fd the event loop can await.

    On asyncio the epoll fd stays registered with the loop from one wait to the next
    (anyio.wait_readable adds and removes a reader per wait: two epoll_ctl calls and a
    loop handle per change). It is let go only when it turns readable with nobody
    waiting, so that a level-triggered fd no one reads cannot spin the loop. Other
    backends wait through anyio.
    """

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # where the reader is added
        self._waiter: asyncio.Future[None] | None = None
        self._got: list[int] | None = None  # what the reader saw ready, for its waiter
        self._timer: asyncio.TimerHandle | None = None  # the deadline, kept across waits
        self._timer_at = 0.0
        self._asyncio: bool | None = None  # decided at the first wait

    def add_readable(self, fd: int) -> None:
        self._ep.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        self._ep.unregister(fd)

    async def wait(self, deadline: float | None = None) -> list[int]:
        """Wait until one fd is readable, or until `deadline` (time.monotonic()) has
        passed; the fds readable then (level-triggered: still so; empty at the deadline)."""
        if self._asyncio is None:
            self._asyncio = _on_asyncio()
        if self._asyncio:
            await self._wait_asyncio(deadline)
            got, self._got = self._got, None
            return self.ready() if got is None else got
        if deadline is None:
            await anyio.wait_readable(self._ep.fileno())
        else:
            with anyio.move_on_after(deadline - time.monotonic()):
                await anyio.wait_readable(self._ep.fileno())
        return self.ready()

    def _on_readable(self) -> None:
        w = self._waiter
        if w is None:  # nobody waits: let go, the next wait adds the reader again
            self._unregister()
            return
        # The loop runs this after the tasks it had queued: the waiter may have read
        # what made the set ready since the loop looked (one change woke it twice).
        got = self._ep.poll(0)
        if got:
            self._got = [fd for fd, _ in got]
            _wake(w)

    def _on_deadline(self) -> None:
        self._timer = None
        if self._waiter is not None:
            _wake(self._waiter)

    def _arm_timer(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> None:
        """One timer while the deadline stays (within a ms): not one per wait."""
        t = self._timer
        if t is not None and (deadline is None or abs(self._timer_at - deadline) > 1e-3):
            t.cancel()
            t = self._timer = None
        if t is None and deadline is not None:
            self._timer = loop.call_later(deadline - time.monotonic(), self._on_deadline)
            self._timer_at = deadline

    def _unregister(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                self._loop.remove_reader(self._ep.fileno())
            self._loop = None

    async def _wait_asyncio(self, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._unregister()
            loop.add_reader(self._ep.fileno(), self._on_readable)
            self._loop = loop
        self._arm_timer(loop, deadline)
        self._got = None
        w = self._waiter = loop.create_future()
        try:
            await w
        finally:
            self._waiter = None

    def ready(self) -> list[int]:
        """The fds readable now, without waiting."""
        return [fd for fd, _ in self._ep.poll(0)]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._unregister()
            _notify_closing(self._ep.fileno())
            self._ep.close()


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        return False
    return True


def _wake(w: asyncio.Future[None]) -> None:
    if not w.done():
        w.set_result(None)


class PriorityWatch:
    """POLLPRI on one fd, counted in an eventfd (`fd`) the loop awaits with the rest.

    The kernel polls the file (AIO IOCB_CMD_POLL, one-shot, rearmed by `fired()`): no
    thread wakes with each change, so the loop wakes once for a change that also
    brings a fanotify event, not once more plus a GIL hand-over between two threads
    (measured: that hand-over was most of the CPU a change cost). Where AIO is refused,
    a thread polls instead (`thread` says which).
    """

    def __init__(self, fd: int) -> None:
        from .kernel.errors import KernelError
        from .kernel.syscalls import AioPoll

        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._aio: AioPoll | None = None
        self._thread: threading.Thread | None = None
        self._stop = -1
        try:
            self._aio = AioPoll(fd, select.POLLPRI, self.fd)
        except KernelError:
            self._stop = os.eventfd(0, os.EFD_CLOEXEC)
            self._poll = select.poll()
            self._poll.register(fd, select.POLLPRI)
            self._poll.register(self._stop, select.POLLIN)
            self._thread = threading.Thread(target=self._run, name="amountd-pollpri", daemon=True)
            self._thread.start()

    @property
    def thread(self) -> bool:
        """Whether a thread of ours polls (AIO was refused)."""
        return self._thread is not None

    def _run(self) -> None:
        while True:
            for fd, ev in self._poll.poll():
                if fd == self._stop or ev & select.POLLNVAL:
                    return
                if ev & select.POLLPRI:
                    os.eventfd_write(self.fd, 1)

    def fired(self) -> bool:
        """Whether a POLLPRI came since the last call (and, by AIO, poll again)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return False
        if self._aio is not None:
            self._aio.rearm()
        return True

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._aio is not None:
            self._aio.close()
            self._aio = None
        if self._thread is not None:
            os.eventfd_write(self._stop, 1)
            self._thread.join()
            os.close(self._stop)
            self._stop = -1
            self._thread = None
        close_fd(self.fd)
        self.fd = -1

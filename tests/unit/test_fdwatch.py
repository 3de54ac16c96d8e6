"""The hot path's pieces: loop.FdWatch (one wait for several fds, with a deadline, on
asyncio and trio alike; on asyncio the epoll fd stays registered with the loop from one
wait to the next) and the fanotify source's cache of process names."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import pytest

from amountd.loop import FdWatch

pytestmark = pytest.mark.anyio


@contextmanager
def watching() -> Iterator[tuple[FdWatch, int]]:
    """A watch on one fresh eventfd; both closed after."""
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    watch = FdWatch()
    try:
        watch.add_readable(a)
        yield watch, a
    finally:
        watch.close()
        os.close(a)


async def test_wait_returns_the_readable_fds_and_keeps_working_across_waits() -> None:
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    watch = FdWatch()
    try:
        watch.add_readable(a)
        watch.add_readable(b)
        for _ in range(3):  # the registration kept between waits still wakes us
            os.eventfd_write(b, 1)
            assert await watch.wait() == [b]
            os.eventfd_read(b)
            os.eventfd_write(a, 1)
            assert await watch.wait(time.monotonic() + 5) == [a]
            os.eventfd_read(a)
    finally:
        watch.close()
        os.close(a)
        os.close(b)


async def test_a_deadline_ends_the_wait_with_nothing_ready() -> None:
    with watching() as (watch, _):
        assert await watch.wait(time.monotonic() + 0.02) == []
        assert await watch.wait(time.monotonic() - 1) == []  # passed already


async def test_readable_while_nobody_waits_neither_spins_nor_is_lost() -> None:
    """An fd that turns readable between two waits (the source busy elsewhere) is seen
    by the next wait; meanwhile other tasks run (the loop does not spin on it)."""
    with watching() as (watch, a):
        os.eventfd_write(a, 1)
        assert await watch.wait() == [a]  # registered now, and still readable
        turns = 0
        with anyio.move_on_after(0.05):
            while True:
                await anyio.sleep(0.005)
                turns += 1
        assert turns >= 2
        assert await watch.wait(time.monotonic() + 5) == [a]


async def test_what_the_waiter_read_already_does_not_wake_its_next_wait() -> None:
    """One change, one wake-up: on asyncio the loop runs the reader's callback after
    the task it had queued, which by then has read the fd and waits again (the stale
    readiness woke that next wait for nothing, a second pass per change)."""
    with watching() as (watch, a):
        for _ in range(3):
            os.eventfd_write(a, 1)
            assert await watch.wait() == [a]
            os.eventfd_read(a)
            t0 = time.monotonic()
            assert await watch.wait(t0 + 0.05) == []
            assert time.monotonic() - t0 >= 0.045


async def test_a_deadline_kept_across_waits_still_ends_them() -> None:
    """The deadline's timer is kept from one wait to the next while it stays: a wait
    woken by an fd, then one to the same deadline, ends there."""
    with watching() as (watch, a):
        deadline = time.monotonic() + 0.1
        os.eventfd_write(a, 1)
        assert await watch.wait(deadline) == [a]
        os.eventfd_read(a)
        assert await watch.wait(deadline) == []
        assert deadline - 0.005 <= time.monotonic() < deadline + 0.05
        later = time.monotonic() + 0.03  # and a new deadline gets a new timer
        assert await watch.wait(later) == []
        assert time.monotonic() >= later - 0.005


async def test_a_cancelled_wait_leaves_the_watch_usable() -> None:
    with watching() as (watch, a):
        with anyio.move_on_after(0.02) as scope:
            await watch.wait()
        assert scope.cancelled_caught
        os.eventfd_write(a, 1)
        assert await watch.wait(time.monotonic() + 5) == [a]


def test_a_process_name_is_read_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """fanotify's pid -> comm: read once for the changes one process makes in a row,
    read again once _COMM_TTL has passed."""
    from amountd.sources import fanotify

    reads: list[int] = []

    def comm(pid: int) -> str:
        reads.append(pid)
        return f"p{pid}"

    clock = [100.0]
    monkeypatch.setattr(fanotify, "_comm", comm)
    monkeypatch.setattr(fanotify.time, "monotonic", lambda: clock[0])
    kernel = fanotify._Statmount(1 << 32)
    assert [kernel.comm(7), kernel.comm(7), kernel.comm(8)] == ["p7", "p7", "p8"]
    assert reads == [7, 8]
    clock[0] += fanotify._COMM_TTL
    assert kernel.comm(7) == "p7"
    assert reads == [7, 8, 7]

"""loop.py: POLLPRI on a mountinfo file reaches the loop, by the kernel's AIO poll or,
where AIO is refused, by a thread."""

from __future__ import annotations

import os
import time

import pytest

from amountd.kernel import syscalls
from amountd.kernel.errors import KernelError
from amountd.loop import PriorityWatch, fd_is_readable

from ..conftest import PrivateNs


def _fired_within(watch: PriorityWatch, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if watch.fired():
            return True
        time.sleep(0.005)
    return False


def _exercise(ns: PrivateNs, watch: PriorityWatch) -> None:
    """Nothing before a change; one change fires once; changes made while nobody looks
    are not lost (the re-armed poll sees them at once); a remount fires too."""
    assert not fd_is_readable(watch.fd) and not watch.fired()
    a = ns.path("a")
    ns.mkdir(a)
    ns.run("mount", "-t", "tmpfs", "t", a)
    assert _fired_within(watch)
    time.sleep(0.05)
    assert not watch.fired()  # one change, one wake-up
    ns.run("umount", a)  # made while nobody reads the eventfd
    assert _fired_within(watch)
    ns.run("mount", "-o", "remount,size=2m", ns.path())
    assert _fired_within(watch)
    time.sleep(0.05)
    assert not watch.fired()


def test_pollpri_by_aio(private_ns: PrivateNs) -> None:
    fd = os.open(f"/proc/{private_ns.pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    watch = PriorityWatch(fd)
    try:
        if watch.thread:
            pytest.skip("Linux AIO is refused here (CONFIG_AIO off, seccomp, aio-max-nr)")
        _exercise(private_ns, watch)
    finally:
        watch.close()
        os.close(fd)


def test_pollpri_by_a_thread_where_aio_is_refused(
    private_ns: PrivateNs, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Refused:
        def __init__(self, *args: object) -> None:
            raise KernelError(38, "io_setup: Function not implemented")

    monkeypatch.setattr(syscalls, "AioPoll", Refused)
    fd = os.open(f"/proc/{private_ns.pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    watch = PriorityWatch(fd)
    try:
        assert watch.thread
        _exercise(private_ns, watch)
    finally:
        watch.close()
        os.close(fd)
    watch.close()  # twice: harmless

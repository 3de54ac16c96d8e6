"""The pure rules that bound hostile clients (amountd.limits) and the accept loop that
outlives a shortage of fds (amountd.accept)."""

from __future__ import annotations

import errno
import resource

import anyio
import anyio.abc
import pytest

from amountd.accept import ResilientListener, resilient
from amountd.limits import Connections, Guesses, RateLog, effective_cap, raise_nofile


def test_total_and_per_uid_caps() -> None:
    c = Connections(limit=3, per_key=2)
    assert c.open() and c.join(1000)
    assert c.open() and c.join(1000)
    assert c.open() and not c.join(1000)  # uid 1000 is at its cap
    c.close()  # that third one is refused and closed
    assert c.open() and c.join(1001)
    assert not c.open()  # three open: the total cap
    assert (c.total, c.count(1000), c.count(1001), c.refused) == (3, 2, 1, 2)
    c.leave(1000)
    c.close()
    assert c.open() and c.join(1000)
    assert c.by_key() == {1000: 2, 1001: 1}


def test_root_is_held_to_the_total_cap_only() -> None:
    c = Connections(limit=5, per_key=1)
    for _ in range(5):
        assert c.open() and c.join(0)
    assert not c.open()
    assert c.count(0) == 5


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Connections(limit=0, per_key=1)


def test_effective_cap_leaves_room_below_the_fd_limit() -> None:
    assert effective_cap(1024, 256) == 192
    assert effective_cap(100, 65536) == 100
    assert effective_cap(1024, 10) == 1


def test_raise_nofile_reaches_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        got = raise_nofile()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == got
        assert hard in (got, resource.RLIM_INFINITY)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_rate_log_once_per_interval_per_key_with_counts() -> None:
    r = RateLog(interval=1.0, keys=2)
    assert r.allow(1000, 0.0) == 0
    assert r.allow(1000, 0.2) is None
    assert r.allow(1000, 0.9) is None
    assert r.allow(1001, 0.9) == 0  # another uid has its own budget
    assert r.allow(1000, 1.0) == 2  # two held back since the last line
    assert r.allow(1000, 2.5) == 0
    r.allow(1002, 3.0)  # a third key: the least recently logged one is forgotten
    assert r.allow(1001, 3.0) == 0


def test_guesses_slow_down_then_forget() -> None:
    g = Guesses(step=0.1, cap=0.5, forget=60.0, peers=2)
    waits = [g.failed("10.0.0.1", t) for t in range(8)]
    assert waits == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5])
    assert g.failed("10.0.0.1", 100.0) == pytest.approx(0.1)  # quiet for 60 s: starts over
    g.failed("a", 100.0)
    g.failed("b", 100.0)
    assert len(g) == 2 and g.failures("10.0.0.1") == 0  # bounded: the oldest went


class _Failing(anyio.abc.Listener[int]):
    """accept() fails with `errors` in turn, then hands out 1, 2, 3, ... until closed."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.n = 0

    async def accept(self) -> int:
        await anyio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        self.n += 1
        if self.n > 3:
            raise anyio.ClosedResourceError
        return self.n

    async def serve(self, handler: object, task_group: object = None) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
async def test_accept_survives_emfile_enfile_enomem(caplog: pytest.LogCaptureFixture) -> None:
    errs: list[BaseException] = [
        OSError(errno.EMFILE, "Too many open files"),
        OSError(errno.EMFILE, "Too many open files"),
        anyio.BrokenResourceError(),  # how anyio's Unix listener wraps it
        OSError(errno.ENOMEM, "Cannot allocate memory"),
        OSError(errno.ECONNABORTED, "aborted"),
    ]
    errs[2].__cause__ = OSError(errno.ENFILE, "Too many open files in system")
    inner = _Failing(errs)
    lst = ResilientListener(inner, "unix:/x")
    got: list[int] = []

    async def handler(n: int) -> None:
        got.append(n)

    async with anyio.create_task_group() as tg:
        with pytest.raises(anyio.ClosedResourceError):
            await lst.serve(handler, tg)
    assert got == [1, 2, 3]
    assert lst.shortages == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # Once per interval and errno: the second EMFILE is held back.
    assert [w.split(": ")[2].split(";")[0] for w in warnings] == ["EMFILE", "ENFILE", "ENOMEM"]


@pytest.mark.anyio
async def test_accept_raises_what_is_not_a_shortage() -> None:
    lst = ResilientListener(_Failing([OSError(errno.EBADF, "Bad file descriptor")]))

    async def handler(n: int) -> None:
        pass

    async with anyio.create_task_group() as tg:
        with pytest.raises(OSError, match="Bad file"):
            await lst.serve(handler, tg)


@pytest.mark.anyio
async def test_resilient_wraps_every_address_and_keeps_their_names() -> None:
    tcp = await anyio.create_tcp_listener(local_host="localhost", local_port=0)
    async with tcp:
        wrapped = resilient(tcp, "tcp:localhost:0")
        inner = getattr(wrapped, "listeners", [wrapped])
        assert all(isinstance(one, ResilientListener) for one in inner)
        for one in inner:
            host, port = one.extra(anyio.abc.SocketAttribute.local_address)[:2]
            assert port > 0 and host in ("127.0.0.1", "::1")
        assert resilient(wrapped) is wrapped or all(
            isinstance(x, ResilientListener) for x in getattr(wrapped, "listeners", [])
        )

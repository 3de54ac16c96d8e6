"""`arm_source`, the one way a source is opened (`open_source`, and each namespace of a
MultiSource): fanotify, or mountinfo with the reason why, and nothing left open."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest

from amountd import sources
from amountd.errors import AmountdError, UsageError
from amountd.ns import Namespace
from amountd.sources import Change, Source, arm_source, open_source
from amountd.sources import multi as multi_mod

pytestmark = pytest.mark.anyio

NS = Namespace(path=None, pid=1, ns_id=None, inode=0, dev=0)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Fake(Source):
    kind = "fake"

    def __init__(self, fails: BaseException | None = None) -> None:
        super().__init__(NS)
        self.fails = fails
        self.closed = 0

    async def arm(self) -> None:
        if self.fails is not None:
            raise self.fails

    async def changes(self) -> AsyncGenerator[list[Change], None]:
        yield []

    def close(self) -> None:
        self.closed += 1


def fakes(
    monkeypatch: pytest.MonkeyPatch, fan: BaseException | None, info: BaseException | None = None
) -> tuple[Fake, Fake]:
    f, m = Fake(fan), Fake(info)
    monkeypatch.setattr(sources, "_fanotify", lambda ns, unlimited, sweep: f)
    monkeypatch.setattr(sources, "_mountinfo", lambda ns: m)
    return f, m


async def test_fanotify_when_it_arms(monkeypatch: pytest.MonkeyPatch) -> None:
    f, m = fakes(monkeypatch, None)
    assert await arm_source("auto", NS) is f
    assert (f.closed, m.closed, f.reason) == (0, 0, None)


async def test_auto_falls_back_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    f, m = fakes(monkeypatch, AmountdError("no CAP_SYS_ADMIN"))
    assert await arm_source("auto", NS) is m
    assert f.closed == 1
    # auto tries listmount between the two (not faked here: it refuses a namespace
    # without an ID), and the reason names each step.
    assert m.reason is not None
    assert m.reason.startswith("fanotify_init unavailable: no CAP_SYS_ADMIN; using listmount")
    assert m.reason.endswith("using mountinfo")


async def test_fanotify_asked_for_is_not_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    f, m = fakes(monkeypatch, AmountdError("no CAP_SYS_ADMIN"))
    with pytest.raises(AmountdError, match="CAP_SYS_ADMIN"):
        await arm_source("fanotify", NS)
    assert (f.closed, m.closed) == (1, 0)
    with pytest.raises(UsageError, match="unknown source"):
        await arm_source("inotify", NS)


@pytest.mark.parametrize("where", ["fanotify", "mountinfo"])
async def test_an_interrupted_arm_leaves_nothing_open(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    stop = KeyboardInterrupt()
    if where == "fanotify":
        f, m = fakes(monkeypatch, stop)
    else:
        f, m = fakes(monkeypatch, AmountdError("refused"), stop)
    with pytest.raises(KeyboardInterrupt):
        await arm_source("auto", NS)
    assert (f.closed, m.closed) == ((1, 0) if where == "fanotify" else (1, 1))


async def test_open_source_and_multi_come_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    f, _ = fakes(monkeypatch, None)
    async with open_source("auto", NS) as src:
        assert src is f and not f.closed
    assert f.closed == 1
    g, _ = fakes(monkeypatch, None)
    assert await multi_mod.open_one("auto", NS) is g

"""A subscription's phase: the transition table walked pair by pair, then each legal
transition reached by a real Subscription through the broker's own calls."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from amountd.broker import (
    TRANSITIONS,
    Broker,
    IllegalTransition,
    Phase,
    Subscription,
    Trigger,
    next_phase,
)
from amountd.model import End, Event, Frame, Mount, Resync, Snapshot
from amountd.protocol import FrameReader, SubscribeRequest

from ..factories import event, mount

P, T = Phase, Trigger

# Written out here, apart from the module's table: a change to either shows up.
EXPECTED: dict[tuple[Phase, Trigger], Phase] = {
    (P.SNAPSHOT, T.RESTART): P.LIVE,
    (P.SNAPSHOT, T.CLOSE): P.CLOSED,
    (P.RESYNC, T.RESTART): P.LIVE,
    (P.RESYNC, T.CLOSE): P.CLOSED,
    (P.REPLAY, T.LAG): P.RESYNC,
    (P.REPLAY, T.REPLAYED): P.LIVE,
    (P.REPLAY, T.CLOSE): P.CLOSED,
    (P.LIVE, T.LAG): P.RESYNC,
    (P.LIVE, T.END): P.DONE,
    (P.LIVE, T.CLOSE): P.CLOSED,
    (P.DONE, T.CLOSE): P.CLOSED,
}

PAIRS = list(itertools.product(Phase, Trigger))


@pytest.mark.parametrize(
    ("phase", "trigger"), PAIRS, ids=[f"{p.value}-{t.value}" for p, t in PAIRS]
)
def test_every_phase_and_trigger(phase: Phase, trigger: Trigger) -> None:
    want = EXPECTED.get((phase, trigger))
    if want is None:
        with pytest.raises(IllegalTransition, match=f"cannot {trigger.value} in phase"):
            next_phase(phase, trigger)
    else:
        assert next_phase(phase, trigger) is want


def test_the_table_is_the_one_tested() -> None:
    assert dict(TRANSITIONS) == EXPECTED
    assert len(PAIRS) == 30  # 6 phases x 5 triggers: 11 legal, 19 raise
    with pytest.raises(TypeError):
        TRANSITIONS[P.CLOSED, T.CLOSE] = P.LIVE  # type: ignore[index]


# --- a real subscription, driven only through the broker ------------------------------


def mnt(key: int) -> Mount:
    return mount(key, f"/m{key}", ids="unique", full=False, options="rw")


def ev(key: int) -> Event:
    return event("mount", mnt(key))


def broker(*, queue: int = 4, ring: int = 64) -> Broker:
    return Broker(table=lambda: [mnt(1)], queue=queue, ring=ring, ns_id=7, source="test")


def read_now(sub: Subscription) -> list[Frame]:
    chunk = sub._collect()
    return [] if chunk is None else FrameReader(sub.format).feed(chunk)


def kinds(frames: list[Frame]) -> list[str]:
    return [type(f).__name__ for f in frames]


def test_first_phases() -> None:
    b = broker()
    for k in range(3):
        b.publish(ev(10 + k))
    assert b.subscribe().phase is P.LIVE
    assert b.subscribe(SubscribeRequest(snapshot=True)).phase is P.SNAPSHOT
    assert b.subscribe(SubscribeRequest(since=1)).phase is P.REPLAY
    expired = b.subscribe(SubscribeRequest(since=99))
    assert (expired.phase, expired.resync_reason) == (P.RESYNC, "since-expired")
    b.publish(End(reason="gone"))
    late = b.subscribe(SubscribeRequest(snapshot=True, since=1))
    assert late.phase is P.LIVE
    assert kinds(read_now(late)) == ["End"]
    assert late.phase is P.DONE


def test_snapshot_restart_live_end_done_close() -> None:
    b = broker()
    sub = b.subscribe(SubscribeRequest(snapshot=True))
    b.publish(ev(10))  # not queued: the snapshot will hold it
    assert sub.queued == 0
    assert kinds(read_now(sub)) == ["Snapshot", "Ready"]
    assert sub.phase is P.LIVE
    b.publish(ev(11))
    b.publish(End(reason="bye"))
    assert kinds(read_now(sub)) == ["Event", "End"]
    assert sub.phase is P.DONE and sub.finished
    assert b.subscribers == 0
    sub.close()
    assert sub.phase is P.CLOSED
    sub.close()  # closing twice is no error (the method checks; the table would raise)
    assert sub.phase is P.CLOSED


@pytest.mark.parametrize("since", [None, 0])
def test_lag_from_live_and_replay(since: int | None) -> None:
    b = broker(queue=2)
    b.publish(ev(9))
    sub = b.subscribe(SubscribeRequest(since=since))
    assert sub.phase is (P.LIVE if since is None else P.REPLAY)
    for k in range(3):  # one more than the queue holds
        b.publish(ev(10 + k))
    assert (sub.phase, sub.resync_reason, sub.lagged, sub.drops) == (P.RESYNC, "lagged", True, 1)
    assert b.stats().drops == 1
    b.publish(ev(20))  # nothing queued while it starts over
    assert sub.queued == 0
    frames = read_now(sub)
    assert kinds(frames) == ["Resync", "Snapshot", "Ready"]
    assert frames[0] == Resync(seq=5, reason="lagged")
    assert (sub.phase, sub.resync_reason, sub.lagged) == (P.LIVE, None, False)


def test_replay_runs_out_into_live() -> None:
    b = broker(queue=2)
    for k in range(3):
        b.publish(ev(10 + k))
    sub = b.subscribe(SubscribeRequest(since=0))
    first = read_now(sub)  # ready + a queue's worth of ring frames
    assert kinds(first) == ["Ready", "Event", "Event"]
    assert sub.phase is P.REPLAY
    assert kinds(read_now(sub)) == ["Event"]
    assert sub.phase is P.LIVE


@pytest.mark.parametrize(
    "req",
    [
        SubscribeRequest(snapshot=True),
        SubscribeRequest(since=99),
        SubscribeRequest(since=0),
        SubscribeRequest(),
    ],
    ids=["snapshot", "resync", "replay", "live"],
)
def test_close_from_every_open_phase(req: SubscribeRequest) -> None:
    b = broker()
    b.publish(ev(10))
    sub = b.subscribe(req)
    assert sub.phase is not P.CLOSED
    assert b.subscribers == 1
    sub.close()
    assert sub.phase is P.CLOSED
    assert b.subscribers == 0
    assert read_now(sub) == []


def test_an_illegal_trigger_raises_and_keeps_the_phase() -> None:
    b = broker()
    sub = b.subscribe()
    with pytest.raises(IllegalTransition):
        sub._restarted()  # a live subscriber has nothing to start over from
    assert sub.phase is P.LIVE
    sub.close()
    with pytest.raises(IllegalTransition):
        sub._lag()  # a closed one has left the broker: nothing can overflow
    assert sub.phase is P.CLOSED


def test_published_frames_are_numbered_copies() -> None:
    b = broker()
    sub = b.subscribe()
    e = ev(10)
    b.publish(e)
    _, got = read_now(sub)  # ready, the event
    assert e.seq == 0
    assert got == msgspec.structs.replace(e, seq=1)
    with pytest.raises(AttributeError):
        e.seq = 5  # type: ignore[misc]
    snap = Snapshot(seq=0, ns_id=None, mounts=[])
    with pytest.raises(AttributeError):
        snap.seq = 1  # type: ignore[misc]

"""The sweep plan with plain numbers: fake clocks, a set of IDs for the kernel's table."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amountd.sweep import (
    PACE_MIN_SHARE,
    SWEEP_LAP,
    SweepBudget,
    SweepPlan,
    check_budget,
    check_interval,
)


def drain(plan: SweepPlan, ids: set[int], mono: float, cost: float = 5e-6) -> list[int]:
    """Every slice the plan allows at `mono`, each charged `cost` per check."""
    seen: list[int] = []
    while True:
        got = plan.take(mono, lambda: ids)
        if not got:
            return seen
        plan.spent(cost * len(got), mono)
        seen += got


def test_nothing_owed_nothing_taken() -> None:
    plan = SweepPlan(interval=None)
    assert plan.wake_at(0.0) is None
    assert plan.take(0.0, lambda: {1, 2, 3}) == []


def test_a_poke_checks_every_mount_once() -> None:
    plan = SweepPlan(interval=None)
    plan.poke()
    assert plan.wake_at(5.0) == 5.0  # now: the burst allows it
    assert drain(plan, {3, 1, 2}, 5.0) == [1, 2, 3]
    assert not plan.owed and plan.laps == 1
    assert plan.wake_at(5.0) is None


def test_a_poke_mid_lap_is_covered_when_the_cursor_is_back() -> None:
    """Not a sweep restarted per POLLPRI: one lap round from where the cursor was."""
    ids = set(range(100, 200))
    plan = SweepPlan(interval=None, slice=16 * 5e-6)  # 16 checks a slice
    plan.poke()
    first = plan.take(0.0, lambda: ids)
    plan.spent(16 * 5e-6, 0.0)
    assert first == list(range(100, 116))
    plan.poke()  # cursor at 116: the owed lap now ends at 116 in the next lap
    rest = drain(plan, ids, 0.0)
    assert rest == list(range(116, 200)) + list(range(100, 116))


def test_mounts_made_during_a_lap_extend_it() -> None:
    """Unique IDs only grow: a mount made mid-lap sorts after every older one, so the
    lap takes it before it wraps round to the cursor's ID."""
    ids = set(range(100, 120))
    plan = SweepPlan(interval=None, slice=16 * 5e-6)
    plan.poke()
    assert plan.take(0.0, lambda: ids) == list(range(100, 116))
    ids |= {200, 201}
    plan.poke()
    assert drain(plan, ids, 0.0) == [*range(116, 120), 200, 201, *range(100, 116)]


def test_an_empty_table_owes_nothing() -> None:
    plan = SweepPlan(interval=None)
    plan.poke()
    assert drain(plan, set(), 0.0) == []
    assert not plan.owed


def test_the_budget_spaces_slices_out() -> None:
    """Under a 5% budget with no burst beyond one slice, a slice of 1 ms of CPU is
    followed by ~20 ms without sweeping."""
    plan = SweepPlan(interval=None, budget=0.05, burst=0.0, lap=None, slice=0.001)
    ids = set(range(10_000))
    plan.poke()
    assert plan.take(0.0, lambda: ids)  # one slice's worth is always there
    plan.spent(0.001, 0.0)
    assert plan.take(0.0, lambda: ids) == []  # spent
    at = plan.wake_at(0.0)
    assert at is not None and at == pytest.approx(0.002)
    assert plan.take(at, lambda: ids)
    plan.spent(0.001, at)
    assert plan.wake_at(at) == pytest.approx(at + 0.02)  # 1 ms of CPU at 5%: 20 ms


def test_slice_size_follows_the_measured_cost() -> None:
    plan = SweepPlan(interval=None, slice=0.001)
    ids = set(range(100_000))
    plan.poke()
    n = len(plan.take(0.0, lambda: ids))
    assert n == 200  # 1 ms at the first guess, 5 us a check
    for _ in range(30):
        got = plan.take(0.0, lambda: ids)
        plan.spent(20e-6 * len(got), 0.0)  # really 20 us a check
    assert plan.size() == pytest.approx(50, abs=3)


def test_background_sweep_every_interval() -> None:
    plan = SweepPlan(interval=30.0, now=0.0)
    plan.start(0.0)
    assert plan.wake_at(0.0) == 30.0
    assert drain(plan, {1, 2}, 29.0) == []
    assert drain(plan, {1, 2}, 30.0) == [1, 2]
    assert plan.wake_at(30.0) == 60.0
    plan.poke()
    assert drain(plan, {1, 2}, 45.0) == [1, 2]
    assert plan.wake_at(45.0) == 75.0  # a lap just looked: the next one is put back


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="share of one CPU"):
        check_budget(0.0)
    with pytest.raises(ValueError, match="share of one CPU"):
        SweepPlan(budget=1.5)
    with pytest.raises(ValueError, match="seconds > 0"):
        check_interval(-1.0)
    assert check_budget(1.0) == 1.0


def test_budget_is_a_token_bucket() -> None:
    b = SweepBudget(0.1, 0.01, now=0.0)
    assert b.allows(0.0)
    b.spend(0.02, 0.0)
    assert not b.allows(0.05)
    assert b.wait(0.05) == pytest.approx((1e-4 + 0.01 - 0.005) / 0.1)
    assert b.allows(0.2)


# One op on the kernel's table: make a mount, drop one, remount one; each raises a
# POLLPRI, and the source runs a slice (or not) between two ops.
Op = tuple[str, int, bool]
ops = st.lists(
    st.tuples(
        st.sampled_from(["mount", "umount", "remount"]), st.integers(0, 10**6), st.booleans()
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, size=st.integers(1, 40))
def test_every_remount_is_checked_after_it_within_one_lap(ops: list[Op], size: int) -> None:
    """The plan's promise: after a POLLPRI, every mount there at the time is checked
    (if it is still there) before the plan says nothing is owed, and within one lap
    (the table's size, plus the mounts made meanwhile) of checks."""
    ids = set(range(1000, 1020))
    top = 1019
    plan = SweepPlan(interval=None, slice=size * 5e-6, burst=10.0, lap=None)
    pending: dict[int, int] = {}  # remounted ID -> checks done since its POLLPRI
    made = 0

    def account(got: list[int]) -> None:
        for mid in got:
            pending.pop(mid, None)
        for mid, done in list(pending.items()):
            pending[mid] = done + len(got)
            assert pending[mid] <= len(ids) + made + size

    for op, pick, slice_now in ops:
        if op == "mount":
            top += 1
            ids.add(top)
            made += 1
        elif ids and op == "umount":
            gone = sorted(ids)[pick % len(ids)]
            ids.discard(gone)
            pending.pop(gone, None)
        elif ids:
            mid = sorted(ids)[pick % len(ids)]
            pending[mid] = 0
        plan.poke()
        if slice_now:
            account(plan.take(0.0, lambda: ids))
            plan.spent(0.0, 0.0)
    while plan.owed:
        account(plan.take(0.0, lambda: ids))
    assert pending == {}


def test_the_burst_is_two_seconds_of_the_budget() -> None:
    """0.1 s of CPU at the default 5%; a budget lowered lowers it (to one slice at least)."""
    assert SweepPlan().budget.burst == pytest.approx(0.1)
    assert SweepPlan(budget=0.2).budget.burst == pytest.approx(0.4)
    assert SweepPlan(budget=0.0001, slice=0.001).budget.burst == pytest.approx(0.001)
    assert SweepPlan(budget=0.05, burst=0.5).budget.burst == pytest.approx(0.5)


def churn(plan: SweepPlan, ids: set[int], seconds: float, every: float, cost: float) -> float:
    """A POLLPRI every `every` s for `seconds` (1 ms steps, each running the slices the
    plan allows, `cost` s of CPU a check); asserts each is covered within one lap of
    SWEEP_LAP (plus a step), and gives the CPU the sweeps took."""
    owed: dict[int, float] = {}  # mount ID -> the first POLLPRI it still owes a check for
    cpu, next_poke = 0.0, 0.0
    for step in range(int(seconds * 1000)):
        now = step / 1000
        if now >= next_poke:
            plan.poke()
            for mid in ids:
                owed.setdefault(mid, now)
            next_poke += every
        while got := plan.take(now, lambda: ids):
            plan.spent(cost * len(got), now)
            cpu += cost * len(got)
            for mid in got:
                owed.pop(mid, None)
        assert min(owed.values(), default=now) >= now - SWEEP_LAP - 0.002
    return cpu


def test_under_churn_a_lap_takes_sweep_lap_not_the_budget() -> None:
    """A lap of 40 ms of CPU (10,000 mounts at 4 us a check; here 1,000 at 40 us): one
    lap every SWEEP_LAP s is 3.3% of a core, where the 5% budget would sweep every
    0.8 s."""
    plan = SweepPlan(interval=None)
    cpu = churn(plan, set(range(1000)), seconds=30.0, every=0.008, cost=40e-6)
    assert cpu / 30.0 == pytest.approx(0.04 / SWEEP_LAP, rel=0.15)  # + the first burst
    assert plan.lap_no == pytest.approx(30.0 / SWEEP_LAP, abs=3)


def test_under_churn_a_small_table_may_take_one_percent() -> None:
    """A lap of 5 ms (1,000 mounts at 5 us): one per SWEEP_LAP would be 0.4% of a core;
    the pace allows 1% (PACE_MIN_SHARE), a lap every 0.5 s."""
    plan = SweepPlan(interval=None)
    cpu = churn(plan, set(range(1000)), seconds=30.0, every=0.008, cost=5e-6)
    assert cpu / 30.0 == pytest.approx(PACE_MIN_SHARE, rel=0.15)
    assert plan.lap_no == pytest.approx(30.0 / 0.5, abs=5)


def test_under_churn_a_lap_the_budget_cannot_pay_takes_longer() -> None:
    """100,000 mounts at 5 us a check: a lap costs 0.5 s of CPU, 42% of a core at one
    lap per SWEEP_LAP: the budget (5%) binds, and a lap takes 10 s."""
    plan = SweepPlan(interval=None)
    ids = set(range(100_000))
    plan.poke()
    cpu = 0.0
    for step in range(30_000):
        now = step / 1000
        plan.poke()
        while got := plan.take(now, lambda: ids):
            plan.spent(5e-6 * len(got), now)
            cpu += 5e-6 * len(got)
    assert (cpu - plan.budget.burst) / 30.0 == pytest.approx(0.05, rel=0.05)


def test_a_few_changes_in_a_row_are_verified_at_once() -> None:
    """A mount then a remount of it (two POLLPRIs) in a namespace quiet before: both
    laps run at once, from the pace's burst, whatever SWEEP_LAP says."""
    plan = SweepPlan(interval=None)
    ids = set(range(1000))
    for when in (0.0, 60.0):  # the first lap measures the checks' cost; then quiet
        plan.poke()
        assert len(drain(plan, ids, when)) == 1000
        plan.poke()
        assert len(drain(plan, ids, when + 0.001)) == 1000
        assert not plan.owed


def test_no_pace_sweeps_as_fast_as_the_budget() -> None:
    plan = SweepPlan(interval=None, lap=None)
    cpu = churn(plan, set(range(1000)), seconds=10.0, every=0.008, cost=5e-6)
    assert (cpu - plan.budget.burst) / 10.0 == pytest.approx(0.05, rel=0.1)

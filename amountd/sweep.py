"""Pure: when to sweep a namespace's mounts, which ones, and how much CPU it may take.

The kernel reports no remount and no propagation change, and every mountinfo POLLPRI
may hide a remount whatever else explains it; so each POLLPRI owes a sweep (one cheap
statmount per mount, compared to the table), and so does every `interval` seconds
(propagation changes raise no POLLPRI at all). Sweeps must neither hold mount and
umount events back nor eat the machine:

- they run in slices (`take`: the IDs to check now, about `slice` seconds of CPU by
  the measured cost of one check), and the source reads the kernel's events between
  two slices;
- a token bucket (`SweepBudget`) lets them spend `share` of one CPU on average, with a
  `burst` so that a lone remount in a quiet namespace is found at once;
- a second bucket paces them to one lap every `SWEEP_LAP` seconds under churn (its
  rate: what a lap was measured to cost, per `SWEEP_LAP`; PACE_MIN_SHARE of a CPU at
  least), with a burst of a few laps, so that a few changes in a row are all verified
  at once. The budget is a cap, not a target: a lap of 1,000 mounts costs ~4.5 ms, and
  sweeping as fast as 5% of a core allows verified the table every 90 ms where the
  promise is 1.2 s (1% pays a lap every 0.45 s); at 10,000 mounts (~45-55 ms a lap)
  the pace and the budget meet.

The sweep is one endless round over the mount IDs in ascending order (a lap), not a
sweep restarted per POLLPRI: a POLLPRI that comes with the cursor at ID K is covered
once the cursor, one lap later, is back at K. Every mount there at the POLLPRI has then
been checked after it: those from K up later in the same lap, those below K in the next
lap (unique IDs only grow, so a mount made meanwhile sorts after every older one, and
the lap is extended with them before it wraps). So under continuous churn a hidden
remount is found within one lap, whatever the POLLPRI rate: at most SWEEP_LAP seconds,
or (cost of a lap) / share when the budget cannot pay a lap that often.

No clock and no syscall here: the caller passes monotonic times and the CPU seconds a
slice took, so everything is tested with plain numbers.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from typing import NamedTuple

__all__ = [
    "DEFAULT_SWEEP",
    "PACE_MIN_SHARE",
    "SLICE",
    "SWEEP_BUDGET",
    "SWEEP_BURST",
    "SWEEP_INTERVAL",
    "SWEEP_LAP",
    "SweepBudget",
    "SweepPlan",
    "SweepSettings",
    "check_budget",
    "check_interval",
]

SWEEP_BUDGET = 0.05  # the sweeps' share of one CPU, on average
SWEEP_INTERVAL = 30.0  # s between background sweeps (propagation changes raise no POLLPRI)
SWEEP_BURST = 2.0  # s of the budget sweeps may spend at once after a quiet spell
# (0.1 s of CPU at the default 5%; a smaller budget, a smaller burst: what a user who
# lowers the budget asks for, and what leaves the hot path alone measurable)
SWEEP_LAP = 1.2  # s: under churn, one lap over the mounts in this time (budget allowing)
PACE_LAPS = 2.0  # laps a quiet spell lets run back to back
PACE_BURST_MIN = 0.01  # s of CPU the pace lets run back to back at least (small tables)
PACE_MIN_SHARE = 0.01  # of a CPU the pace allows at least (the budget, if lower): small
# tables, whose laps cost ~0.3 ms at 50 mounts, are verified every ~30 ms under churn
SLICE = 0.001  # s of CPU a slice aims at: what a sweep may hold an event back by
_FIRST_GUESS = 5e-6  # s of CPU one check costs, until measured (a statmount: ~3.4 us)
_MIN_SLICE, _MAX_SLICE = 16, 4096
_END = float("inf")  # the cursor at the end of a lap


class SweepSettings(NamedTuple):
    """What a user sets of the sweeps (`--sweep-interval`, `--sweep-budget`)."""

    interval: float = SWEEP_INTERVAL
    budget: float = SWEEP_BUDGET


DEFAULT_SWEEP = SweepSettings()


def check_budget(share: float) -> float:
    """A valid sweep budget (a share of one CPU in (0, 1]), or ValueError saying why."""
    if not 0 < share <= 1:
        raise ValueError(f"the sweep budget is a share of one CPU in (0, 1], not {share}")
    return share


def check_interval(seconds: float) -> float:
    """A valid background sweep interval (> 0 seconds), or ValueError saying why."""
    if not seconds > 0:
        raise ValueError(f"the sweep interval is a number of seconds > 0, not {seconds}")
    return seconds


class SweepBudget:
    """A token bucket of CPU seconds: `share` of a second accrues per second, up to
    `burst`. Pure: the caller passes the time and says what it spent."""

    def __init__(self, share: float, burst: float, now: float) -> None:
        self.share = check_budget(share)
        self.burst = max(burst, 0.0)
        self.tokens = self.burst
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.share)
        self._at = now

    def retune(self, share: float, burst: float, now: float) -> None:
        """A new rate and burst from now on (what accrued until now, at the old rate)."""
        self._refill(now)
        self.share = check_budget(share)
        self.burst = max(burst, 0.0)
        self.tokens = min(self.tokens, self.burst)

    def allows(self, now: float) -> bool:
        self._refill(now)
        return self.tokens > 0

    def spend(self, cpu: float, now: float) -> None:
        self._refill(now)
        self.tokens -= cpu

    def wait(self, now: float) -> float:
        """Seconds until a sweep may run again (0: now)."""
        self._refill(now)
        return 0.0 if self.tokens > 0 else (1e-4 - self.tokens) / self.share


class SweepPlan:
    """Which mounts a sweep checks next, and when; the budget its slices spend.

    `poke()` for every POLLPRI; `wake_at(mono)` says when the source should next run a
    slice (None: only when an fd wakes it); `take(mono, keys)` gives the IDs to check
    in this slice (empty: nothing owed, or no budget left); `spent(cpu, mono)` says
    what the slice took.
    """

    def __init__(
        self,
        *,
        budget: float = SWEEP_BUDGET,
        interval: float | None = SWEEP_INTERVAL,
        burst: float | None = None,
        lap: float | None = SWEEP_LAP,
        slice: float = SLICE,
        now: float = 0.0,
    ) -> None:
        """`burst`: s of CPU spent at once after a quiet spell (None: SWEEP_BURST
        seconds' worth of the budget). `lap`: s a lap takes under churn (None: as fast
        as the budget allows)."""
        cpu_burst = SWEEP_BURST * check_budget(budget) if burst is None else burst
        self.budget = SweepBudget(budget, max(cpu_burst, slice), now)  # a slice fits
        self.lap_time = None if lap is None else check_interval(lap)
        # The pace: re-tuned as laps are listed and checks measured (see _retune).
        self.pace = SweepBudget(budget, self.budget.burst, now)
        self.interval = None if interval is None else check_interval(interval)
        self.slice = slice
        self.per_check = _FIRST_GUESS  # s of CPU per check, a moving average
        self.background_at: float | None = None  # (mono) the next background sweep
        self._lap: list[int] = []  # the IDs of this lap, ascending
        self._pos = 0  # the next index of _lap to check
        self.lap_no = 0
        self._target: tuple[int, float] | None = None  # (lap, ID) the cursor must reach
        self._taken = 0  # checks handed out by the last take()
        self.checks = 0  # checks handed out in all
        self.laps = 0  # laps finished (a lap that covered a POLLPRI, or a background one)
        self.cpu = 0.0  # s of CPU the slices took
        self._now = now

    # ------------------------------------------------------------------------ state

    @property
    def owed(self) -> bool:
        """Whether a POLLPRI (or the interval) still waits for the cursor."""
        return self._target is not None

    def _cursor(self) -> tuple[int, float]:
        """(lap, the next ID to check); at a lap's end, the ID after its last (the lap
        may yet be extended with newer mounts), or the end of an empty lap."""
        lap, pos = self._lap, self._pos
        if pos < len(lap):
            return (self.lap_no, lap[pos])
        return (self.lap_no, lap[-1] + 1 if lap else _END)

    def start(self, mono: float) -> None:
        """Start the background sweeps' clock (the source is armed)."""
        self.budget.spend(0.0, mono)
        if self.interval is not None and self.background_at is None:
            self.background_at = mono + self.interval

    def poke(self) -> None:
        """A POLLPRI came (or the interval ran out): every mount there now must be
        checked again, which takes the cursor one lap round to where it stands."""
        lap, key = self._cursor()
        target = (lap + 1, key)
        if self._target is None or target > self._target:
            self._target = target

    def wake_at(self, mono: float) -> float | None:
        """When (mono) the source should run a slice; None: nothing owed, nor a
        background sweep to start."""
        if self._target is not None:
            return mono + max(self.budget.wait(mono), self.pace.wait(mono))
        return self.background_at

    # ----------------------------------------------------------------------- slices

    def _background(self, mono: float) -> None:
        if self.background_at is not None and mono >= self.background_at:
            self.poke()
            assert self.interval is not None
            self.background_at = mono + self.interval

    def _covered(self) -> bool:
        if self._target is not None and self._cursor() >= self._target:
            self._target = None
            self.laps += 1
            if self.interval is not None and self.background_at is not None:
                self.background_at = max(self.background_at, self._now + self.interval)
        return self._target is None

    def _retune(self, mono: float) -> None:
        """The pace from what a lap costs now: one lap per `lap_time` (PACE_MIN_SHARE
        of a CPU at least), PACE_LAPS laps (PACE_BURST_MIN of CPU at least) back to back
        after a quiet spell."""
        if self.lap_time is None:
            return
        lap_cpu = self.per_check * len(self._lap)
        share = min(1.0, max(lap_cpu / self.lap_time, min(PACE_MIN_SHARE, self.budget.share)))
        burst = max(PACE_LAPS * lap_cpu, PACE_BURST_MIN, self.slice)
        self.pace.retune(share, burst, mono)

    def _next_lap(self, keys: Callable[[], Iterable[int]]) -> None:
        """At the end of the lap: extend it with the IDs made since, or start anew."""
        fresh = sorted(keys())
        last = self._lap[-1] if self._lap else None
        if last is not None and fresh and fresh[-1] > last:
            self._lap, self._pos = fresh, bisect_right(fresh, last)
        else:
            self._lap, self._pos = fresh, 0
            self.lap_no += 1

    def size(self) -> int:
        """How many checks make one slice, by what a check was measured to cost."""
        n = int(self.slice / self.per_check) if self.per_check > 0 else _MAX_SLICE
        return max(_MIN_SLICE, min(_MAX_SLICE, n))

    def take(self, mono: float, keys: Callable[[], Iterable[int]]) -> list[int]:
        """The IDs to check in this slice; `keys()` lists the table's mount IDs (asked
        when a lap ends). Empty: nothing owed, or the budget says wait."""
        self._now = mono
        self._taken = 0
        self._background(mono)
        if self._covered() or not (self.budget.allows(mono) and self.pace.allows(mono)):
            return []
        want = self.size()
        out: list[int] = []
        wrapped = 0
        while len(out) < want and not self._covered():
            if self._pos >= len(self._lap):
                if wrapped:  # the table is empty: nothing to check, nothing owed
                    self._target = None
                    break
                self._next_lap(keys)
                wrapped = 0 if self._pos < len(self._lap) else 1
                continue
            wrapped = 0
            stop = len(self._lap)
            assert self._target is not None
            if self._target[0] == self.lap_no:  # the cursor stops at the target's ID
                stop = min(stop, bisect_left(self._lap, self._target[1], self._pos))
            end = min(stop, self._pos + want - len(out))
            out += self._lap[self._pos : end]
            self._pos = end
        self._covered()
        self._taken = len(out)
        self.checks += len(out)
        return out

    def spent(self, cpu: float, mono: float) -> None:
        """What the last `take()`'s checks cost (s of CPU), charged to the budget."""
        self.cpu += cpu
        self.budget.spend(cpu, mono)
        self.pace.spend(cpu, mono)
        if self._taken >= _MIN_SLICE and cpu > 0:
            self.per_check += (cpu / self._taken - self.per_check) / 4
        self._retune(mono)

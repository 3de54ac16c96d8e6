"""Remount detection: from a remount syscall's return to the `remount` event, under the
budgeted sweeps of the fanotify and listmount sources (issue 13), quiet and under churn.

The kernel reports no remount: every mountinfo POLLPRI owes a sweep (one statmount per
mount, in ~1 ms slices, within `sweep_budget` of one CPU, 5% by default), and the sweep
finds it. For each table size N a private namespace holds N mounts (bind mounts at
DIR/m/I) and the source watches it in this process (so the sweeps' own CPU is
read from the source: `sweep_cpu`, thread CPU time around each slice). nsdriver.py
remounts DIR/m/I (per mount, read-only and back), one mount per remount, and reads
CLOCK_MONOTONIC around the syscall; the consumer reads the same clock as the event
leaves the source.

- quiet: nothing else happens; remounts spaced so that the budget's burst and the
  pace's lap (SWEEP_LAP) are back before the next (a lone remount in a quiet namespace);
- churn: a second driver makes tmpfs mount/umount pairs every CHURN_GAP all along
  (continuous POLLPRIs, each owing a sweep), and the remounts come at random 0.3 to
  0.9 s apart, hidden among them. The sweeps' CPU share is their CPU over the phase's
  wall time: one lap per SWEEP_LAP, or the budget if it cannot pay that.

Also measured, once per N, what one sweep step costs from Python: a statmount of the
sweep's fields, then hashing the answer (an unchanged answer stops there), then
decoding and comparing it (what a changed one costs).
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path
from typing import Any

from amountd.sweep import SWEEP_BUDGET, SWEEP_LAP

from .common import (
    BenchmarkError,
    Options,
    PrivateNs,
    Result,
    Table,
    figure,
    left_out,
    left_out_note,
    register,
)
from .serving import percentile

__all__ = ["PHASES", "SIZES", "SOURCES", "run"]

SIZES = (1000, 10000)
SOURCES = ("fanotify", "listmount")
CHURN_GAP = 0.004  # s between the churn's changes: 250 a second
PHASES = ("quiet", "churn")


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    v = sorted(values)
    return {"p50": percentile(v, 50), "p99": percentile(v, 99), "max": v[-1]}


def _step_costs(ns: PrivateNs) -> dict[str, float]:
    """us per mount of: the sweep's statmount; + hashing it; + decoding and comparing."""
    from amountd.kernel.layouts import parse_statmount
    from amountd.kernel.syscalls import listmount, mntns_id, statmount
    from amountd.sources.fanotify import _SWEEP_MASK
    from amountd.tracker import swept_of

    with open(f"/proc/{ns.pid}/ns/mnt", "rb") as f:
        ns_id = mntns_id(f.fileno())
    ids = listmount(ns_id)

    def best(fn: Any) -> float:
        runs = []
        for _ in range(3):
            t0 = time.thread_time()
            fn()
            runs.append(time.thread_time() - t0)
        return min(runs) / len(ids) * 1e6

    def stat_only() -> None:
        for mid in ids:
            statmount(mid, ns_id, _SWEEP_MASK)

    def stat_hash() -> None:
        for mid in ids:
            hash(statmount(mid, ns_id, _SWEEP_MASK))

    def stat_decode() -> None:
        for mid in ids:
            swept_of(parse_statmount(statmount(mid, ns_id, _SWEEP_MASK)))

    return {
        "statmount_us": best(stat_only),
        "statmount_hash_us": best(stat_hash),
        "statmount_decode_us": best(stat_decode),
    }


def _phase(
    ns: PrivateNs,
    n: int,
    phase: str,
    *,
    source: str,
    picks: list[int],
    spacing: tuple[float, float],
) -> dict[str, Any]:
    """Remounts of DIR/m/I for I in `picks` (quiet, or among churn), at random places
    in the lap; their latencies and the sweeps' CPU. The first is a warm-up, left out:
    the first round after the source starts decodes every answer (no answer to compare
    with yet), ~1.6x a round's cost."""
    import anyio

    from amountd.model import Event
    from amountd.ns import resolve_ns
    from amountd.sources.fanotify import FanotifySource
    from amountd.sources.listmount import ListmountSource

    prefix = f"{ns.base}/m/"
    arrivals: dict[int, float] = {}
    returns: dict[int, float] = {}
    out: dict[str, Any] = {}

    async def main() -> None:
        target = resolve_ns(ns.pid)
        src: FanotifySource | ListmountSource = (
            FanotifySource(target) if source == "fanotify" else ListmountSource(target)
        )
        async with src, anyio.create_task_group() as tg:

            async def consume() -> None:
                async for batch in src.changes():
                    t = time.monotonic()
                    for ch in batch:
                        if not isinstance(ch, Event) or ch.action != "remount":
                            continue
                        target = str(ch.mount.target or "")
                        if target.startswith(prefix) and target[len(prefix) :].isdigit():
                            arrivals.setdefault(int(target[len(prefix) :]), t)

            tg.start_soon(consume)
            churn = None
            if phase == "churn":
                churn = await anyio.open_process(
                    ns.driver_argv("pairs", 1_000_000, CHURN_GAP),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                await anyio.sleep(0.5)  # the churn under way
            rng = random.Random(n)
            warm, *measured = picks
            await anyio.to_thread.run_sync(ns.driver, "remount", warm, "ro")
            with anyio.move_on_after(15):
                while warm not in arrivals:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            cpu0, checks0, laps0 = src.sweep_cpu, src.sweep_checks, src.sweeps
            t0 = time.monotonic()
            try:
                for i in measured:
                    await anyio.sleep(rng.uniform(*spacing))
                    doc = await anyio.to_thread.run_sync(ns.driver, "remount", i, "ro")
                    returns[i] = float(doc["end"])
                with anyio.move_on_after(15):
                    while len(arrivals.keys() & returns.keys()) < len(returns):  # noqa: ASYNC110
                        await anyio.sleep(0.01)
            finally:
                if churn is not None:
                    churn.kill()
                    await churn.wait()
            wall = time.monotonic() - t0
            out["sweep_cpu_s"] = src.sweep_cpu - cpu0
            out["wall_s"] = wall
            out["laps"] = src.sweeps - laps0
            out["checks"] = src.sweep_checks - checks0
            tg.cancel_scope.cancel()

    anyio.run(main, backend="asyncio")
    lat = [(arrivals[i] - returns[i]) * 1e3 for i in returns if i in arrivals]
    rec: dict[str, Any] = {
        "size": n,
        "source": source,
        "phase": phase,
        "remounts": len(returns),
        "reported": len(lat),
        "missing": len(returns) - len(lat),
        "latencies_ms": [round(v, 2) for v in lat],
        "sweep_cpu_share": out["sweep_cpu_s"] / out["wall_s"] if out["wall_s"] else None,
        "lap_cpu_ms": (out["sweep_cpu_s"] / out["checks"] * n * 1e3 if out["checks"] else None),
        "check_us": out["sweep_cpu_s"] / out["checks"] * 1e6 if out["checks"] else None,
        **out,
    }
    for stat, v in _stats(lat).items():
        rec[f"{stat}_ms"] = v
    return rec


def run(opts: Options) -> Result:
    if opts.quick:
        sizes: tuple[int, ...] = (1000,)
        phases: tuple[str, ...] = ("quiet",)
        k_quiet, k_churn = 8, 0
    else:
        sizes, phases = SIZES, PHASES
        k_quiet, k_churn = 30, 20
    sources = SOURCES
    missing = left_out({"sizes": SIZES, "phases": PHASES}, {"sizes": sizes, "phases": phases})
    records: list[dict[str, Any]] = []
    costs: dict[int, dict[str, float]] = {}
    for n in sizes:
        with PrivateNs(keep_driver=True) as ns:
            have = ns.mount_count()
            mounts = ns.populate(n)
            opts.log(f"N={n}: {mounts} mounts in the namespace of pid {ns.pid}")
            # Each remount of its own bind mount, at a random place among the N (the
            # sweep's cursor goes round in ID order: where a mount sits matters).
            every = random.Random(n).sample(
                range(mounts - have), len(sources) * (k_quiet + k_churn + 2)
            )
            costs[n] = _step_costs(ns)
            # Quiet: a lone remount finds the burst back (a lap's CPU / budget, and more)
            # and the pace's lap (one a SWEEP_LAP).
            lap_s = costs[n]["statmount_hash_us"] * mounts / 1e6
            quiet_gap = max(1.1 * SWEEP_LAP, 1.5 * lap_s / SWEEP_BUDGET)
            per = k_quiet + k_churn + 2
            for j, source in enumerate(sources):
                picks = every[j * per : (j + 1) * per]
                for phase in phases:
                    k = k_quiet + 1 if phase == "quiet" else len(picks)
                    mine, picks = picks[:k], picks[k:]
                    spacing = (quiet_gap, quiet_gap * 1.2) if phase == "quiet" else (0.3, 0.9)
                    rec = _phase(ns, mounts, phase, source=source, picks=mine, spacing=spacing)
                    rec["mounts"] = mounts
                    rec.update(costs[n])
                    records.append(rec)
                    opts.log(
                        f"N={mounts} {source} {phase}: p50 {rec['p50_ms'] or 0:.1f} p99 "
                        f"{rec['p99_ms'] or 0:.1f} max {rec['max_ms'] or 0:.1f} ms "
                        f"({rec['reported']}/{rec['remounts']}); sweeps "
                        f"{100 * (rec['sweep_cpu_share'] or 0):.1f}% of a CPU"
                    )
                    if rec["missing"]:
                        raise BenchmarkError(
                            f"N={mounts} {source} {phase}: {rec['missing']} remounts lost"
                        )
    return Result(
        name="remount",
        params={
            "sizes": list(sizes),
            "sources": list(sources),
            "phases": list(phases),
            "churn_gap_ms": CHURN_GAP * 1e3,
            "sweep_budget": SWEEP_BUDGET,
            "sweep_lap_s": SWEEP_LAP,
            "quick": opts.quick,
            "left_out": missing,
        },
        records=records,
        tables=_tables(records),
        notes=[
            *left_out_note(missing),
            "latency = the remount event leaving the source (in-process) - the "
            "return of the remount's mount(2) (CLOCK_MONOTONIC on both sides)",
            "quiet: remounts alone, spaced so the sweeps' burst and lap are back; churn: a tmpfs "
            f"mount or umount every {CHURN_GAP * 1e3:g} ms all along, remounts 0.3-0.9 s "
            "apart among them",
            "sweep CPU share: the sweeps' thread CPU time over the phase's wall time "
            f"(budget {SWEEP_BUDGET:g}, a lap per {SWEEP_LAP:g} s at most); lap = one "
            "sweep of every mount, by the measured cost of a check",
            "step costs: us per mount from Python, best of 3 passes over the namespace",
            "each phase starts its own source and leaves out a first warm-up remount: the "
            "first round after a start decodes every answer (nothing to compare with yet)",
        ],
    )


def _tables(records: list[dict[str, Any]]) -> list[Table]:
    main = Table(
        "Remount detection by the sweeps: remount(2) return to the event (ms)",
        [
            "N",
            "source",
            "phase",
            "reported",
            "p50",
            "p99",
            "max",
            "sweep CPU %",
            "lap CPU ms",
            "check us",
        ],
        [
            [
                r["mounts"],
                r["source"],
                r["phase"],
                f"{r['reported']}/{r['remounts']}",
                r["p50_ms"],
                r["p99_ms"],
                r["max_ms"],
                None if r["sweep_cpu_share"] is None else 100 * r["sweep_cpu_share"],
                r["lap_cpu_ms"],
                r["check_us"],
            ]
            for r in records
        ],
    )
    seen: set[int] = set()
    rows = []
    for r in records:
        if r["mounts"] in seen:
            continue
        seen.add(r["mounts"])
        rows.append(
            [r["mounts"], r["statmount_us"], r["statmount_hash_us"], r["statmount_decode_us"]]
        )
    steps = Table(
        "One sweep step from Python (us per mount)",
        ["N", "statmount", "+ hash (unchanged: done)", "+ decode and compare"],
        rows,
    )
    return [main, steps]


def plot(result: Result, path: Path) -> None:
    recs = [r for r in result.records if r["latencies_ms"]]
    colors = {"quiet": "tab:green", "churn": "tab:red"}
    styles = ["-", "--", ":"]
    sizes = sorted({r["size"] for r in recs})
    sources = [s for s in SOURCES if any(r["source"] == s for r in recs)]
    with figure(path, width=5.5 * max(1, len(sources)), height=4.5) as fig:
        for i, source in enumerate(sources):
            ax = fig.add_subplot(1, len(sources), i + 1)
            for r in recs:
                if r["source"] != source:
                    continue
                xs = sorted(max(v, 0.01) for v in r["latencies_ms"])
                ys = [(j + 1) / len(xs) for j in range(len(xs))]
                ax.step(
                    xs,
                    ys,
                    styles[sizes.index(r["size"]) % len(styles)],
                    where="post",
                    color=colors.get(r["phase"]),
                    label=f"{r['phase']}, {r['mounts']:,} mounts",
                )
            ax.set_xscale("log")
            ax.set_xlabel("remount(2) return to the remount event (ms; <= 0 at 0.01)")
            ax.set_ylabel("fraction of remounts")
            ax.set_title(f"{source}: remounts found by budgeted sweeps")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")


register(
    "remount",
    "remount detection latency, quiet and under churn, and the sweeps' CPU share",
    plot=plot,
)(run)

"""CPU per mount change, by source and table size.

In a private namespace holding N mounts, a watcher PROCESS follows K mount+umount pairs
made by nsdriver.py inside the namespace; its CPU (every thread, from schedstat, before
and after, less its idle rate over the same time) is divided by the changes made.

Rows: `amountd watch --json --source fanotify`, `... --source listmount` (the kernels
without fanotify mount events: IDs listed, new mounts stat'ed, sweeps within their CPU
budget), `... --source mountinfo`, and `findmnt --poll --task PID` (util-linux: the
tool every Linux machine already has).

Three modes, the gaps set per watcher and table size from a calibration (the median
CPU per change of a few changes made one at a time, each waited for):
- isolated: one change every max(50 ms, 5x that cost): each change meets an idle
  watcher, as mount changes on a real machine mostly do;
- paced: one change every max(1 ms, 5x that cost) (one pair every 2 ms where the
  watcher is fast enough): the watcher keeps up and reports every change;
- unpaced: the pairs as fast as the kernel makes them; a watcher that re-reads the table
  coalesces changes (it reports fewer than were made), fanotify reads them in batches.
A watcher too slow to make 2 pairs within the budget (findmnt at 10,000 mounts) gets
its calibration figures in the isolated and paced rows (marked `calibration`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    BenchmarkError,
    Options,
    PrivateNs,
    Result,
    Table,
    Watcher,
    figure,
    left_out,
    left_out_note,
    register,
    wait_quiet,
)

__all__ = ["SOURCES", "run"]

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("fanotify", "listmount", "mountinfo", "findmnt")
MODES = ("isolated", "paced", "unpaced")
MIN_GAPS = {"isolated": 0.05, "paced": 0.001}
GAP_FACTOR = 5.0  # the paced gaps, in multiples of the watcher's CPU per change


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _amountd_event(line: bytes) -> bool:
    return line.startswith(b'{"type":"event"')


def _amountd_ready(line: bytes) -> bool:
    return line.startswith(b'{"type":"ready"')


def _findmnt_change(line: bytes) -> bool:
    return bool(line.strip())


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much to measure: the default mode's figures, or --quick's (seconds in all)."""

    sizes: tuple[int, ...] = (100, 1000, 10000)
    pairs: int = 500
    budget: float = 10.0  # seconds of paced changes per row, at most
    quiet: float = 0.3  # idle this long: the watcher caught up
    start_quiet: float = 0.3  # the same after a start that no `ready` announced (findmnt)
    change_timeout: float = 120.0  # for one calibration change (else: a retry)
    step: float = 0.05  # how often the watcher's CPU is read while waiting for quiet
    idle_s: float = 1.0
    rounds: int = 3  # calibration rounds (the median is used)
    warm_up: bool = True  # one calibration first, thrown away (first-use costs)
    min_pairs: int = 2  # fewer within the budget: the row is the calibration's
    tail: float = 0.2  # after quiet, how long our reader may take to count the last lines
    fanotify_tail: float = 0.2  # the same for fanotify, which reports every change


# Quick: the watcher's idle rate and "caught up" from 10 ms reads (idle is 0 for all
# three), no warm-up, 0.1 s of paced changes (one isolated pair); fanotify's tail is long
# because it reports every change (the wait ends as soon as they are counted), the
# re-readers' short (they coalesce: the wait always runs to its end).
QUICK = Plan(
    sizes=(100, 1000),
    pairs=20,
    budget=0.1,
    min_pairs=1,
    quiet=0.03,
    start_quiet=0.1,
    change_timeout=10.0,
    step=0.01,
    idle_s=0.03,
    rounds=1,
    warm_up=False,
    tail=0.05,
    fanotify_tail=2.0,
)


def start_watcher(source: str, pid: int) -> Watcher:
    """The watcher process for one row, armed (amountd: its `ready` frame came)."""
    if source == "findmnt":
        exe = shutil.which("findmnt")
        if exe is None:
            raise BenchmarkError("findmnt (util-linux) is missing")
        # -n: no header, so every line is one change.
        return Watcher(
            "findmnt", [exe, "--poll", "--task", str(pid), "-n"], is_change=_findmnt_change
        )
    argv = [sys.executable, "-m", "amountd", "watch", "--json", "--ns", str(pid)]
    argv += ["--source", source]
    return Watcher(source, argv, is_change=_amountd_event, is_ready=_amountd_ready, env=_env())


def calibrate(ns: PrivateNs, w: Watcher, plan: Plan) -> dict[str, Any]:
    """One change alone, twice: one mount, caught up, one umount, caught up.

    Its CPU per change sets the paced gap. It also proves the watcher is polling:
    findmnt says nothing once armed, so a change it missed while starting is retried.
    """
    quiet, step, timeout = plan.quiet, plan.step, plan.change_timeout
    # Done with its start-up reading (findmnt has no `ready` to say so).
    start_quiet = quiet if w.says_ready else plan.start_quiet
    wait_quiet(w.cpu_ns, quiet=start_quiet, step=step, limit=600)
    for _ in range(5):
        seen = w.changes
        sw0 = w.switches()
        cpu0 = w.cpu_ns()
        t0 = time.monotonic()
        ns.driver("up")
        got_up = w.wait_changes(seen + 1, timeout=timeout)
        wait_quiet(w.cpu_ns, quiet=quiet, step=step, limit=600)
        ns.driver("down")
        got_down = w.wait_changes(seen + 2, timeout=timeout)
        wait_quiet(w.cpu_ns, quiet=quiet, step=step, limit=600)
        cpu1 = w.cpu_ns()
        wall = time.monotonic() - t0
        if got_up and got_down:
            return {
                "changes_made": 2,
                "changes_reported": w.changes - seen,
                "kept_up": True,
                "caught_up": True,
                "gap_ms": wall / 2 * 1e3,
                "driver_s": None,
                "wall_s": wall,
                "cpu_ns": cpu1 - cpu0,
                "idle_ns": 0.0,
                "cpu_per_change_us": (cpu1 - cpu0) / 2 / 1e3,
                "cpu_per_reported_us": (cpu1 - cpu0) / (w.changes - seen) / 1e3,
                "switches_per_change": (w.switches() - sw0) / 2,
            }
    raise BenchmarkError(f"{w.name} reported no changes: {w.stderr()}")


def idle_rate(w: Watcher, seconds: float) -> float:
    """The watcher's CPU (ns) per second with nothing happening: subtracted from runs."""
    cpu0 = w.cpu_ns()
    t0 = time.monotonic()
    time.sleep(seconds)
    return (w.cpu_ns() - cpu0) / (time.monotonic() - t0)


def measure(
    ns: PrivateNs,
    w: Watcher,
    *,
    pairs: int,
    gap: float,
    idle_ns_per_s: float,
    plan: Plan,
    tail: float,
) -> dict[str, Any]:
    """K pairs at `gap`; the watcher's CPU until it caught up, and what it reported."""
    seen = w.changes
    made = 2 * pairs
    sw0 = w.switches()
    cpu0 = w.cpu_ns()
    t0 = time.monotonic()
    d = ns.driver("pairs", pairs, gap)
    caught_up = wait_quiet(w.cpu_ns, quiet=plan.quiet, step=plan.step, limit=600)
    w.wait_changes(seen + made, timeout=tail)  # let our reader count the last lines
    cpu1 = w.cpu_ns()
    wall = time.monotonic() - t0
    switches = w.switches() - sw0
    reported = w.changes - seen
    busy = max(0.0, (cpu1 - cpu0) - idle_ns_per_s * wall)
    return {
        "changes_made": made,
        "changes_reported": reported,
        "kept_up": reported >= made,
        "caught_up": caught_up,
        "gap_ms": gap * 1e3,
        "driver_s": d["end"] - d["start"],
        "wall_s": wall,
        "cpu_ns": cpu1 - cpu0,
        "idle_ns": idle_ns_per_s * wall,
        "cpu_per_change_us": busy / made / 1e3,
        "cpu_per_reported_us": busy / reported / 1e3 if reported else None,
        "switches_per_change": switches / made,
        "calibration": False,
    }


def run(opts: Options) -> Result:
    plan = QUICK if opts.quick else Plan()
    sizes, pairs, budget, rounds = plan.sizes, plan.pairs, plan.budget, plan.rounds
    sources = [s for s in SOURCES if s != "findmnt" or shutil.which("findmnt")]
    notes: list[str] = []
    notes.append(
        f"*: too slow to make {plan.min_pairs} pair{'s' if plan.min_pairs > 1 else ''} "
        "within the budget: the calibration's figures "
        "(one mount, caught up, one umount, caught up)"
    )
    if "findmnt" not in sources:
        notes.append("findmnt (util-linux) is missing: its rows are left out")
    missing = left_out({"sizes": Plan().sizes}, {"sizes": sizes})
    notes += left_out_note(missing)
    records: list[dict[str, Any]] = []
    for n in sizes:
        with PrivateNs(keep_driver=opts.quick) as ns:
            mounts = ns.populate(n)
            opts.log(f"N={n}: {mounts} mounts in namespace of pid {ns.pid}")
            for source in sources:
                with start_watcher(source, ns.pid) as w:
                    w.wait_ready(60)
                    if plan.warm_up:  # first-use costs (imports, caches)
                        calibrate(ns, w, plan)
                    cals = [calibrate(ns, w, plan)]
                    while len(cals) < rounds and cals[0]["cpu_per_change_us"] < 5e5:
                        cals.append(calibrate(ns, w, plan))
                    cals.sort(key=lambda r: float(r["cpu_per_change_us"]))
                    cal = cals[len(cals) // 2]  # the median: one sweep or hiccup aside
                    cost = float(cal["cpu_per_change_us"]) * 1e3
                    idle = idle_rate(w, plan.idle_s)
                    # listmount reports every change made once it looked (paced modes)
                    tail = plan.fanotify_tail if source in ("fanotify", "listmount") else plan.tail
                    for mode in MODES:
                        gap = (
                            max(MIN_GAPS[mode], GAP_FACTOR * cost / 1e9)
                            if mode in MIN_GAPS
                            else 0.0
                        )
                        k = min(pairs, int(budget / (2 * gap))) if gap else pairs
                        if k >= plan.min_pairs:
                            rec = measure(
                                ns,
                                w,
                                pairs=k,
                                gap=gap,
                                idle_ns_per_s=idle,
                                plan=plan,
                                tail=tail,
                            )
                        else:  # too slow to pace within the budget: each change alone
                            rec = dict(cal, calibration=True)
                        rec.update(
                            source=source,
                            mode=mode,
                            mounts=mounts,
                            size=n,
                            calibrated_us=cost / 1e3,
                            calibration_rounds_us=[r["cpu_per_change_us"] for r in cals],
                            idle_ns_per_s=idle,
                            threads=w.threads(),
                        )
                        records.append(rec)
                        opts.log(
                            f"N={n} {source:9} {mode:8} {rec['cpu_per_change_us']:10.1f} us/change"
                            f"  reported {rec['changes_reported']}/{rec['changes_made']}"
                        )
    summary = _summary(records)
    return Result(
        name="cpu_per_change",
        params={
            "sizes": list(sizes),
            "pairs": pairs,
            "paced_budget_s": budget,
            "min_gap_ms": {m: g * 1e3 for m, g in MIN_GAPS.items()},
            "gap_factor": GAP_FACTOR,
            "calibration_rounds": rounds,
            "min_pairs": plan.min_pairs,
            "warm_up": plan.warm_up,
            "quiet_s": plan.quiet,
            "idle_s": plan.idle_s,
            "modes": list(MODES),
            "sources": sources,
            "quick": opts.quick,
            "left_out": missing,
        },
        records=records,
        tables=_tables(records),
        notes=notes,
        summary=summary,
    )


def _find(records: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    for r in records:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if a is None or b is None or not b["cpu_per_change_us"]:
        return None
    return float(a["cpu_per_change_us"]) / float(b["cpu_per_change_us"])


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = sorted({int(r["size"]) for r in records})
    out: dict[str, Any] = {"ratios": []}
    for n in sizes:
        for mode in MODES:
            fan = _find(records, size=n, mode=mode, source="fanotify")
            out["ratios"].append(
                {
                    "size": n,
                    "mode": mode,
                    "mountinfo_over_fanotify": _ratio(
                        _find(records, size=n, mode=mode, source="mountinfo"), fan
                    ),
                    "findmnt_over_fanotify": _ratio(
                        _find(records, size=n, mode=mode, source="findmnt"), fan
                    ),
                    "mountinfo_over_listmount": _ratio(
                        _find(records, size=n, mode=mode, source="mountinfo"),
                        _find(records, size=n, mode=mode, source="listmount"),
                    ),
                }
            )
    lo, hi = min(sizes), max(sizes)
    targets = []
    for mode in MODES:
        f_lo = _find(records, size=lo, mode=mode, source="fanotify")
        f_hi = _find(records, size=hi, mode=mode, source="fanotify")
        m_hi = _find(records, size=hi, mode=mode, source="mountinfo")
        scale = _ratio(f_hi, f_lo)
        vs = _ratio(m_hi, f_hi)
        lvs = _ratio(m_hi, _find(records, size=hi, mode=mode, source="listmount"))
        targets.append(
            {
                "mode": mode,
                f"fanotify_{hi}_over_{lo}": scale,
                "target_scale_max": 1.5,
                "scale_met": scale is not None and scale <= 1.5,
                f"mountinfo_over_fanotify_at_{hi}": vs,
                "target_ratio_min": 200,
                "ratio_met": vs is not None and vs >= 200,
                f"mountinfo_over_listmount_at_{hi}": lvs,
                "listmount_target_ratio_min": 10,
                "listmount_ratio_met": lvs is not None and lvs >= 10,
            }
        )
    out["targets"] = targets
    return out


def _tables(records: list[dict[str, Any]]) -> list[Table]:
    main = Table(
        "CPU per change (watcher process, all threads, idle subtracted)",
        [
            "N",
            "source",
            "mode",
            "gap ms",
            "made",
            "reported",
            "CPU ms",
            "us/change",
            "us/reported",
            "wakeups/change",
        ],
        [
            [
                r["mounts"],
                r["source"],
                r["mode"] + ("*" if r.get("calibration") else ""),
                r["gap_ms"],
                r["changes_made"],
                r["changes_reported"],
                (r["cpu_ns"] - r["idle_ns"]) / 1e6,
                r["cpu_per_change_us"],
                r["cpu_per_reported_us"],
                r["switches_per_change"],
            ]
            for r in records
        ],
    )
    ratios = Table(
        "Ratios of CPU per change, same run",
        [
            "N",
            "mode",
            "fanotify us",
            "mountinfo/fanotify",
            "findmnt/fanotify",
            "mountinfo/listmount",
        ],
        [],
    )
    for s in _summary(records)["ratios"]:
        fan = _find(records, size=s["size"], mode=s["mode"], source="fanotify")
        ratios.rows.append(
            [
                fan["mounts"] if fan else s["size"],
                s["mode"],
                fan["cpu_per_change_us"] if fan else None,
                s["mountinfo_over_fanotify"],
                s["findmnt_over_fanotify"],
                s["mountinfo_over_listmount"],
            ]
        )
    return [main, ratios]


def plot(result: Result, path: Path) -> None:
    colors = {
        "fanotify": "tab:green",
        "listmount": "tab:orange",
        "mountinfo": "tab:red",
        "findmnt": "tab:blue",
    }
    with figure(path) as fig:
        ax = fig.add_subplot(1, 1, 1)
        for source in SOURCES:
            for mode, style in (("isolated", ":^"), ("paced", "-o"), ("unpaced", "--s")):
                pts = sorted(
                    (r["mounts"], r["cpu_per_change_us"])
                    for r in result.records
                    if r["source"] == source and r["mode"] == mode
                )
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(
                        xs,
                        [max(y, 1e-3) for y in ys],
                        style,
                        color=colors.get(source),
                        label=f"{source}, {mode}",
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("mounts in the namespace")
        ax.set_ylabel("watcher CPU per change (µs)")
        ax.set_title("CPU per mount change, by source")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)


register(
    "cpu_per_change",
    "watcher CPU per mount change, by source and table size",
    plot=plot,
)(run)

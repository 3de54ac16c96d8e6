"""Overflow recovery: from a 20,000-mount burst to a consumer table equal to the kernel's.

The consumer is in this process: `amountd.watch(snapshot=True)` and `apply_frame` on
every frame, as the API's users do. nsdriver.py makes the burst inside a fresh private
namespace, in one of two ways:

- `rbind`: `mount --rbind` of a tree of 20,000 mounts (built before the watch is
  armed): 20,000 attaches in ONE syscall while the consumer is busy (its loop is
  blocked until the syscall returned), so the kernel's fanotify queue (16,384 events)
  overflows every time and the consumer recovers through `resync` (listmount +
  statmount, diffed against its table); a reader that is reading at that moment may
  drain fast enough to avoid the overflow, which is why the consumer is held busy;
- `binds`: 20,000 bind-mount syscalls from one process, unpaced: the queue overflows
  only if the reader falls 16,384 events behind.

The table is equal to the kernel's from the last change the consumer applied on: the
burst only adds mounts, so once the final table equals the kernel's (checked after the
stream went quiet, against `read_kernel_table` for fanotify and a fresh mountinfo read
for the mountinfo source), it has been equal since that last change. So the recovery
time is that change's arrival minus the driver's first mount syscall, on one clock
(CLOCK_MONOTONIC holds across namespaces).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests import nsharness

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
    task_cpu_ns,
)

__all__ = ["ROWS", "run"]

# (row name, source, unlimited kernel queue)
ROWS: tuple[tuple[str, str, bool], ...] = (
    ("fanotify", "fanotify", False),
    ("fanotify, unlimited queue", "fanotify", True),
    ("mountinfo", "mountinfo", False),
)


SCENARIOS = ("rbind", "binds")
GIVE_UP = 30.0  # seconds of silence, with the table short of the kernel's, before giving up


async def _follow(
    ns: PrivateNs, *, scenario: str, source: str, unlimited: bool, n: int, quiet: float
) -> dict[str, Any]:
    import os

    import anyio

    import amountd
    from amountd.model import Event, Ready, Resync

    table = amountd.MountTable()
    events = resyncs = frames_seen = 0
    first_resync: float | None = None
    last_change: float | None = None
    timeline: list[tuple[float, int]] = []
    me = os.getpid()
    async with amountd.watch(
        source=source, ns=ns.pid, snapshot=True, unlimited_queue=unlimited
    ) as frames:
        async for frame in frames:  # snapshot, then ready: armed
            table = amountd.apply_frame(table, frame)
            if isinstance(frame, Ready):
                break
        before = len(table)
        cpu0 = task_cpu_ns(me)
        t_start = time.monotonic()
        argv = ns.driver_argv("rbind") if scenario == "rbind" else ns.driver_argv("burst", n)
        proc = subprocess.Popen(  # noqa: ASYNC220  (polled, never waited on while it runs)
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        if scenario == "rbind":
            # The consumer is busy (its loop blocked) until the syscall has returned: the
            # 20,000 events meet a reader that is not reading, so the queue overflows
            # every time, as it does behind any consumer busy for a moment.
            proc.wait()
        timeline.append((t_start, len(table)))
        last_frame = t_start
        max_gap = 0.0
        silent_since: float | None = None
        while True:
            got = None
            with anyio.move_on_after(quiet):
                try:
                    got = await anext(frames)
                except StopAsyncIteration:
                    raise BenchmarkError("the watch ended during the burst") from None
            now = time.monotonic()
            if got is None:
                if proc.poll() is None:
                    continue
                # The burst is over and nothing came for `quiet` seconds: done if the
                # table has the kernel's size, else the source is still busy (a sweep).
                if len(table) == ns.mount_count():
                    break
                silent_since = silent_since or now
                if now - silent_since > GIVE_UP:
                    break  # reported as not equal
                continue
            silent_since = None
            max_gap = max(max_gap, now - last_frame)
            last_frame = now
            frames_seen += 1
            table = amountd.apply_frame(table, got)
            if isinstance(got, Event):
                events += 1
                last_change = now
            elif isinstance(got, Resync):
                resyncs += 1
                if first_resync is None:
                    first_resync = now
            if frames_seen % 250 == 0 or isinstance(got, Resync):
                timeline.append((now, len(table)))
        cpu1 = task_cpu_ns(me)
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise BenchmarkError(f"the burst failed: {err.decode(errors='replace')}")
        d = json.loads(out.decode().strip().splitlines()[-1])
        if last_change is not None:
            timeline.append((last_change, len(table)))
    kernel = _kernel_table(ns, source)
    equal = table == kernel
    t0 = float(d["start"])
    missing = len(set(kernel.keys()) - set(table.keys()))
    extra = len(set(table.keys()) - set(kernel.keys()))
    return {
        "scenario": scenario,
        "mounts_before": before,
        "burst": len(kernel) - before,
        "burst_s": float(d["end"]) - t0,
        "kernel_mounts": len(kernel),
        "consumer_mounts": len(table),
        "equal": equal,
        "missing": missing,
        "extra": extra,
        "events": events,
        "resyncs": resyncs,
        "frames": frames_seen,
        "first_resync_s": first_resync - t0 if first_resync is not None else None,
        "recovered_s": last_change - t0 if (equal and last_change is not None) else None,
        "consumer_cpu_s": (cpu1 - cpu0) / 1e9,
        "max_pause_s": max_gap,
        "timeline": [[round(t - t0, 4), size] for t, size in timeline],
    }


def _kernel_table(ns: PrivateNs, source: str) -> Any:
    import amountd

    if source == "fanotify":
        return nsharness.kernel_table(ns)
    return amountd.MountTable(amountd.snapshot(ns.pid, source="mountinfo"))


def run(opts: Options) -> Result:
    import anyio

    n = 20000
    scenarios = SCENARIOS[:1] if opts.quick else SCENARIOS
    rows = ROWS[:1] if opts.quick else ROWS
    quiet = 0.1 if opts.quick else 1.0
    # Quick: the rbind's tree built nested, by doubling rbinds, in a tenth of a second
    # rather than by 20,000 bind mounts (seconds: each costs time in proportion to the
    # table). The burst is the same: n mounts in one syscall.
    tree = "fasttree" if opts.quick else "tree"
    missing = left_out(
        {"scenarios": SCENARIOS, "rows": [r[0] for r in ROWS]},
        {"scenarios": scenarios, "rows": [r[0] for r in rows]},
    )
    records: list[dict[str, Any]] = []
    for scenario in scenarios:
        for name, source, unlimited in rows:
            with PrivateNs(keep_driver=opts.quick) as ns:
                t = time.monotonic()
                if scenario == "rbind":
                    ns.driver(tree, n - 1)  # + the bind of its root: n mounts

                async def main(
                    sc: str = scenario, src: str = source, unl: bool = unlimited
                ) -> dict[str, Any]:
                    return await _follow(
                        ns, scenario=sc, source=src, unlimited=unl, n=n, quiet=quiet
                    )

                rec = anyio.run(main, backend="asyncio")
                rec.update(row=name, source=source, unlimited_queue=unlimited)
                records.append(rec)
                opts.log(
                    f"{scenario} {name}: {rec['burst']} mounts in {rec['burst_s']:.3f}s, "
                    f"recovered {rec['recovered_s']}, resyncs {rec['resyncs']}, "
                    f"equal {rec['equal']} ({time.monotonic() - t:.1f}s)"
                )
    notes = [
        *left_out_note(missing),
        "recovered s = arrival of the last change the consumer applied - the burst's first "
        "mount syscall; the final table was then checked equal to the kernel's",
        "rbind: the 20,000 mounts attach in one syscall while the consumer is busy (the "
        "queue holds 16,384 events); binds: 20,000 bind-mount syscalls from one process, "
        "unpaced, the consumer reading all along",
        "max pause s: the longest time between two frames while the consumer was behind",
    ]
    table = Table(
        "Overflow recovery: 20,000-mount burst, in-process consumer (watch + apply_frame)",
        [
            "burst",
            "source",
            "mounts after",
            "burst s",
            "events",
            "resyncs",
            "1st resync s",
            "recovered s",
            "equal",
            "consumer CPU s",
            "max pause s",
        ],
        [
            [
                r["scenario"],
                r["row"],
                r["kernel_mounts"],
                r["burst_s"],
                r["events"],
                r["resyncs"],
                r["first_resync_s"],
                r["recovered_s"],
                "yes" if r["equal"] else f"NO ({r['missing']} missing, {r['extra']} extra)",
                r["consumer_cpu_s"],
                r["max_pause_s"],
            ]
            for r in records
        ],
    )
    return Result(
        name="overflow",
        params={
            "burst": n,
            "quiet_s": quiet,
            "scenarios": list(scenarios),
            "rows": [r[0] for r in rows],
            "tree": "nested, by doubling rbinds" if opts.quick else "flat, bind mounts",
            "quick": opts.quick,
            "left_out": missing,
        },
        records=records,
        tables=[table],
        notes=notes,
        summary={
            f"{r['scenario']}/{r['row']}": {"recovered_s": r["recovered_s"], "equal": r["equal"]}
            for r in records
        },
    )


def plot(result: Result, path: Path) -> None:
    scenarios = [x for x in SCENARIOS if any(r["scenario"] == x for r in result.records)]
    with figure(path, width=6.0 * max(1, len(scenarios)), height=4.5) as fig:
        for i, scenario in enumerate(scenarios):
            ax = fig.add_subplot(1, len(scenarios), i + 1)
            recs = [r for r in result.records if r["scenario"] == scenario]
            for r in recs:
                xs = [p[0] for p in r["timeline"]]
                ys = [p[1] for p in r["timeline"]]
                (line,) = ax.plot(xs, ys, "-", drawstyle="steps-post", label=r["row"])
                if r["first_resync_s"] is not None:
                    ax.axvline(r["first_resync_s"], color=line.get_color(), ls=":", alpha=0.7)
            k = recs[0]["kernel_mounts"]
            ax.axhline(k, color="grey", linestyle="--", linewidth=0.8, label=f"kernel: {k:,}")
            ax.set_xlabel("seconds since the burst's first mount syscall")
            ax.set_ylabel("mounts in the consumer's table")
            ax.set_title(f"{scenario}: 20,000-mount burst (dotted: resync)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)


register(
    "overflow",
    "time from a 20,000-mount burst to a consumer table equal to the kernel's",
    plot=plot,
)(run)

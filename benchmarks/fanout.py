"""Fan-out: frames/s delivered in total to 1, 10, 100 and 1,000 subscribers of one
`amountd serve`, JSON and msgpack.

A fresh private namespace (a handful of mounts), `amountd serve --source fanotify`. K
subscriptions spread over a few counting client processes (benchmarks.serving: they
count frames without decoding them, so they cost the 2 cores little next to the server).
Once every subscriber has its `ready`, nsdriver.py makes PAIRS tmpfs mount+umount pairs
as fast as the kernel goes, and the clients count until every subscriber has all 2 x
PAIRS events (or, after a resync, until the server has been idle for a moment).

- frames/s: event frames delivered to all subscribers / time from the first event's
  arrival at any subscriber to the last one's;
- events/s in: the fastest subscriber's events / its own first-to-last time (the rate
  the server took changes in and published them);
- server CPU per delivered frame: the server's schedstat (all threads) over the burst,
  its idle rate subtracted, / frames delivered (the source's own work included);
- lag: every subscriber notes when its 1st, 2nd, ... STRIDE-th event arrived; at each
  such moment of the fastest subscriber, how many events the slowest was behind it
  (max lag), and at the moment the first subscriber had them all (lag at the end), and
  how long after that the slowest had them all (in ms); to within STRIDE events;
- resyncs: `resync` frames received (lagged subscribers lose their queue of --queue
  1,024 frames and get resync + snapshot; a kernel queue overflow gives every one a
  resync).
PAIRS shrinks as K grows, so that each round delivers a few hundred thousand frames.
"""

from __future__ import annotations

import bisect
import time
from pathlib import Path
from typing import Any

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
from .serving import ClientProcs, Quiet, ServeProcess

__all__ = ["FORMATS", "SUBSCRIBERS", "run"]

SUBSCRIBERS = (1, 10, 100, 1000)
FORMATS = ("json", "msgpack")


def _events_for(k: int, quick: bool) -> int:
    """Events per round: enough frames to time, few enough for the 2 cores."""
    if quick:
        return 200
    return max(400, min(10000, 400_000 // k // 2 * 2))


def _lag(subs: list[dict[str, Any]], stride: int, expect: int) -> dict[str, Any]:
    """How far behind the fastest subscriber the slowest was (see the module doc)."""
    full = [s for s in subs if s["kinds"]["resync"] == 0 and len(s["marks"]) >= 1]
    if len(full) < 2:
        return {
            "max_lag_events": 0 if full else None,
            "end_lag_events": 0 if full else None,
            "end_lag_ms": 0.0 if full else None,
        }
    marks = [s["marks"] for s in full]
    depth = max(len(m) for m in marks)
    max_lag = 0
    for j in range(depth):
        firsts = [m[j] for m in marks if len(m) > j]
        t = min(firsts)
        for m in marks:
            behind = (j + 1) - bisect.bisect_right(m, t)  # marks it had by t
            max_lag = max(max_lag, behind * stride)
    done = [m[-1] for m in marks if len(m) * stride >= expect - expect % stride]
    end_lag_events = None
    end_lag_ms = None
    if done:
        t_first = min(done)
        end_lag_events = max((depth - bisect.bisect_right(m, t_first)) * stride for m in marks)
        end_lag_ms = (max(done) - t_first) * 1e3
    return {
        "max_lag_events": max_lag,
        "end_lag_events": end_lag_events,
        "end_lag_ms": end_lag_ms,
    }


def _round(
    ns: PrivateNs,
    server: ServeProcess,
    *,
    k: int,
    fmt: str,
    events: int,
    quiet: float,
    settle: float = 0.2,
    idle_s: float = 0.5,
) -> dict[str, Any]:
    pairs = events // 2
    expect = 2 * pairs
    stride = max(1, expect // 200)
    procs = 1 if k == 1 else min(4, max(2, k // 100))
    t_connect = time.monotonic()
    with ClientProcs(
        server.sock, k, fmt, procs=procs, expect=expect, stride=stride, timeout=120
    ) as clients:
        connect_s = time.monotonic() - t_connect
        time.sleep(settle)  # let the server settle after k subscriptions
        idle = server.idle_rate(idle_s)
        cpu0 = server.cpu_ns()
        t0 = time.monotonic()
        drv = ns.driver("pairs", pairs, 0)
        reports = clients.collect(quiet=Quiet(server.cpu_ns, quiet), timeout=600)
        wall = time.monotonic() - t0
        cpu = server.cpu_ns() - cpu0
    subs = [s for rep in reports for s in rep["subs"]]
    if len(subs) != k:
        raise BenchmarkError(f"{len(subs)} subscribers reported, not {k}")
    firsts = [s["first"] for s in subs if s["first"] is not None]
    lasts = [s["last"] for s in subs if s["last"] is not None]
    frames = sum(s["events"] for s in subs)
    if not firsts or frames == 0:
        raise BenchmarkError(f"no event reached any of {k} subscribers:\n{server.log()[-800:]}")
    window = max(lasts) - min(firsts)
    fastest = max(subs, key=lambda s: (s["events"], -(s["last"] or 0) + (s["first"] or 0)))
    fast_window = (fastest["last"] or 0) - (fastest["first"] or 0)
    busy = max(0.0, cpu - idle * wall)
    rec: dict[str, Any] = {
        "subscribers": k,
        "format": fmt,
        "client_procs": len(reports),
        "events": expect,
        "frames_delivered": frames,
        "complete": sum(s["events"] >= expect for s in subs),
        "window_s": window,
        "frames_per_s": frames / window if window > 0 else None,
        "events_in_per_s": fastest["events"] / fast_window if fast_window > 0 else None,
        "driver_changes_per_s": expect / max(drv["end"] - drv["start"], 1e-9),
        "server_cpu_s": cpu / 1e9,
        "server_idle_ns_per_s": idle,
        "server_cpu_per_frame_us": busy / frames / 1e3,
        "server_cpu_per_event_us": busy / expect / 1e3,
        "resyncs": sum(s["kinds"]["resync"] for s in subs),
        "resynced_subscribers": sum(1 for s in subs if s["kinds"]["resync"]),
        "snapshots": sum(s["kinds"]["snapshot"] for s in subs),
        "client_cpu_s": sum(rep["cpu_s"] for rep in reports),
        "connect_s": connect_s,
        "wall_s": wall,
        "stride": stride,
        "bytes": sum(s["bytes"] for s in subs),
    }
    rec.update(_lag(subs, stride, expect))
    # The slowest and fastest arrival curves, for the plot.
    slowest = min(subs, key=lambda s: (s["events"], -(s["last"] or 0)))
    t_base = min(firsts)
    rec["curves"] = {
        name: [round(t - t_base, 6) for t in s["marks"]]
        for name, s in (("fastest", fastest), ("slowest", slowest))
    }
    return rec


def run(opts: Options) -> Result:
    subs_list = (1, 10) if opts.quick else SUBSCRIBERS
    # Quick: the server's idle rate (0 on this machine) from 0.05 s rather than 0.5 s.
    quiet, settle, idle_s = (0.1, 0.05, 0.05) if opts.quick else (0.5, 0.2, 0.5)
    records: list[dict[str, Any]] = []
    with PrivateNs(keep_driver=opts.quick) as ns, ServeProcess(ns, source="fanotify") as server:
        opts.log(f"namespace of pid {ns.pid}: {ns.mount_count()} mounts; server pid {server.pid}")
        for fmt in FORMATS:
            for k in subs_list:
                events = _events_for(k, opts.quick)
                rec = _round(
                    ns,
                    server,
                    k=k,
                    fmt=fmt,
                    events=events,
                    quiet=quiet,
                    settle=settle,
                    idle_s=idle_s,
                )
                records.append(rec)
                opts.log(
                    f"{k:5} {fmt:7} subscribers: {rec['frames_per_s'] or 0:10,.0f} frames/s, "
                    f"{rec['server_cpu_per_frame_us']:.2f} us/frame, "
                    f"{rec['complete']}/{k} complete, {rec['resyncs']} resyncs, "
                    f"max lag {rec['max_lag_events']}"
                )
    missing = left_out({"subscribers": SUBSCRIBERS}, {"subscribers": subs_list})
    summary: dict[str, Any] = {}
    t = next((r for r in records if r["subscribers"] == 100 and r["format"] == "msgpack"), None)
    summary["target"] = {
        "subscribers": 100,
        "format": "msgpack",
        "frames_per_s": t["frames_per_s"] if t else None,
        "target_frames_per_s": 100_000,
        "met": bool(t and t["frames_per_s"] and t["frames_per_s"] >= 100_000),
    }
    return Result(
        name="fanout",
        params={
            "subscribers": list(subs_list),
            "formats": list(FORMATS),
            "events": {str(k): _events_for(k, opts.quick) for k in subs_list},
            "source": "fanotify",
            "server_queue": 1024,
            "quiet_s": quiet,
            "idle_s": idle_s,
            "quick": opts.quick,
            "left_out": missing,
        },
        records=records,
        tables=_tables(records),
        notes=[
            *left_out_note(missing),
            "frames/s = event frames delivered to all subscribers / first to last arrival; "
            "events/s in = the fastest subscriber's rate (what the server took in)",
            "server CPU/frame: the server's schedstat over the burst, idle subtracted, "
            "/ frames delivered (the fanotify source's work included)",
            "lag: events the slowest subscriber was behind the fastest (max over the "
            "burst, and when the first had them all; to within 'stride' events); "
            "end lag ms: how long after the first the slowest had them all",
            "the counting clients run on the same 2 cores (their CPU is in 'client CPU s')",
        ],
        summary=summary,
    )


def _tables(records: list[dict[str, Any]]) -> list[Table]:
    return [
        Table(
            "Fan-out: one burst of mount+umount pairs, unpaced, to K subscribers (fanotify source)",
            [
                "format",
                "subs",
                "events",
                "frames",
                "complete",
                "window s",
                "frames/s",
                "events/s in",
                "server CPU s",
                "us/frame",
                "max lag",
                "end lag",
                "end lag ms",
                "resyncs",
                "client CPU s",
            ],
            [
                [
                    r["format"],
                    r["subscribers"],
                    r["events"],
                    r["frames_delivered"],
                    f"{r['complete']}/{r['subscribers']}",
                    r["window_s"],
                    r["frames_per_s"],
                    r["events_in_per_s"],
                    r["server_cpu_s"],
                    r["server_cpu_per_frame_us"],
                    r["max_lag_events"],
                    r["end_lag_events"],
                    r["end_lag_ms"],
                    r["resyncs"],
                    r["client_cpu_s"],
                ]
                for r in records
            ],
        )
    ]


def plot(result: Result, path: Path) -> None:
    styles = {"json": ("tab:blue", "-o"), "msgpack": ("tab:orange", "-s")}
    with figure(path, width=11.0, height=4.2) as fig:
        ax1 = fig.add_subplot(1, 2, 1)
        ax2 = fig.add_subplot(1, 2, 2)
        for fmt, (color, style) in styles.items():
            pts = sorted(
                (r["subscribers"], r["frames_per_s"] or 0, r["server_cpu_per_frame_us"])
                for r in result.records
                if r["format"] == fmt
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ax1.plot(xs, [p[1] for p in pts], style, color=color, label=fmt)
            ax2.plot(xs, [p[2] for p in pts], style, color=color, label=fmt)
        ax1.axhline(100_000, color="grey", ls=":", lw=0.8, label="target: 100,000/s at 100")
        ax1.set_title("frames/s delivered in total")
        ax2.set_title("server CPU per delivered frame (µs)")
        for ax in (ax1, ax2):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("subscribers")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)


register(
    "fanout",
    "frames/s delivered to 1..1,000 subscribers, JSON and msgpack; CPU per frame; lag",
    plot=plot,
)(run)

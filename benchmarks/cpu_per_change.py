"""CPU per mount change, by source and table size, beside the C floor.

In a private namespace holding N mounts, a watcher PROCESS follows K mount+umount pairs
made by nsdriver.py inside the namespace; its CPU (every thread, from schedstat, before
and after, less its idle rate over the same time) is divided by the changes made.

Rows: `amountd watch --json --source fanotify` (on asyncio, and `--backend trio`),
`... --source listmount` (the kernels without fanotify mount events: IDs listed, new
mounts stat'ed, sweeps within their CPU budget), `... --source mountinfo`,
`findmnt --poll --task PID` (util-linux: the tool every Linux machine already has), and
`cfloor` (benchmarks/cfloor.c, built with the system's `cc`: fanotify read + one
statmount per attach + one flushed line per change, the least a watcher can do),
`pyfloor` (benchmarks/pyfloor.py: the same watcher in Python on an asyncio loop, what
the interpreter costs before amountd does anything), and `fanotify-hot` /
`listmount-hot` (`--sweep-budget 0.0001`: the path of a change without the sweeps).

One pacing for every watcher and size, so that rows compare: one change every 8 ms,
one every 80 ms (each change meets an idle watcher: waking it is most of what it
costs), each after unmeasured pairs at the same pacing (amountd's sweeps have spent
their burst: what is measured is the steady state), and unpaced (the pairs as fast as
the kernel makes them: a watcher that re-reads the table coalesces changes, fanotify
reads them in batches). A watcher slower than the pacing falls behind and reports
fewer changes than were made.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
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
SOURCES = (
    "cfloor",
    "pyfloor",
    "fanotify",
    "fanotify-trio",
    "fanotify-hot",
    "listmount",
    "listmount-hot",
    "mountinfo",
    "findmnt",
)
HOT_BUDGET = 0.0001
"""`--sweep-budget` of the -hot rows: sweeps held to 0.01% of a core (their burst to one
1 ms slice), so the row is the path of a change alone, what is left without sweeps."""
MODES = ("8ms", "80ms", "unpaced")
GAPS = {"8ms": 0.008, "80ms": 0.08, "unpaced": 0.0}  # s between two changes
CFLOOR_C = Path(__file__).resolve().parent / "cfloor.c"
PYFLOOR = Path(__file__).resolve().parent / "pyfloor.py"


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
    pairs: int = 500  # unpaced
    paced_pairs: int = 100  # at 8 ms and at 80 ms
    lead_pairs: int = 20  # unmeasured, at the same pacing first: a steady state
    quiet: float = 0.3  # idle this long: the watcher caught up
    start_quiet: float = 0.3  # the same after a start that no `ready` announced (findmnt)
    change_timeout: float = 120.0  # for one warm-up change (else: a retry)
    step: float = 0.05  # how often the watcher's CPU is read while waiting for quiet
    idle_s: float = 1.0
    warm_up: bool = True  # one change alone first, thrown away (first-use costs)
    tail: float = 0.2  # after quiet, how long our reader may take to count the last lines
    fanotify_tail: float = 0.2  # the same for the watchers that report every change


# Quick: the watcher's idle rate and "caught up" from 10 ms reads (idle is 0 for all
# of them), no warm-up, 2 paced pairs; fanotify's tail is long because it reports every
# change (the wait ends as soon as they are counted), the re-readers' short (they
# coalesce: the wait always runs to its end).
QUICK = Plan(
    sizes=(100, 1000),
    pairs=20,
    paced_pairs=2,
    lead_pairs=0,
    quiet=0.03,
    start_quiet=0.1,
    change_timeout=10.0,
    step=0.01,
    idle_s=0.03,
    warm_up=False,
    tail=0.05,
    fanotify_tail=2.0,
)

# The watchers that report every change made (the others re-read and coalesce).
RE_READERS = ("mountinfo", "findmnt")
EVERY_CHANGE = tuple(s for s in SOURCES if s not in RE_READERS)


def _cfloor_change(line: bytes) -> bool:
    return line[:1] in (b"+", b"-")


def _cfloor_ready(line: bytes) -> bool:
    return line == b"ready\n"


def build_cfloor(out_dir: Path) -> tuple[Path | None, str | None]:
    """benchmarks/cfloor.c compiled with the system's C compiler: (binary, None), or
    (None, why not)."""
    cc = next((shutil.which(n) for n in ("cc", "gcc", "clang") if shutil.which(n)), None)
    if cc is None:
        return None, "no C compiler (cc, gcc, clang) on PATH: no C floor row"
    exe = out_dir / "cfloor"
    try:
        subprocess.run(
            [cc, "-O2", "-o", str(exe), str(CFLOOR_C)], check=True, capture_output=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        why = err.decode(errors="replace").strip().splitlines()[-1:] or [str(e)]
        return None, f"{cc} could not build cfloor.c ({why[0]}): no C floor row"
    return exe, None


def start_watcher(source: str, pid: int, cfloor: Path | None = None) -> Watcher:
    """The watcher process for one row, armed (amountd and cfloor: `ready` came)."""
    if source == "findmnt":
        exe = shutil.which("findmnt")
        if exe is None:
            raise BenchmarkError("findmnt (util-linux) is missing")
        # -n: no header, so every line is one change.
        return Watcher(
            "findmnt", [exe, "--poll", "--task", str(pid), "-n"], is_change=_findmnt_change
        )
    if source == "pyfloor":
        return Watcher(
            "pyfloor",
            [sys.executable, str(PYFLOOR), f"/proc/{pid}/ns/mnt"],
            is_change=_cfloor_change,
            is_ready=_cfloor_ready,
        )
    if source == "cfloor":
        if cfloor is None:
            raise BenchmarkError("cfloor was not built")
        return Watcher(
            "cfloor",
            [str(cfloor), f"/proc/{pid}/ns/mnt"],
            is_change=_cfloor_change,
            is_ready=_cfloor_ready,
        )
    argv = [sys.executable, "-m", "amountd", "watch", "--json", "--ns", str(pid)]
    if source == "fanotify-trio":
        argv += ["--source", "fanotify", "--backend", "trio"]
    elif source.endswith("-hot"):
        argv += ["--source", source.removesuffix("-hot"), "--sweep-budget", str(HOT_BUDGET)]
    else:
        argv += ["--source", source]
    return Watcher(source, argv, is_change=_amountd_event, is_ready=_amountd_ready, env=_env())


def calibrate(ns: PrivateNs, w: Watcher, plan: Plan) -> dict[str, Any]:
    """One change alone, twice: one mount, caught up, one umount, caught up.

    A warm-up: it also proves the watcher is polling (findmnt says nothing once armed,
    so a change it missed while starting is retried).
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
    }


def run(opts: Options) -> Result:
    plan = QUICK if opts.quick else Plan()
    sizes = plan.sizes
    notes: list[str] = []
    tmp = tempfile.TemporaryDirectory(prefix="amountd-cfloor-")
    cfloor, why = build_cfloor(Path(tmp.name))
    sources = [
        s
        for s in SOURCES
        if (s != "findmnt" or shutil.which("findmnt")) and (s != "cfloor" or cfloor)
    ]
    if why is not None:
        notes.append(why)
    if "findmnt" not in sources:
        notes.append("findmnt (util-linux) is missing: its rows are left out")
    missing = left_out({"sizes": Plan().sizes}, {"sizes": sizes})
    notes += left_out_note(missing)
    records: list[dict[str, Any]] = []
    try:
        for n in sizes:
            with PrivateNs(keep_driver=opts.quick) as ns:
                mounts = ns.populate(n)
                opts.log(f"N={n}: {mounts} mounts in namespace of pid {ns.pid}")
                for source in sources:
                    records += _rows(
                        ns, source=source, mounts=mounts, n=n, plan=plan, opts=opts, cfloor=cfloor
                    )
    finally:
        tmp.cleanup()
    summary = _summary(records)
    return Result(
        name="cpu_per_change",
        params={
            "sizes": list(sizes),
            "pairs": plan.pairs,
            "paced_pairs": plan.paced_pairs,
            "gaps_ms": {m: g * 1e3 for m, g in GAPS.items()},
            "warm_up": plan.warm_up,
            "quiet_s": plan.quiet,
            "idle_s": plan.idle_s,
            "modes": list(MODES),
            "sources": sources,
            "cfloor": why or "built with the system's cc",
            "quick": opts.quick,
            "left_out": missing,
        },
        records=records,
        tables=_tables(records),
        notes=notes,
        summary=summary,
    )


def _rows(
    ns: PrivateNs,
    *,
    source: str,
    mounts: int,
    n: int,
    plan: Plan,
    opts: Options,
    cfloor: Path | None,
) -> list[dict[str, Any]]:
    """One watcher, its rows at every pacing."""
    out: list[dict[str, Any]] = []
    with start_watcher(source, ns.pid, cfloor) as w:
        w.wait_ready(60)
        if plan.warm_up:  # first-use costs (imports, caches)
            calibrate(ns, w, plan)
        alone = calibrate(ns, w, plan)
        idle = idle_rate(w, plan.idle_s)
        tail = plan.fanotify_tail if source in EVERY_CHANGE else plan.tail
        for mode in MODES:
            gap = GAPS[mode]
            k = plan.paced_pairs if gap else plan.pairs
            if gap and plan.lead_pairs:  # the sweeps' burst spent, caches as they will be
                ns.driver("pairs", plan.lead_pairs, gap)
                wait_quiet(w.cpu_ns, quiet=plan.quiet, step=plan.step, limit=600)
            rec = measure(ns, w, pairs=k, gap=gap, idle_ns_per_s=idle, plan=plan, tail=tail)
            rec.update(
                source=source,
                mode=mode,
                mounts=mounts,
                size=n,
                alone_us=alone["cpu_per_change_us"],
                idle_ns_per_s=idle,
                threads=w.threads(),
            )
            out.append(rec)
            opts.log(
                f"N={n} {source:13} {mode:8} {rec['cpu_per_change_us']:10.1f} us/change"
                f"  reported {rec['changes_reported']}/{rec['changes_made']}"
            )
    return out


def _find(records: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    for r in records:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if a is None or b is None or not b["cpu_per_change_us"]:
        return None
    return float(a["cpu_per_change_us"]) / float(b["cpu_per_change_us"])


def _less(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if a is None or b is None:
        return None
    return float(a["cpu_per_change_us"]) - float(b["cpu_per_change_us"])


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = sorted({int(r["size"]) for r in records})
    out: dict[str, Any] = {"ratios": []}
    for n in sizes:
        for mode in MODES:
            fan = _find(records, size=n, mode=mode, source="fanotify")
            floor = _find(records, size=n, mode=mode, source="cfloor")
            out["ratios"].append(
                {
                    "size": n,
                    "mode": mode,
                    "fanotify_over_cfloor": _ratio(fan, floor),
                    "trio_over_cfloor": _ratio(
                        _find(records, size=n, mode=mode, source="fanotify-trio"), floor
                    ),
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
                    "pyfloor_over_cfloor": _ratio(
                        _find(records, size=n, mode=mode, source="pyfloor"), floor
                    ),
                    "hot_over_cfloor": _ratio(
                        _find(records, size=n, mode=mode, source="fanotify-hot"), floor
                    ),
                    "sweeps_us": _less(
                        fan, _find(records, size=n, mode=mode, source="fanotify-hot")
                    ),
                    "mountinfo_over_listmount_hot": _ratio(
                        _find(records, size=n, mode=mode, source="mountinfo"),
                        _find(records, size=n, mode=mode, source="listmount-hot"),
                    ),
                }
            )
    lo, hi = min(sizes), max(sizes)
    targets = []
    for mode in MODES:
        f_lo = _find(records, size=lo, mode=mode, source="fanotify")
        f_hi = _find(records, size=hi, mode=mode, source="fanotify")
        m_hi = _find(records, size=hi, mode=mode, source="mountinfo")
        x_floor = _ratio(f_hi, _find(records, size=hi, mode=mode, source="cfloor"))
        scale = _ratio(f_hi, f_lo)
        vs = _ratio(m_hi, f_hi)
        lvs = _ratio(m_hi, _find(records, size=hi, mode=mode, source="listmount"))
        targets.append(
            {
                "mode": mode,
                f"fanotify_{hi}_over_cfloor": x_floor,
                "target_cfloor_max": 3.0,
                "cfloor_met": x_floor is not None and x_floor <= 3.0,
                f"fanotify_hot_{hi}_over_cfloor": _ratio(
                    _find(records, size=hi, mode=mode, source="fanotify-hot"),
                    _find(records, size=hi, mode=mode, source="cfloor"),
                ),
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
            "x the C floor",
            "us/reported",
            "wakeups/change",
        ],
        [
            [
                r["mounts"],
                r["source"],
                r["mode"],
                r["gap_ms"],
                r["changes_made"],
                r["changes_reported"],
                (r["cpu_ns"] - r["idle_ns"]) / 1e6,
                r["cpu_per_change_us"],
                _ratio(r, _find(records, size=r["size"], mode=r["mode"], source="cfloor")),
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
            "fanotify/C floor",
            "trio/C floor",
            "mountinfo/fanotify",
            "findmnt/fanotify",
            "mountinfo/listmount",
            "sweeps us",
            "pyfloor/C floor",
            "hot/C floor",
            "mountinfo/listmount-hot",
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
                s["fanotify_over_cfloor"],
                s["trio_over_cfloor"],
                s["mountinfo_over_fanotify"],
                s["findmnt_over_fanotify"],
                s["mountinfo_over_listmount"],
                s["sweeps_us"],
                s["pyfloor_over_cfloor"],
                s["hot_over_cfloor"],
                s["mountinfo_over_listmount_hot"],
            ]
        )
    return [main, ratios]


def plot(result: Result, path: Path) -> None:
    colors = {
        "cfloor": "black",
        "pyfloor": "tab:gray",
        "fanotify": "tab:green",
        "fanotify-trio": "tab:olive",
        "fanotify-hot": "tab:cyan",
        "listmount": "tab:orange",
        "listmount-hot": "tab:brown",
        "mountinfo": "tab:red",
        "findmnt": "tab:blue",
    }
    with figure(path) as fig:
        ax = fig.add_subplot(1, 1, 1)
        for source in SOURCES:
            for mode, style in (("80ms", ":^"), ("8ms", "-o"), ("unpaced", "--s")):
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

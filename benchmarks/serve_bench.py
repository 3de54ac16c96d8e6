"""`amountd serve` measured: mount-to-subscriber latency and fan-out throughput.

    sudo .venv/bin/python -m benchmarks.serve_bench [--latency N] [--fanout PAIRS]
                                                    [--subs 1,10,100] [--backend asyncio]

Every mount is made inside a private mount namespace (benchmarks.common.PrivateNs);
the server watches it with `--ns PID`, over a Unix socket in a temporary directory.

Latency: a driver inside the namespace mounts a tmpfs at a fresh path, reads
CLOCK_MONOTONIC as the mount(2) call returns (and just before it is made), and waits a
little before the next one.
A subscriber (amountd.connect(), msgpack, on the same machine) reads CLOCK_MONOTONIC
as each event comes out of its iterator. Latency = arrival - syscall return: the
kernel's notification, the source's statmount, the broker, the socket, the client's
decoding. (The event's own `time` field is when amountd learnt of it: not used.) The
kernel queues the event inside the syscall, so on an idle multi-CPU machine a frame can
arrive before the driver has read the clock after the call: small negative values are
real, and the latency from the call's start is given as an upper bound.

Fan-out: K subscribers, spread over a few client processes that read raw JSON lines
and only count them (so the clients cost little next to the server), while the driver
makes PAIRS tmpfs mount+umount pairs as fast as it can. Reported: events/s the server
took in, and frames/s it delivered in all (events x K / time from the first delivered
event to the last, over all subscribers), with any resync a subscriber had to take.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PrivateNs

ROOT = Path(__file__).resolve().parent.parent

LATENCY_DRIVER = r"""
import ctypes, json, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
base, n, gap = os.fsencode(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
times = []
for i in range(n):
    p = base + b"/lat/%d" % i
    os.makedirs(p, exist_ok=True)
    time.sleep(gap)
    t0 = time.monotonic()
    if libc.mount(b"lat", p, b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount")
    times.append((t0, time.monotonic()))
print(json.dumps(times), flush=True)
"""


def start_server(ns: PrivateNs, sock: Path, backend: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "amountd", "serve", "--backend", backend]
    cmd += ["--unix", str(sock), "--ns", str(ns.pid)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, cwd=ROOT)
    deadline = time.monotonic() + 20
    while "serving on " not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"amountd serve did not start:\n{log.read_text()}")
        time.sleep(0.01)
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- latency ---------------------------------------------------------------------------------


def latency(ns: PrivateNs, sock: Path | None, n: int, gap: float, backend: str) -> dict[str, Any]:
    """Through the server at `sock`; with None, amountd.watch() in this process (the
    source alone, for comparison)."""
    import anyio

    from amountd import connect, watch
    from amountd.model import Event

    base = ns.base
    arrivals: dict[bytes, float] = {}

    async def main() -> list[tuple[float, float]]:
        cm = connect(f"unix:{sock}") if sock is not None else watch(ns=ns.pid)
        async with cm as frames:
            await anext(frames)  # ready: armed
            driver = await anyio.open_process(
                ns.argv([sys.executable, "-c", LATENCY_DRIVER, base, str(n), str(gap)])
            )
            with anyio.fail_after(60 + n * gap * 2):
                while len(arrivals) < n:
                    frame = await anext(frames)
                    t = time.monotonic()
                    if isinstance(frame, Event) and frame.action == "mount":
                        arrivals[os.fsencode(frame.mount.target or "")] = t
                assert driver.stdout is not None
                out = b""
                async for chunk in driver.stdout:
                    out += chunk
                await driver.wait()
            return [(a, b) for a, b in json.loads(out)]

    stamps = anyio.run(main, backend=backend)
    from_return, from_call = [], []
    for i, (called, returned) in enumerate(stamps):
        t = arrivals[os.fsencode(f"{base}/lat/{i}")]
        from_return.append((t - returned) * 1e6)
        from_call.append((t - called) * 1e6)
    out: dict[str, Any] = {"samples": len(stamps)}
    for name, lat in (("", from_return), ("from_call_", from_call)):
        lat.sort()
        q = statistics.quantiles(lat, n=100)
        out |= {
            f"{name}p50_us": round(q[49], 1),
            f"{name}p90_us": round(q[89], 1),
            f"{name}p99_us": round(q[98], 1),
            f"{name}max_us": round(lat[-1], 1),
        }
    return out


# --- fan-out ----------------------------------------------------------------------------------


def client_main(path: str, k: int, expect: int, timeout: float) -> None:
    """A counting client process: k raw JSON subscriptions; prints one JSON line."""
    sel = selectors.DefaultSelector()
    req = b'{"type":"subscribe","version":1,"format":"json"}\n'
    state = []
    for _ in range(k):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(req)
        s.setblocking(False)
        st = {"sock": s, "lines": 0, "first": None, "last": None, "resync": 0, "done": False}
        state.append(st)
        sel.register(s, selectors.EVENT_READ, st)
    print("ready", flush=True)
    deadline = time.monotonic() + timeout
    left = k
    last_any: float | None = None
    while left and time.monotonic() < deadline:
        if last_any is not None and time.monotonic() - last_any > 3:
            break  # quiet for 3 s: a resynced subscriber will never count them all
        for key, _ in sel.select(1.0):
            last_any = time.monotonic()
            st = key.data
            data = st["sock"].recv(1 << 20)
            now = time.monotonic()
            if not data:
                sel.unregister(st["sock"])
                left -= 1
                continue
            n = data.count(b"\n")
            if st["first"] is None and st["lines"] + n > 1:
                st["first"] = now  # the first event (line 1 is `ready`)
            st["lines"] += n
            st["last"] = now
            st["resync"] += data.count(b'"type":"resync"')
            if st["lines"] >= expect + 1 and not st["done"]:
                st["done"] = True
                sel.unregister(st["sock"])
                left -= 1
    print(
        json.dumps([{k2: v for k2, v in st.items() if k2 != "sock"} for st in state]),
        flush=True,
    )


def fanout(ns: PrivateNs, sock: Path, k: int, pairs: int) -> dict[str, Any]:
    expect = 2 * pairs
    procs_n = min(k, 4)
    share = [k // procs_n + (1 if i < k % procs_n else 0) for i in range(procs_n)]
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.serve_bench",
                "--client",
                str(sock),
                str(n),
                str(expect),
            ],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        for n in share
    ]
    for c in clients:
        assert c.stdout is not None
        assert c.stdout.readline().strip() == b"ready"
    time.sleep(0.3)  # every subscription registered and `ready` sent
    drv = ns.driver("pairs", pairs, 0)
    subs: list[dict[str, Any]] = []
    for c in clients:
        out, _ = c.communicate(timeout=300)
        subs += json.loads(out.decode().strip().splitlines()[-1])
    first = min(s["first"] for s in subs if s["first"] is not None)
    last = max(s["last"] for s in subs if s["last"] is not None)
    events = sum(max(0, s["lines"] - 1) for s in subs)
    took = drv["end"] - drv["start"]
    return {
        "subscribers": k,
        "events": expect,
        "frames_delivered": events,
        "seconds": round(last - first, 3),
        "frames_per_s": round(events / (last - first)),
        "events_per_s_in": round(expect / max(last - first, 1e-9)),
        "driver_changes_per_s": round(expect / took),
        "resyncs": sum(s["resync"] for s in subs),
        "complete": sum(s["lines"] >= expect + 1 for s in subs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--latency", type=int, default=500, metavar="N", help="mounts to time")
    ap.add_argument("--gap", type=float, default=0.005, help="seconds between timed mounts")
    ap.add_argument("--fanout", type=int, default=5000, metavar="PAIRS", help="mount+umount pairs")
    ap.add_argument("--subs", default="1,10,100", help="subscriber counts")
    ap.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    ap.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(args.client[0], int(args.client[1]), int(args.client[2]), 120)
        return
    results: dict[str, Any] = {"backend": args.backend, "cpus": os.cpu_count()}
    with PrivateNs() as ns, tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "amountd.sock"
        log = Path(tmp) / "serve.log"
        server = start_server(ns, sock, args.backend, log)
        try:
            if args.latency:
                for name, where in (("latency_watch_in_process", None), ("latency", sock)):
                    results[name] = latency(ns, where, args.latency, args.gap, args.backend)
                    print(name, json.dumps(results[name]), flush=True)
                    ns.run(["sh", "-c", f"umount {ns.base}/lat/* 2>/dev/null; true"])
            results["fanout"] = []
            for k in (int(x) for x in args.subs.split(",") if x):
                r = fanout(ns, sock, k, args.fanout)
                results["fanout"].append(r)
                print("fanout", json.dumps(r), flush=True)
        finally:
            stop_server(server)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Churn many private mount namespaces at once, from one process: a thread per namespace.

    python3 nschurn.py SECONDS RATE SEED PID:DIR[:KILL_AT] ...

Each thread enters its namespace (unshare(CLONE_FS), then setns: the thread alone, like
`nsenter -t PID -m`), checks that it is there, and only then mounts: tmpfs mounts and
umounts on DIR/c0..c9 (DIR must be a tmpfs of that namespace), stacked up to two
deep, about RATE changes a second, for SECONDS. With KILL_AT, the
thread stops after KILL_AT seconds, leaves the namespace (the thread exits), and the
process PID is killed: the namespace is freed mid-run.

Test helper only: it changes mounts only in the namespaces the test made, never the
host's (a thread that cannot prove it is inside its namespace touches nothing).
Prints one JSON line: the changes made per PID, and the PIDs killed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time

from mountcalls import check as _check
from mountcalls import libc, mount, umount

CLONE_FS = 0x200
CLONE_NEWNS = 0x20000


HOME = os.readlink("/proc/self/ns/mnt")  # where this process started: never touched


def _enter(pid: int) -> None:
    _check(libc.unshare(CLONE_FS), "unshare(CLONE_FS)")
    want = os.readlink(f"/proc/{pid}/ns/mnt")
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(libc.setns(fd, CLONE_NEWNS), "setns")
    finally:
        os.close(fd)
    here = os.readlink("/proc/thread-self/ns/mnt")
    if here != want or here == HOME:
        raise SystemExit(f"thread is not in the namespace of {pid}: refusing to mount")


def churn(pid: int, d: bytes, until: float, *, rate: float, seed: int, out: dict[int, int]) -> None:
    _enter(pid)
    rng = random.Random(seed)
    slots = [d + b"/c%d" % i for i in range(10)]
    for p in slots:
        os.makedirs(p, exist_ok=True)
    depth = [0] * 10
    n = 0
    while time.monotonic() < until:
        k = rng.randrange(10)
        if depth[k] < 2 and (depth[k] == 0 or rng.random() < 0.5):
            mount(b"churn%d" % n, slots[k], b"tmpfs", 0, b"size=64k")
            depth[k] += 1
        else:
            umount(slots[k])
            depth[k] -= 1
        n += 1
        time.sleep(rng.expovariate(rate))
    out[pid] = n


def guarded(
    pid: int, d: bytes, until: float, *, rate: float, seed: int, out: dict[int, int]
) -> None:
    try:
        churn(pid, d, until, rate=rate, seed=seed, out=out)
    except BaseException as e:  # reported by main, which then fails
        failures.append(f"{pid}: {e!r}")


failures: list[str] = []


def main() -> None:
    seconds, rate, seed = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    start = time.monotonic()
    done: dict[int, int] = {}
    threads: list[tuple[threading.Thread, int, float | None]] = []
    for i, spec in enumerate(sys.argv[4:]):
        parts = spec.split(":")
        pid, d = int(parts[0]), os.fsencode(parts[1])
        kill_at = float(parts[2]) if len(parts) > 2 else None
        until = start + (kill_at if kill_at is not None else seconds)
        t = threading.Thread(
            target=guarded,
            args=(pid, d, until),
            kwargs={"rate": rate, "seed": seed + i, "out": done},
        )
        t.start()
        threads.append((t, pid, kill_at))
    killed: list[int] = []
    for t, pid, kill_at in sorted(threads, key=lambda x: x[2] if x[2] is not None else 1e9):
        t.join()
        if kill_at is not None:
            os.kill(pid, signal.SIGKILL)  # the thread has left: nothing else holds it
            killed.append(pid)
    print(json.dumps({"changes": done, "killed": killed, "failures": failures}), flush=True)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Mount churn at syscall speed, run INSIDE a benchmark's private namespace (via nsenter).

    python nsdriver.py populate DIR N     N bind mounts of DIR/src at DIR/m/0..N-1
    python nsdriver.py pairs DIR K GAP    K tmpfs mount+umount pairs on DIR/p, GAP seconds
                                          between changes (0: as fast as the kernel goes)
    python nsdriver.py burst DIR N        N bind mounts of DIR/src at DIR/b/0..N-1, unpaced
    python nsdriver.py tree DIR N         N bind mounts of DIR/src at DIR/t/0..N-1 (for rbind)
    python nsdriver.py fasttree DIR N     N mounts beneath DIR/t, nested, in 2 log2(N) rbinds
    python nsdriver.py rbind DIR          mount --rbind DIR/t DIR/r: 1 + N mounts in ONE syscall
    python nsdriver.py up DIR             one tmpfs mount on DIR/p
    python nsdriver.py down DIR           umount DIR/p
    python nsdriver.py timed DIR K GAP TAG  K tmpfs mount+umount pairs, each at its own
                                          DIR/TAG/I, GAP seconds before every syscall;
                                          "stamps": [t_call, t_return] of each syscall
    python nsdriver.py remount DIR I ro|rw  remount DIR/m/I (a populated bind mount)
                                          read-only or read-write, per mount (MS_BIND)
    python nsdriver.py serve DIR          the ops above read from stdin, one a line

Each op prints one JSON line: {"start": T0, "end": T1, "changes": C}, CLOCK_MONOTONIC
seconds around its mount syscalls (one clock for every namespace, so the benchmark can
line these up with its own readings). Plain ctypes and the standard library only: it
runs with whichever Python the benchmark runs, and never on the host's table.
"""

from __future__ import annotations

import json
import os
import sys
import time

# The mount calls are the tests' (tests/mountcalls.py): this runs as a script, by path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from mountcalls import MNT_DETACH, MS_BIND, MS_RDONLY, MS_REC, MS_REMOUNT, mount, umount


def _dirs(base: bytes, n: int) -> list[bytes]:
    os.makedirs(base, exist_ok=True)
    out = [base + b"/%d" % i for i in range(n)]
    for p in out:
        os.makedirs(p, exist_ok=True)
    return out


def binds(d: bytes, sub: bytes, n: int) -> tuple[float, float]:
    src = d + b"/src"
    os.makedirs(src, exist_ok=True)
    targets = _dirs(d + b"/" + sub, n)
    t0 = time.monotonic()
    for p in targets:
        mount(src, p, None, MS_BIND)
    return t0, time.monotonic()


def fast_tree(d: bytes, n: int) -> tuple[float, float]:
    """N mounts beneath DIR/t, nested, in 2 log2(N) syscalls rather than N (a bind mount
    costs time in proportion to the table: 20,000 of them take seconds).

    DIR/f holds 2^j - 1 mounts after j rounds of `mount --rbind DIR/f DIR/f/xJ` (the
    copy is made before it attaches: 2m + 1 each time); binding it at DIR/t/J adds 2^j
    mounts to DIR/t, for each bit j of N. DIR/f is detached (lazily, each subtree in one
    call) at the end: only DIR/t's N mounts stay.
    """
    helper, tree = d + b"/f", d + b"/t"
    os.makedirs(helper, exist_ok=True)
    os.makedirs(tree, exist_ok=True)
    t0 = time.monotonic()
    grown: list[bytes] = []
    for j in range(n.bit_length()):
        if n >> j & 1:
            dst = tree + b"/%d" % j
            os.makedirs(dst, exist_ok=True)
            mount(helper, dst, None, MS_BIND | MS_REC)
        if n >> (j + 1):
            dst = helper + b"/x%d" % j
            os.makedirs(dst, exist_ok=True)
            mount(helper, dst, None, MS_BIND | MS_REC)
            grown.append(dst)
    for p in grown:
        umount(p, MNT_DETACH)
    return t0, time.monotonic()


def pairs(d: bytes, k: int, gap: float) -> tuple[float, float]:
    p = d + b"/p"
    os.makedirs(p, exist_ok=True)
    t0 = time.monotonic()
    if gap <= 0:
        for _ in range(k):
            mount(b"pair", p, b"tmpfs")
            umount(p)
        return t0, time.monotonic()
    due = t0
    for _ in range(k):
        mount(b"pair", p, b"tmpfs")
        due += gap
        _sleep_until(due)
        umount(p)
        due += gap
        _sleep_until(due)
    return t0, time.monotonic()


def timed(d: bytes, k: int, gap: float, tag: bytes) -> tuple[float, float, list[list[float]]]:
    """Mount then umount DIR/TAG/I, one change every `gap` s, each syscall's clock
    read just before the call and just after it returns (the latency benchmark)."""
    targets = _dirs(d + b"/" + tag, k)
    stamps: list[list[float]] = []
    t0 = time.monotonic()
    for p in targets:
        time.sleep(gap)
        a = time.monotonic()
        mount(b"lat", p, b"tmpfs")
        b = time.monotonic()
        stamps.append([a, b])
        time.sleep(gap)
        a = time.monotonic()
        umount(p)
        b = time.monotonic()
        stamps.append([a, b])
    return t0, time.monotonic(), stamps


def _sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def op_json(op: str, d: bytes, args: list[str]) -> str:
    """One op (see the module doc); its JSON line."""
    if op == "populate":
        n = int(args[0])
        t0, t1 = binds(d, b"m", n)
        changes = n
    elif op == "burst":
        n = int(args[0])
        t0, t1 = binds(d, b"b", n)
        changes = n
    elif op == "tree":
        n = int(args[0])
        t0, t1 = binds(d, b"t", n)
        changes = n
    elif op == "fasttree":
        n = int(args[0])
        t0, t1 = fast_tree(d, n)
        changes = n
    elif op == "rbind":
        src, dst = d + b"/t", d + b"/r"
        os.makedirs(src, exist_ok=True)
        os.makedirs(dst, exist_ok=True)
        t0 = time.monotonic()
        mount(src, dst, None, MS_BIND | MS_REC)
        t1 = time.monotonic()
        changes = -1  # the benchmark counts them
    elif op == "pairs":
        k, gap = int(args[0]), float(args[1])
        t0, t1 = pairs(d, k, gap)
        changes = 2 * k
    elif op in ("up", "down"):
        p = d + b"/p"
        os.makedirs(p, exist_ok=True)
        t0 = time.monotonic()
        if op == "up":
            mount(b"pair", p, b"tmpfs")
        else:
            umount(p)
        t1 = time.monotonic()
        changes = 1
    elif op == "remount":
        p = d + b"/m/%d" % int(args[0])
        flags = MS_REMOUNT | MS_BIND | (MS_RDONLY if args[1] == "ro" else 0)
        t0 = time.monotonic()
        mount(None, p, None, flags)
        t1 = time.monotonic()
        changes = 1
    elif op == "timed":
        k, gap, tag = int(args[0]), float(args[1]), os.fsencode(args[2])
        t0, t1, stamps = timed(d, k, gap, tag)
        return json.dumps({"start": t0, "end": t1, "changes": 2 * k, "stamps": stamps})
    else:
        raise SystemExit(f"unknown op {op}")
    return json.dumps({"start": t0, "end": t1, "changes": changes})


def serve(d: bytes) -> None:
    """Ops read from stdin, one a line ("OP ARG ..."), each answered by its JSON line
    (or {"error": ...}): a driver that stays, so an op costs no start-up (--quick)."""
    for line in sys.stdin:
        op, *args = line.split() or [""]
        try:
            out = op_json(op, d, args)
        except (OSError, ValueError, IndexError, SystemExit) as e:
            out = json.dumps({"error": f"{op}: {e}"})
        print(out, flush=True)


def main() -> None:
    op, d = sys.argv[1], os.fsencode(sys.argv[2])
    if op == "serve":
        serve(d)
        return
    print(op_json(op, d, sys.argv[3:]), flush=True)


if __name__ == "__main__":
    main()

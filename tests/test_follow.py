"""The client keeps the table: after a resync, `subscribe` prints what changed."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path

from amountd.model import Event, Mount, Resync, Snapshot, decode_json, fspath
from amountd.table import Follower

from .conftest import PrivateNs
from .factories import event, mount
from .multihelp import Serve


def _table(*targets: tuple[int, str]) -> list[Mount]:
    return [mount(key, target, ids="legacy", full=False) for key, target in targets]


def test_follower_turns_a_fresh_snapshot_into_the_difference() -> None:
    f = Follower()
    first = Snapshot(seq=5, ns_id=None, mounts=_table((1, "/"), (2, "/a"), (3, "/b")))
    assert f.feed(first, 0.0) == [first]
    ev = event("mount", _table((4, "/c"))[0], seq=6, time=0.0)
    assert f.feed(ev, 0.0) == [ev]
    assert f.feed(Resync(seq=7, reason="since-expired"), 0.0) == [
        Resync(seq=7, reason="since-expired")
    ]
    fresh = Snapshot(seq=9, ns_id=None, mounts=_table((1, "/"), (3, "/b"), (4, "/c"), (5, "/d")))
    out = f.feed(fresh, 1.0)
    got = [(e.action, e.mount.target, e.via, e.seq) for e in out if isinstance(e, Event)]
    assert got == [("umount", "/a", "resync", 9), ("mount", "/d", "resync", 9)]
    assert len(out) == 2


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

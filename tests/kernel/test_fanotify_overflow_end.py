"""issue 11: a namespace freed while the fanotify queue overflows still ends the watch.

A freed namespace is reported as one DETACH per mount; with more mounts than the
queue holds, the rest are lost with the overflow, and only the resync's listing (the
namespace can no longer be listed) can say that the namespace is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from amountd.model import End, Event, Frame, Ready, Resync, decode_json

from ..conftest import PrivateNs

# Doubling rbinds: after `mount --bind D D`, round j (mount --rbind D D/xJ) copies the
# 2^j mounts below D once more, so r rounds leave 2^r mounts in r + 1 syscalls.
_GROW = (
    'mount --bind "$1" "$1"; i=0; while [ $i -lt "$2" ]; do '
    'mkdir -p "$1/x$i"; mount --rbind "$1" "$1/x$i"; i=$((i+1)); done'
)


def _queue_size() -> int:
    try:
        return int(Path("/proc/sys/fs/fanotify/max_queued_events").read_text())
    except (OSError, ValueError):
        return 16384


def _frames(proc: subprocess.Popen[bytes], got: list[Frame], ready: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        frame = decode_json(line)
        got.append(frame)
        if isinstance(frame, Ready):
            ready.set()
    ready.set()  # EOF: whoever waits sees what came


def test_namespace_freed_during_an_overflow_ends(private_ns: PrivateNs) -> None:
    ns = private_ns
    # At least twice the queue: the watcher reads while the kernel tears the namespace
    # down, so a namespace just over the queue's size may not overflow it.
    rounds = _queue_size().bit_length()
    d = ns.path("big")
    ns.mkdir(d)
    ns.run("sh", "-ec", _GROW, "sh", d, str(rounds))
    proc = subprocess.Popen(
        [sys.executable, "-m", "amountd", "watch", "--json", "--ns", str(ns.pid)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    got: list[Frame] = []
    ready = threading.Event()
    reader = threading.Thread(target=_frames, args=(proc, got, ready), daemon=True)
    reader.start()
    try:
        assert ready.wait(120), "no ready frame"
        assert got and isinstance(got[0], Ready), got[:1]
        # Stopped, the watcher reads nothing while the namespace's last process dies.
        os.kill(proc.pid, signal.SIGSTOP)
        ns.close()
        os.kill(proc.pid, signal.SIGCONT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the watch never ended; last frames: {got[-3:]!r}")
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    assert proc.returncode == 0, proc.stderr.read()
    assert isinstance(got[-1], End), got[-3:]
    assert "freed" in got[-1].reason
    assert [f.reason for f in got if isinstance(f, Resync)] == ["overflow"]
    umounts = sum(isinstance(f, Event) and f.action == "umount" for f in got)
    assert umounts >= 1 << rounds

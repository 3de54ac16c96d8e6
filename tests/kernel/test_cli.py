"""The `amountd` command end to end: real processes, real namespaces, real exit codes."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

import pytest

from amountd.model import Event, Ready, Snapshot, decode_json, fspath

from ..conftest import ROOT, PrivateNs, run_cli

_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    return fspath(_OCTAL.sub(lambda m: bytes((int(m.group(1), 8),)), field))


def reference_mountinfo(data: bytes) -> list[dict[str, object]]:
    """An independent reading of proc(5)'s mountinfo, to check ours against."""
    out = []
    for line in data.splitlines():
        f = line.split(b" ")
        sep = f.index(b"-")
        out.append(
            {
                "legacy_id": int(f[0]),
                "legacy_parent_id": int(f[1]),
                "dev": f[2].decode(),
                "root": _unescape(f[3]),
                "target": _unescape(f[4]),
                "options": f[5].decode(),
                "propagation": " ".join(x.decode() for x in f[6:sep]),
                "fstype": f[sep + 1].decode(),
                "source": _unescape(f[sep + 2]),
                "fs_options": _unescape(f[sep + 3]),
            }
        )
    return out


def _expect_one_line_error(res: subprocess.CompletedProcess[bytes], code: int, *words: str) -> str:
    err = res.stderr.decode()
    assert res.returncode == code, (res.returncode, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, err  # argparse adds a "see --help" line
    for w in words:
        assert w in err, err
    return err


def test_help_is_fast_and_names_commands() -> None:
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("list", "watch"):
        assert cmd in res.stdout.decode()
    # --help must not pay for the event loop or the kernel shells.
    probe = (
        "import sys, amountd.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "loaded = [m for m in ('anyio', 'trio', 'asyncio') if m in sys.modules]\n"
        "print(','.join(loaded), file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True)
    assert out.stderr.decode().strip() == ""


def test_bad_usage_exits_2() -> None:
    _expect_one_line_error(run_cli("watch", "--source", "bogus"), 2, "unknown source", "bogus")
    _expect_one_line_error(run_cli("watch", "--count", "zero"), 2, "--count")
    _expect_one_line_error(run_cli("watch", "--count", "-3"), 2, "--count")
    _expect_one_line_error(run_cli("watch", "--timeout", "soon"), 2, "--timeout")
    _expect_one_line_error(run_cli("watch", "--action", "explode"), 2, "explode")
    _expect_one_line_error(run_cli("frobnicate"), 2)


def test_unknown_pid_and_not_a_namespace() -> None:
    pid = 4_000_000  # above pid_max's ceiling: never a live process
    _expect_one_line_error(run_cli("list", "--ns", str(pid)), 1, f"no process with PID {pid}")
    _expect_one_line_error(
        run_cli("watch", "--ns", str(pid), "--timeout", "1"), 1, f"no process with PID {pid}"
    )
    _expect_one_line_error(run_cli("list", "--ns", "/etc/hostname"), 1, "not a namespace file")
    _expect_one_line_error(run_cli("list", "--ns", "/nonexistent/ns"), 1, "does not exist")
    _expect_one_line_error(
        run_cli("list", "--ns", f"/proc/{os.getpid()}/ns/net"), 1, "not a mount namespace"
    )


@pytest.mark.skipif(not ROOT, reason="needs root to drop to another user")
def test_without_the_privilege_a_namespace_needs() -> None:
    res = run_cli("list", "--ns", "1", user=65534)
    _expect_one_line_error(res, 1, "root")
    res = run_cli("watch", "--ns", "1", "--source", "mountinfo", "--timeout", "1", user=65534)
    _expect_one_line_error(res, 1, "root")


@pytest.mark.parametrize("source", ["mountinfo", "auto"])
def test_list_json_equals_mountinfo(private_ns: PrivateNs, source: str) -> None:
    ns = private_ns
    a, b = ns.path("a b"), ns.path("c\xff".encode("latin-1"))
    ns.mkdir(a, b)
    ns.run("mount", "-t", "tmpfs", "-o", "size=1m,noexec", "one", a)
    ns.run("mount", "--bind", "-o", "ro", a, b)
    ns.run("mount", "--make-shared", a)
    res = run_cli("list", "--json", "--ns", str(ns.pid), "--source", source)
    assert res.returncode == 0, res.stderr
    snap = decode_json(res.stdout)
    assert isinstance(snap, Snapshot)
    want = reference_mountinfo(ns.mountinfo())
    assert len(snap.mounts) == len(want) > 3
    got = {m.legacy_id: m for m in snap.mounts}
    for row in want:
        m = got[row["legacy_id"]]
        for field, value in row.items():
            assert getattr(m, field) == value, (field, m, row)


def test_list_human(private_ns: PrivateNs) -> None:
    ns = private_ns
    res = run_cli("list", "--ns", str(ns.pid), "--under", os.fsdecode(ns.base))
    assert res.returncode == 0
    lines = res.stdout.decode().splitlines()
    assert lines[0].split() == ["TARGET", "SOURCE", "FSTYPE", "OPTIONS"]
    assert len(lines) == 2
    assert lines[1].split()[:3] == [os.fsdecode(ns.base), "scratch", "tmpfs"]


def _read_line(proc: subprocess.Popen[bytes], timeout: float = 10) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "amountd printed nothing in time"
    return proc.stdout.readline()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_watch_json_end_to_end(private_ns: PrivateNs, backend: str) -> None:
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amountd",
            "watch",
            "--json",
            "--snapshot",
            "--ns",
            str(ns.pid),
            "--source",
            "mountinfo",
            "--count",
            "2",
            "--backend",
            backend,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # select() must see what readline() has not taken yet
    )
    try:
        snap = decode_json(_read_line(proc))
        assert isinstance(snap, Snapshot)
        assert fspath(ns.base) in {m.target for m in snap.mounts}
        ready = decode_json(_read_line(proc))
        assert isinstance(ready, Ready)
        assert ready.source == "mountinfo"
        # One at a time: the mountinfo source coalesces (a mount gone again before the
        # file is read was never there), and a loaded machine may read it that late.
        ns.run("mount", "-t", "tmpfs", "x", a)
        events = [decode_json(_read_line(proc))]
        ns.run("umount", a)
        events.append(decode_json(_read_line(proc)))
        assert [(e.action, e.seq) for e in events if isinstance(e, Event)] == [
            ("mount", 1),
            ("umount", 2),
        ]
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_watch_human_and_sigterm(private_ns: PrivateNs) -> None:
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    proc = subprocess.Popen(
        [sys.executable, "-m", "amountd", "watch", "--ns", str(ns.pid), "--source", "mountinfo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # select() must see what readline() has not taken yet
    )
    try:
        header = _read_line(proc).decode()
        assert header.split() == ["ACTION", "TARGET", "SOURCE", "FSTYPE", "OPTIONS"]
        # The header is printed once the watch is armed.
        ns.run("mount", "-t", "tmpfs", "x", a)
        line = _read_line(proc).decode().split()
        assert line[:5] == ["mount", os.fsdecode(a), "x", "tmpfs", "rw,relatime"]
        proc.terminate()
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_watch_timeout_and_namespace_end(private_ns: PrivateNs) -> None:
    ns = private_ns
    res = run_cli("watch", "--ns", str(ns.pid), "--source", "mountinfo", "--timeout", "0.3")
    assert res.returncode == 0
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amountd",
            "watch",
            "--json",
            "--ns",
            str(ns.pid),
            "--source",
            "mountinfo",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # select() must see what readline() has not taken yet
    )
    try:
        assert isinstance(decode_json(_read_line(proc)), Ready)
        ns.close()  # the only process in the namespace exits
        end = decode_json(_read_line(proc))
        assert end.__struct_config__.tag == "end"
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_list_from_outside_equals_mountinfo_with_propagate_from(private_ns: PrivateNs) -> None:
    """statmount answers propagate_from=0 when asked from outside the namespace: amountd
    asks from a thread inside it, so `master:N propagate_from:M` comes out as mountinfo's."""
    ns = private_ns
    a, b, c = ns.path("a"), ns.path("b"), ns.path("c")
    ns.mkdir(a, b, c)
    ns.run("mount", "-t", "tmpfs", "pfa", a)
    ns.run("mount", "--make-shared", a)
    ns.run("mount", "--bind", a, b)
    ns.run("mount", "--make-slave", b)
    ns.run("mount", "--make-shared", b)
    inner = subprocess.Popen(
        [
            "nsenter",
            "-t",
            str(ns.pid),
            "-m",
            "--",
            "unshare",
            "-m",
            "--propagation",
            "unchanged",
            "sleep",
            "infinity",
        ]
    )
    try:
        # Not ours (nsenter starts out here) and not P's: the nested namespace.
        outer = {os.readlink("/proc/self/ns/mnt"), os.readlink(f"/proc/{ns.pid}/ns/mnt")}
        for _ in range(500):
            if os.readlink(f"/proc/{inner.pid}/ns/mnt") not in outer:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the nested namespace did not appear")
        for cmd in (["mount", "--bind", b, c], ["mount", "--make-slave", c], ["umount", b]):
            subprocess.run(["nsenter", "-t", str(inner.pid), "-m", "--", *cmd], check=True)
        with open(f"/proc/{inner.pid}/mountinfo", "rb") as f:
            want = reference_mountinfo(f.read())
        assert any("propagate_from:" in str(row["propagation"]) for row in want)
        res = run_cli("list", "--json", "--ns", str(inner.pid), "--source", "fanotify")
        assert res.returncode == 0, res.stderr
        snap = decode_json(res.stdout)
        assert isinstance(snap, Snapshot)
        got = {m.legacy_id: m for m in snap.mounts}
        assert len(got) == len(want)
        for row in want:
            m = got[row["legacy_id"]]
            for field, value in row.items():
                assert getattr(m, field) == value, (field, m, row)
    finally:
        inner.kill()
        inner.wait()

"""Socket activation for real: fds passed to a child the way systemd passes them,
systemd-socket-activate itself, systemd-analyze and groff on what is shipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from importlib import resources
from pathlib import Path

import pytest

# --------------------------------------------------------------------------- real activation

# A service stand-in: takes its sockets with listen_fds(), accepts one connection on
# each, and writes what it saw to that connection as one JSON line.
CHILD = textwrap.dedent(
    """
    import fcntl, json, os, sys
    from amountd.serve.systemd import listen_fds, socket_for

    fds = listen_fds()
    report = {
        "fds": [fd for fd, _ in fds],
        "names": [name for _, name in fds],
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "cloexec": [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd, _ in fds],
    }
    socks = [socket_for(fd) for fd, _ in fds]
    report["addresses"] = [s.getsockname() for s in socks]
    for s in socks:
        s.setblocking(True)
        conn, _ = s.accept()
        with conn:
            conn.sendall(json.dumps(report).encode() + b"\\n")
    """
)

# What systemd does between fork and exec: the sockets become fds 3, 4, ... and
# LISTEN_PID names the process that will exec the service (exec keeps the PID).
LAUNCHER = textwrap.dedent(
    """
    import fcntl, os, sys
    fds = [int(x) for x in sys.argv[1].split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))
    if sys.argv[2]:
        env["LISTEN_FDNAMES"] = sys.argv[2]
    os.execve(sys.executable, [sys.executable, sys.argv[3]], env)
    """
)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _connect_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    return sock


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    return env


def test_passed_fds_unix_and_tcp(tmp_path: Path) -> None:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    path = tmp_path / "amountd.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(path))
    unix.listen()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    port = tcp.getsockname()[1]
    with unix, tcp:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(launcher),
                f"{unix.fileno()},{tcp.fileno()}",
                "amountd.socket:metrics",
                str(child),
            ],
            pass_fds=(unix.fileno(), tcp.fileno()),
            env=_child_env(),
        )
    try:
        with _connect_unix(path) as conn:
            report = json.loads(_read_line(conn))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            assert json.loads(_read_line(conn)) == report
    finally:
        assert proc.wait(timeout=60) == 0
    assert report["fds"] == [3, 4]
    assert report["names"] == ["amountd.socket", "metrics"]
    assert report["env_left"] == []
    assert report["cloexec"] == [True, True]
    assert report["addresses"] == [str(path), ["127.0.0.1", port]]


def test_passed_fds_without_names_are_unknown(tmp_path: Path) -> None:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    path = tmp_path / "amountd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.bind(str(path))
        unix.listen()
        proc = subprocess.Popen(
            [sys.executable, str(launcher), str(unix.fileno()), "", str(child)],
            pass_fds=(unix.fileno(),),
            env=_child_env(),
        )
    try:
        with _connect_unix(path) as conn:
            report = json.loads(_read_line(conn))
    finally:
        assert proc.wait(timeout=60) == 0
    assert report["fds"] == [3]
    assert report["names"] == ["unknown"]


SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed")
def test_systemd_socket_activate(tmp_path: Path) -> None:
    assert SOCKET_ACTIVATE is not None
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    path = tmp_path / "activated.sock"
    # systemd-socket-activate gives the child only the variables named with -E.
    setenv = [f"--setenv={k}" for k in ("PYTHONPATH", "PATH") if k in os.environ]
    proc = subprocess.Popen(
        [
            SOCKET_ACTIVATE,
            f"--listen={path}",
            "--fdname=amountd",
            *setenv,
            sys.executable,
            str(child),
        ],
        env=_child_env(),
        stderr=subprocess.PIPE,
    )
    try:
        # It binds before it waits for a connection; it has no other "ready" signal.
        for _ in range(3000):
            if path.exists() or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert path.exists(), proc.stderr.read() if proc.stderr else ""
        with _connect_unix(path) as conn:
            report = json.loads(_read_line(conn))
    finally:
        rc = proc.wait(timeout=60)
        err = proc.stderr.read() if proc.stderr else b""
        if proc.stderr:
            proc.stderr.close()
    assert rc == 0, err
    assert report["fds"] == [3]
    assert report["names"] == ["amountd"]
    assert report["env_left"] == []
    assert report["addresses"] == [str(path)]


def _data(name: str) -> str:
    return (resources.files("amountd") / "data" / name).read_text()


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    # verify checks that ExecStart's program exists: point it at this amountd.
    amountd = Path(sys.executable).with_name("amountd")
    if not amountd.exists():
        pytest.skip(f"no amountd script beside {sys.executable} to point ExecStart at")
    service = _data("amountd.service").replace("ExecStart=/usr/bin/amountd", f"ExecStart={amountd}")
    assert service != _data("amountd.service")
    (tmp_path / "amountd.service").write_text(service)
    (tmp_path / "amountd.socket").write_text(_data("amountd.socket"))
    proc = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "verify",
            "--man=no",
            str(tmp_path / "amountd.socket"),
            str(tmp_path / "amountd.service"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # Unknown keys and bad values are only warnings: the output must be empty too.
    assert proc.stderr.strip() == "", proc.stderr


GROFF = shutil.which("groff")


@pytest.mark.skipif(GROFF is None, reason="groff is not installed")
def test_man_page_renders_without_warnings() -> None:
    assert GROFF is not None
    proc = subprocess.run(
        [GROFF, "-man", "-Tutf8", "-ww"],
        input=_data("amountd.1"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    text = re.sub(r".\x08", "", proc.stdout)
    for section in ("SYNOPSIS", "FRAMES", "EXIT STATUS", "SIGNALS", "FILES", "ENVIRONMENT"):
        assert section in text
    for command in ("list", "watch", "serve", "subscribe", "status"):
        assert f"amountd {command}" in text

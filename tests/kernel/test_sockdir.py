"""The socket's directory as strict as sshd's StrictModes, the socket made with no path
followed, and clients that check who serves the socket (amountd.sockdir).

The attacks are real: directories owned by uid 65534, a user who tries to replace the
socket, a forged server run as that user. The pure decisions are in tests/unit/.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from amountd.client import ClientError, connect
from amountd.errors import AmountdError
from amountd.sockdir import bind_unix
from amountd.status import query_status

from ..conftest import ROOT, as_user, run_cli

NOBODY = 65534


# --- real directories -----------------------------------------------------------------

needs_root = pytest.mark.skipif(not ROOT, reason="needs root to chown directories to 65534")


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp (sticky): one another uid can reach."""
    d = Path(tempfile.mkdtemp(prefix="amountd-sockdir-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _one_line(err: bytes) -> str:
    text = err.decode()
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@needs_root
@pytest.mark.parametrize("how", ["owned-by-other", "mode-0777", "ancestor-0777", "symlink"])
def test_an_unsafe_directory_is_refused(base: Path, how: str) -> None:
    d = base / "sock"
    d.mkdir()
    if how == "owned-by-other":
        os.chown(d, NOBODY, NOBODY)
    elif how == "mode-0777":
        os.chmod(d, 0o777)
    elif how == "ancestor-0777":
        os.chmod(base, 0o777)
    else:
        os.symlink(d, base / "link")
        os.lchown(base / "link", NOBODY, NOBODY)
        d = base / "link"
    with pytest.raises(AmountdError, match=r"^refusing the socket directory "):
        bind_unix(str(d / "amountd.sock"), 0o600, None)
    assert not (d / "amountd.sock").exists()


@needs_root
def test_serve_refuses_in_one_line(base: Path) -> None:
    d = base / "sock"
    d.mkdir(mode=0o755)
    os.chown(d, NOBODY, NOBODY)
    res = run_cli("serve", "--source", "mountinfo", "--unix", str(d / "s.sock"))
    assert res.returncode == 1
    line = _one_line(res.stderr)
    assert line.startswith(f"amountd: refusing the socket directory {d}: "), line
    assert "owned by uid 65534" in line


@needs_root
def test_sticky_directory_is_accepted_and_its_socket_cannot_be_replaced(base: Path) -> None:
    d = base / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)
    path = d / "amountd.sock"
    sock, ino = bind_unix(str(path), 0o666, None)
    try:
        assert os.lstat(path).st_ino == ino
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o666
        assert not [n for n in os.listdir(d) if n.startswith(".amountd-")]
        # uid 65534 may create in the sticky directory, but not rename over our socket.
        script = (
            "import os, socket, sys\n"
            "d = sys.argv[1]\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(d + '/evil.sock')\n"
            "try:\n"
            "    os.rename(d + '/evil.sock', d + '/amountd.sock')\n"
            "except PermissionError:\n"
            "    print('refused')\n"
        )
        cmd, env = as_user(NOBODY, ["-c", script, str(d)])
        res = subprocess.run(cmd, env=env, cwd="/", capture_output=True, timeout=30, check=False)
        assert res.stdout.strip() == b"refused", res
        assert os.lstat(path).st_ino == ino
    finally:
        sock.close()


def test_mode_and_group_are_set_before_the_socket_appears(tmp_path: Path) -> None:
    path = tmp_path / "run" / "amountd.sock"  # the last level is created
    gid = os.getgid()
    sock, _ = bind_unix(str(path), 0o640, gid)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == gid
        assert os.listdir(path.parent) == ["amountd.sock"]  # the private directory is gone
    finally:
        sock.close()


def test_a_missing_parent_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "s.sock"
    res = run_cli("serve", "--source", "mountinfo", "--unix", str(path))
    assert res.returncode == 1
    line = _one_line(res.stderr)
    assert "its parent" in line and "does not exist" in line, line
    assert not (tmp_path / "no").exists()


@needs_root
def test_a_mode_000_directory_as_another_user_is_one_line(base: Path) -> None:
    d = base / "closed"
    d.mkdir()
    os.chmod(d, 0o000)
    os.chown(d, NOBODY, NOBODY)
    res = run_cli(
        "serve", "--source", "mountinfo", "--unix", str(d / "s.sock"), user=NOBODY, timeout=60
    )
    assert res.returncode == 1, res
    line = _one_line(res.stderr)
    assert str(d) in line and "ermission denied" in line, line


# --- clients check who serves the socket ------------------------------------------------

_FORGER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(8)
print("ready", flush=True)
forged = (b'{"type":"ready","source":"fanotify","ns_id":null}\\n'
          b'{"type":"event","seq":1,"time":0.0,"action":"umount","via":"fanotify",'
          b'"mount":{"target":"/"}}\\n'
          b'{"type":"end","reason":"forged"}\\n')
status = b'{"type":"status","version":"forged"}\\n'
while True:
    c, _ = s.accept()
    try:
        req = c.recv(65536)
        c.sendall(status if b'"status"' in req else forged)
    except OSError:
        pass  # a client that refused us hung up
    c.close()
"""


@pytest.fixture
def forger(base: Path) -> Iterator[Path]:
    """A socket served by uid 65534 that answers every request with a forged `umount /`."""
    if not ROOT:
        pytest.skip("needs root to run a process as uid 65534")
    d = base / "evil"
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    path = d / "amountd.sock"
    cmd, env = as_user(NOBODY, ["-c", _FORGER, str(path)])
    proc = subprocess.Popen(cmd, env=env, cwd="/", stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        yield path
    finally:
        proc.kill()
        proc.wait()


def test_subscribe_and_status_refuse_another_users_server(forger: Path) -> None:
    for cmd in (["subscribe", "--json"], ["status"]):
        res = run_cli(*cmd, "--unix", str(forger))
        assert res.returncode == 1, res
        assert res.stdout == b""  # no forged `umount /`
        line = _one_line(res.stderr)
        assert "runs as uid 65534" in line and "--server-uid 65534" in line, line
    # Trusted when asked: the forged frames come through.
    res = run_cli("subscribe", "--json", "--unix", str(forger), "--server-uid", str(NOBODY))
    assert res.returncode == 0, res
    assert b'"action":"umount"' in res.stdout


@pytest.mark.anyio
async def test_connect_and_query_status_refuse_another_users_server(forger: Path) -> None:
    with pytest.raises(ClientError) as info:
        async with connect(f"unix:{forger}", format="json"):
            pass
    assert info.value.code == "untrusted-server"
    with pytest.raises(ClientError, match="runs as uid 65534"):
        await query_status(f"unix:{forger}")
    async with connect(f"unix:{forger}", format="json", server_uid=NOBODY) as frames:
        got = [f async for f in frames]
    assert [type(f).__name__ for f in got] == ["Ready", "Event", "End"]
    st = await query_status(f"unix:{forger}", server_uid=NOBODY)
    assert st.version == "forged"


def test_status_on_a_file_that_is_not_a_socket() -> None:
    res = run_cli("status", "--unix", "/etc/passwd")
    assert res.returncode == 1
    line = _one_line(res.stderr)
    assert line == "amountd: /etc/passwd is not a socket: give the server's socket with --unix"

"""sd_notify, LISTEN_FDS and the shipped units, in-process: a fake NOTIFY_SOCKET, the
environment systemd sets, the package data. Passed fds to a child and systemd's own
tools are in tests/kernel/."""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from importlib import metadata, resources
from pathlib import Path

import pytest

from amountd.serve import systemd

# --------------------------------------------------------------------------- notify


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def notify_socket(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named by NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        clean_env.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_without_socket_is_a_no_op(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.notify("READY=1") is False
    assert systemd.ready("up") is False
    assert systemd.stopping() is False
    assert systemd.watchdog() is False


def test_ready_sends_ready_and_one_line_status(notify_socket: socket.socket) -> None:
    assert systemd.ready("42 mounts\n3 subscribers") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=42 mounts 3 subscribers"


def test_each_helper_sends_its_assignment(notify_socket: socket.socket) -> None:
    assert systemd.ready()
    assert notify_socket.recv(4096) == b"READY=1"
    assert systemd.status("seq 7, 2 subscribers")
    assert notify_socket.recv(4096) == b"STATUS=seq 7, 2 subscribers"
    assert systemd.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert systemd.stopping("stopping: SIGTERM")
    assert notify_socket.recv(4096) == b"STOPPING=1\nSTATUS=stopping: SIGTERM"
    assert systemd.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_notify_abstract_address(clean_env: pytest.MonkeyPatch) -> None:
    name = f"amountd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"


def test_notify_to_a_missing_socket_warns_and_returns_false(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="amountd.systemd"):
        assert systemd.notify("READY=1") is False
    assert "cannot notify systemd" in caplog.text


def test_notify_unsupported_address_warns(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with caplog.at_level(logging.WARNING, logger="amountd.systemd"):
        assert systemd.notify("READY=1") is False
    assert "vsock:2:1234" in caplog.text


# --------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("500000", None, 0.5),
        ("30000000", "self", 30.0),
        ("30000000", "other", None),
        ("30000000", "garbage", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    clean_env: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        clean_env.setenv("WATCHDOG_PID", pid)
    assert systemd.watchdog_interval() == expected


# --------------------------------------------------------------------------- listen_fds in-process


def test_listen_fds_none_when_unset(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.listen_fds() == []


def test_listen_fds_for_another_pid_are_not_ours_and_env_is_unset(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_env.setenv("LISTEN_FDS", "2")
    clean_env.setenv("LISTEN_FDNAMES", "a:b")
    assert systemd.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


@pytest.mark.parametrize(
    ("pid", "fds", "message"),
    [
        ("12x", "1", "bad LISTEN_PID"),
        ("self", "many", "bad LISTEN_FDS"),
        ("self", "-1", "bad LISTEN_FDS"),
    ],
)
def test_listen_fds_malformed_env_is_an_error(
    clean_env: pytest.MonkeyPatch, pid: str, fds: str, message: str
) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid()) if pid == "self" else pid)
    clean_env.setenv("LISTEN_FDS", fds)
    with pytest.raises(systemd.SystemdError, match=message):
        systemd.listen_fds()
    assert "LISTEN_PID" not in os.environ


def test_listen_fds_zero(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid()))
    clean_env.setenv("LISTEN_FDS", "0")
    assert systemd.listen_fds() == []


def test_listen_fds_can_keep_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid()))
    clean_env.setenv("LISTEN_FDS", "0")
    assert systemd.listen_fds(unset_environment=False) == []
    assert os.environ["LISTEN_FDS"] == "0"


def test_socket_for_refuses_a_socket_that_does_not_listen() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(systemd.SystemdError, match="not a listening stream socket"):
            systemd.socket_for(a.fileno())
        # The fd still belongs to `a`: socket_for let go of it.
        a.sendall(b"x")
        assert b.recv(1) == b"x"


# --------------------------------------------------------------------------- shipped files

DATA_FILES = (
    "amountd.service",
    "amountd.socket",
    "amountd.sysusers",
    "amountd.toml.example",
    "amountd.1",
)


def _data(name: str) -> str:
    return (resources.files("amountd") / "data" / name).read_text()


@pytest.mark.parametrize("name", DATA_FILES)
def test_package_data_is_found_by_importlib_resources(name: str) -> None:
    assert (resources.files("amountd") / "data" / name).is_file()
    assert _data(name).strip()


def test_installed_distribution_lists_the_data_files() -> None:
    # What pip installed (it writes INSTALLER), not a build's amountd.egg-info in the
    # source tree, which is on sys.path too when pytest runs from there.
    installed = [d for d in metadata.distributions(name="amountd") if d.read_text("INSTALLER")]
    if not installed:
        pytest.skip("amountd is not installed by pip (running from a source tree)")
    dist = installed[0]
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        pytest.skip("an editable install lists no package files; CI's `pip install .` does")
    files = {str(f) for f in dist.files or ()}
    missing = [n for n in DATA_FILES if f"amountd/data/{n}" not in files]
    assert not missing, f"not installed: {missing}"


def _unit_settings(text: str) -> dict[str, list[str]]:
    """Every `Key=value` assignment of a unit file (comments and sections aside)."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


# Each of these gives a service a private mount namespace (systemd's
# exec_needs_mount_namespace()), in which amountd would watch the wrong mounts.
MOUNT_NAMESPACE_OPTIONS = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadWritePaths", "ReadOnlyPaths",
    "InaccessiblePaths", "ExecPaths", "NoExecPaths", "BindPaths", "BindReadOnlyPaths",
    "TemporaryFileSystem", "RootDirectory", "RootImage", "MountImages", "ExtensionImages",
    "ExtensionDirectories", "PrivateIPC", "IPCNamespacePath", "LogNamespace", "DynamicUser",
    "PrivateUsers", "PrivateNetwork", "NetworkNamespacePath",
}  # fmt: skip


def test_service_unit_settings() -> None:
    s = _unit_settings(_data("amountd.service"))
    assert s["Type"] == ["notify"]
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] == ["30s"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["RuntimeDirectory"] == ["amountd"]
    assert s["ExecStart"][0].split()[1:] == ["serve"]
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert caps == {"CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_CHOWN"}
    for key in ("MountFlags",):
        assert all(v in ("", "shared") for v in s.get(key, []))
    sandboxing = sorted(set(s) & MOUNT_NAMESPACE_OPTIONS)
    assert not sandboxing, f"these give amountd a private mount namespace: {sandboxing}"


def test_socket_unit_settings() -> None:
    s = _unit_settings(_data("amountd.socket"))
    assert s["ListenStream"] == ["/run/amountd/amountd.sock"]
    assert s["SocketMode"] == ["0660"]
    assert s["Accept"] == ["no"]

"""`amountd serve` as a service: settings file and flags, sd_notify (a fake
NOTIFY_SOCKET that the test reads), socket activation (systemd-socket-activate),
SIGHUP reloads and metrics; against a real server process over a private namespace,
on trio and asyncio. The pure parts are in tests/unit/.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from amountd import connect
from amountd.filter import Filter, filter_mounts
from amountd.model import End, Ready, Resync, Snapshot, fspath
from amountd.table import MountTable, apply, apply_frame

from ..conftest import PrivateNs, next_events, next_frames, run_cli
from ..nsharness import kernel_table

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """`python -m amountd serve --unix DIR/amountd.sock --ns PID ...`, logging to a file;
    `prefix` runs it under another program (systemd-socket-activate)."""

    def __init__(
        self,
        ns: PrivateNs,
        tmp: Path,
        backend: str,
        *extra: str,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        sock: Path | None = None,
    ) -> None:
        self.ns = ns
        self.tmp = tmp
        self.sock = sock if sock is not None else tmp / "amountd.sock"
        self.url = f"unix:{self.sock}"
        self.log = tmp / "serve.log"
        cmd = [*prefix, sys.executable, "-m", "amountd", "serve", "--backend", backend]
        cmd += ["--unix", str(self.sock), "--ns", str(ns.pid), *extra]
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))}
        clean.pop("NOTIFY_SOCKET", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**clean, **(env or {})},
            )

    def wait_for(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not appear in the log:\n{self.text()}")
            time.sleep(0.01)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def daemon_for(
    private_ns: PrivateNs, tmp_path: Path, anyio_backend: str
) -> Iterator[DaemonFactory]:
    made: list[Daemon] = []

    def make(*extra: str, wait: str | None = "serving on ", **kw: object) -> Daemon:
        d = Daemon(private_ns, tmp_path, anyio_backend, *extra, **kw)  # type: ignore[arg-type]
        made.append(d)
        if wait is not None:
            d.wait_for(wait)
        return d

    yield make
    for d in made:
        d.stop()


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; the test reads it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        self.taken = 0

    def wait_for(self, want: Callable[[str], bool], timeout: float = 15) -> str:
        """The first message not taken yet that `want` accepts (earlier ones are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages[self.taken :]:
                self.taken += 1
                if want(m):
                    return m
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.sock], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"no such notification; got {self.messages!r}")
            self.messages.append(self.sock.recv(65536).decode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines())


# --- sd_notify ---------------------------------------------------------------------------


async def test_ready_watchdog_stopping_over_notify_socket(
    daemon_for: DaemonFactory, notify_socket: NotifySocket, private_ns: PrivateNs
) -> None:
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"}
    d = daemon_for("--log-format", "json", wait=None, env=env)
    ready = notify_socket.wait_for(lambda m: "READY=1" in m)
    assert "serving on " in d.text()  # READY=1 only once every listener is open
    status = fields(ready)["STATUS"]
    n = len(kernel_table(private_ns))
    assert status.startswith(f"fanotify: 1 namespace, {n} mounts; 0 subscribers;"), status

    async with connect(d.url) as frames:
        await next_frames(frames, 1)
        for _ in range(2):  # pinged at half of WATCHDOG_USEC, with the counts
            ping = notify_socket.wait_for(lambda m: "WATCHDOG=1" in m)
        assert "1 subscriber;" in fields(ping)["STATUS"]
        assert "seq " in fields(ping)["STATUS"]
        d.proc.send_signal(signal.SIGTERM)
        stopping = notify_socket.wait_for(lambda m: "STOPPING=1" in m)
        assert "SIGTERM" in fields(stopping)["STATUS"]
        [end] = await next_frames(frames, 1)
        assert isinstance(end, End)
    assert d.proc.wait(15) == 0
    assert sum("STOPPING=1" in m for m in notify_socket.messages) == 1
    # --log-format json: one object a line.
    lines = d.text().splitlines()
    assert lines and all(json.loads(line)["logger"].startswith("amountd") for line in lines)


async def test_no_watchdog_without_watchdog_usec(
    daemon_for: DaemonFactory, notify_socket: NotifySocket
) -> None:
    d = daemon_for(wait=None, env={"NOTIFY_SOCKET": str(notify_socket.path)})
    notify_socket.wait_for(lambda m: "READY=1" in m)
    d.proc.send_signal(signal.SIGINT)
    notify_socket.wait_for(lambda m: "STOPPING=1" in m)
    assert d.proc.wait(15) == 0
    assert not any("WATCHDOG=1" in m for m in notify_socket.messages)


# --- socket activation -----------------------------------------------------------------------

ACTIVATE = shutil.which("systemd-socket-activate")


def _listening(port: int) -> bool:
    """A TCP socket of this machine listens on 127.0.0.1:port (/proc/net/tcp, state 0A)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any((cols := line.split())[1] == want and cols[3] == "0A" for line in list(f)[1:])


@pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed")
async def test_socket_activation(
    daemon_for: DaemonFactory, private_ns: PrivateNs, tmp_path: Path
) -> None:
    ns = private_ns
    assert ACTIVATE is not None
    act = tmp_path / "act.sock"
    port = free_port()
    prefix = (ACTIVATE, "-l", str(act), "-l", f"127.0.0.1:{port}")
    d = daemon_for(wait=None, prefix=prefix)
    deadline = time.monotonic() + 20
    # systemd-socket-activate makes both listeners (the Unix one first); amountd starts on
    # demand. Wait for both, or a busy machine can make the TCP connect come too early.
    while not (act.exists() and _listening(port)):
        assert d.proc.poll() is None and time.monotonic() < deadline, d.text()
        time.sleep(0.01)
    mode = act.stat().st_mode
    async with (
        connect(f"unix:{act}", snapshot=True) as unix,
        connect(f"tcp://127.0.0.1:{port}") as tcp,
    ):
        snap, ready = await next_frames(unix, 2, timeout=20)
        assert isinstance(snap, Snapshot) and isinstance(ready, Ready)
        assert MountTable(snap.mounts) == kernel_table(ns)
        await next_frames(tcp, 1, timeout=20)
        a = ns.path("a")
        ns.mkdir(a)
        ns.run("mount", "-t", "tmpfs", "t", a)
        for s in (unix, tcp):
            [ev] = await next_events(s, 1)
            assert (ev.action, ev.mount.target) == ("mount", fspath(a))
    text = d.text()
    assert f"listening on unix:{act} (passed by systemd)" in text
    assert f"listening on tcp://127.0.0.1:{port} (passed by systemd)" in text
    assert not d.sock.exists()  # --unix was not bound: the passed socket replaced it
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert act.exists() and act.stat().st_mode == mode  # neither removed nor chmod-ed


# --- settings and SIGHUP -----------------------------------------------------------------------


def test_unknown_config_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    conf = tmp_path / "amountd.toml"
    conf.write_text('queue = 10\ncolour = "blue"\n')
    res = run_cli("serve", "--config", str(conf), "--unix", str(tmp_path / "s.sock"))
    assert res.returncode == 2
    err = res.stderr.decode().strip()
    assert "\n" not in err
    assert err.startswith(f"amountd: unknown key 'colour' in {conf} (known keys: unix,"), err
    assert not (tmp_path / "s.sock").exists()
    res = run_cli("serve", "--config", str(tmp_path / "missing.toml"))
    assert res.returncode == 2
    assert b"cannot read the config file" in res.stderr


def test_bad_flag_value_is_a_usage_error(tmp_path: Path) -> None:
    res = run_cli("serve", "--metrics", "nowhere:x", "--unix", str(tmp_path / "s.sock"))
    assert res.returncode == 2
    assert res.stderr.decode().startswith("amountd: bad value for --metrics")


async def test_sighup_applies_live_settings_and_keeps_subscribers(
    daemon_for: DaemonFactory, private_ns: PrivateNs, tmp_path: Path
) -> None:
    ns = private_ns
    keep, drop = ns.path("keep"), ns.path("drop")
    ns.mkdir(keep, drop)
    ns.run("mount", "-t", "tmpfs", "k", keep)
    ns.run("mount", "-t", "tmpfs", "d", drop)
    ns.mkdir(keep + b"/x", keep + b"/y", drop + b"/z")
    conf = tmp_path / "amountd.toml"
    conf.write_text('log_level = "info"\n')
    d = daemon_for("--config", str(conf))
    under = Filter(under=fspath(keep))

    async with connect(d.url, snapshot=True) as frames:
        snap, _ = await next_frames(frames, 2)
        table = apply_frame(MountTable(), snap)
        assert table == kernel_table(ns)

        conf.write_text(
            'log_level = "debug"\nqueue = 64\nring = 100\n'
            f'[filter]\nunder = "{os.fsdecode(keep)}"\n'
        )
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("SIGHUP: applied")
        text = d.text()
        assert "SIGHUP: ring changed; that needs a restart" in text
        assert "filter=" in text and "log_level='debug'" in text and "queue=64" in text

        # The same connection goes on: resync, then the view narrows to `under`.
        [resync] = await next_frames(frames, 1)
        assert isinstance(resync, Resync) and resync.reason == "filter-changed"
        outside = [m for m in kernel_table(ns) if not under.matches_mount(m)]
        gone = await next_events(frames, len(outside))
        assert {e.action for e in gone} == {"umount"} and {e.via for e in gone} == {"resync"}
        for ev in gone:
            apply(table, ev)
        ns.run("mount", "-t", "tmpfs", "z", drop + b"/z")  # outside: not seen
        ns.run("mount", "-t", "tmpfs", "x", keep + b"/x")
        [ev] = await next_events(frames, 1)
        assert (ev.action, ev.mount.target) == ("mount", fspath(keep + b"/x"))
        apply(table, ev)
        want = MountTable(filter_mounts(under, kernel_table(ns).mounts()))
        assert table == want

        # A new subscriber's snapshot is the narrowed view too.
        async with connect(d.url, snapshot=True) as late:
            snap2, _ = await next_frames(late, 2)
            assert isinstance(snap2, Snapshot) and MountTable(snap2.mounts) == want

        # log_level debug is live: a status request is logged at debug level.
        assert run_cli("status", "--unix", str(d.sock)).returncode == 0
        d.wait_for("): status")

        # A broken file keeps the running settings, and the server.
        conf.write_text('queue = "lots"\n')
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("SIGHUP: wrong type for 'queue'")
        assert "the running settings are kept" in d.text()
        ns.run("mount", "-t", "tmpfs", "y", keep + b"/y")
        [ev] = await next_events(frames, 1)
        assert ev.mount.target == fspath(keep + b"/y")
    assert d.proc.poll() is None


# --- metrics -------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = r.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def test_metrics_count_real_events(daemon_for: DaemonFactory, private_ns: PrivateNs) -> None:
    ns = private_ns
    port = free_port()
    d = daemon_for("--metrics", f"127.0.0.1:{port}")
    d.wait_for(f"metrics on http://127.0.0.1:{port}/metrics")
    before = scrape(port)
    assert before["amountd_subscribers"] == 0
    assert before["amountd_event_processing_seconds_count"] == 0
    assert before["amountd_up"] == 1
    a, b, c = ns.path("a"), ns.path("b"), ns.path("c")
    ns.mkdir(a, b, c)
    async with connect(d.url) as frames:
        await next_frames(frames, 1)
        for argv in [
            ("mount", "-t", "tmpfs", "a", a),
            ("mount", "-t", "tmpfs", "b", b),
            ("mount", "-t", "tmpfs", "c", c),
            ("mount", "-o", "remount,bind,ro", c),
            ("umount", c),
        ]:
            ns.run(*argv)
            await next_events(frames, 1)  # one at a time (a remount is found by a sweep)
        got = await anyio.to_thread.run_sync(scrape, port)
        assert got["amountd_subscribers"] == 1
    assert got['amountd_events_total{action="mount",source="fanotify"}'] == 3
    assert got['amountd_events_total{action="remount",source="fanotify"}'] == 1
    assert got['amountd_events_total{action="umount",source="fanotify"}'] == 1
    assert got["amountd_event_processing_seconds_count"] == 5
    assert got['amountd_event_processing_seconds_bucket{le="+Inf"}'] == 5
    assert got["amountd_event_processing_seconds_sum"] > 0
    assert got["amountd_queue_drops_total"] == 0
    assert got["amountd_overflows_total"] == 0
    assert not any(k.startswith("amountd_resyncs_total") for k in got)

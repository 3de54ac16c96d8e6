"""`amountd status` against a real server over a private namespace, and without one."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from amountd import connect
from amountd.filter import Filter
from amountd.model import (
    Event,
    NamespaceStatus,
    Status,
    decode_json,
)
from amountd.ns import resolve_ns

from ..conftest import PrivateNs, next_events, next_frames, run_cli
from ..nsharness import kernel_table
from .test_service import Daemon

pytestmark = pytest.mark.anyio


# --- against a real server -----------------------------------------------------------------------


@pytest.fixture
def daemon(private_ns: PrivateNs, tmp_path: Path, anyio_backend: str) -> Iterator[Daemon]:
    # The socket where anyone can reach it (pytest's directories are root's alone).
    public = Path(tempfile.mkdtemp(prefix="amountd-status-", dir="/tmp"))
    public.chmod(0o755)
    token = tmp_path / "token"
    token.write_text("open-sesame-open-sesame\n")
    token.chmod(0o600)
    conf = tmp_path / "amountd.toml"
    conf.write_text('socket_mode = "0666"\n')  # anyone may connect; status is still guarded
    d = Daemon(
        private_ns,
        tmp_path,
        anyio_backend,
        "--config",
        str(conf),
        "--tcp",
        "127.0.0.1:0",
        "--token-file",
        str(token),
        sock=public / "amountd.sock",
    )
    try:
        d.wait_for("serving on ")
        yield d
    finally:
        d.stop()
        shutil.rmtree(public, ignore_errors=True)


def tcp_port(d: Daemon) -> int:
    m = re.search(r"listening on tcp://127\.0\.0\.1:(\d+)", d.text())
    assert m, d.text()
    return int(m.group(1))


async def status_cli(*args: str, user: int | None = None) -> tuple[int, str, str]:
    res = await anyio.to_thread.run_sync(lambda: run_cli("status", *args, user=user))
    return res.returncode, res.stdout.decode(), res.stderr.decode()


async def test_status_of_a_real_server(daemon: Daemon, private_ns: PrivateNs) -> None:
    ns = private_ns
    a, b = ns.path("a"), ns.path("b")
    ns.mkdir(a, b)
    async with (
        connect(daemon.url, format="json", snapshot=True, filter=Filter(fstypes=["tmpfs"])) as js,
        connect(daemon.url, format="msgpack") as mp,
    ):
        await next_frames(js, 2)
        await next_frames(mp, 1)
        events: list[Event] = []
        for target in (a, b):
            ns.run("mount", "-t", "tmpfs", "t", target)
            events += await next_events(mp, 1)
        await next_events(js, 2)

        rc, out, err = await status_cli("--json", "--unix", str(daemon.sock))
        assert rc == 0, err
        st = decode_json(out.encode())
        assert isinstance(st, Status)
        assert st.pid == daemon.proc.pid
        assert st.source == "fanotify" and st.reason is None
        assert st.version and st.uptime > 0
        ns_id = resolve_ns(ns.pid).ns_id
        assert st.namespaces == [NamespaceStatus(ns_id=ns_id, mounts=len(kernel_table(ns)))]
        assert st.seq == events[-1].seq
        assert (st.events, st.resyncs, st.overflows, st.drops) == (2, 0, 0, 0)
        assert st.listeners[0] == f"unix:{daemon.sock}"
        assert st.listeners[1] == f"tcp://127.0.0.1:{tcp_port(daemon)}"
        assert st.subscribers == 2
        me = f"unix pid={os.getpid()} uid=0 gid=0"
        # The two subscriptions race to the server, so their IDs come in either order.
        assert sorted(s.id for s in st.subscriber) == [s.id for s in st.subscriber]
        subs = sorted(st.subscriber, key=lambda s: s.format)
        assert [(s.peer, s.format, s.filter, s.queued, s.lag, s.drops) for s in subs] == [
            (me, "json", "types tmpfs", 0, 0, 0),
            (me, "msgpack", "", 0, 0, 0),
        ]
        # json: snapshot, ready, 2 events; msgpack: ready, 2 events.
        assert [s.delivered for s in subs] == [4, 3]

        rc, out, err = await status_cli("--unix", str(daemon.sock))
        assert rc == 0, err
        assert out.startswith(f"amountd {st.version}, pid {daemon.proc.pid}, up ")
        assert "source:      fanotify\n" in out
        assert f"  {ns_id}  " in out
        assert "events:      2 published; 0 resyncs (0 overflows); 0 queue drops\n" in out
        assert "subscribers: 2\n" in out and "types tmpfs" in out

        # Over TCP with the token; without it, refused.
        port = tcp_port(daemon)
        token = str(daemon.tmp / "token")
        rc, out, err = await status_cli(
            "--json", "--tcp", f"127.0.0.1:{port}", "--token-file", token
        )
        assert rc == 0, err
        assert decode_json(out.encode()) == Status(**{**_fields(st), "uptime": _uptime(out)})
        rc, out, err = await status_cli("--tcp", f"127.0.0.1:{port}")
        assert rc == 1 and "requires a token" in err and not out

    assert daemon.proc.poll() is None  # a status request leaves the server alone


def _fields(st: Status) -> dict[str, object]:
    return {f: getattr(st, f) for f in st.__struct_fields__}


def _uptime(out: str) -> float:
    st = decode_json(out.encode())
    assert isinstance(st, Status)
    return st.uptime


async def test_status_is_for_root_and_the_socket_group(daemon: Daemon) -> None:
    rc, out, err = await status_cli("--unix", str(daemon.sock), user=65534)
    assert rc == 1 and not out
    assert err.strip() == (
        f"amountd: unix:{daemon.sock} refused: the server's status is for root, members of "
        "the socket's group, and clients that send the token"
    )


async def test_status_without_a_server(tmp_path: Path) -> None:
    rc, out, err = await status_cli("--unix", str(tmp_path / "nobody.sock"))
    assert rc == 1 and not out
    assert err.count("\n") == 1
    assert err.startswith("amountd: is `amountd serve` running? no socket at ")
    rc, out, err = await status_cli("--json", "--tcp", "127.0.0.1:1")
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith("amountd: cannot connect to tcp://127.0.0.1:1")

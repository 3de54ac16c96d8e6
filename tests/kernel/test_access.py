"""Who may see which namespaces: the pure decisions, and a server whose clients are not
root (a child that drops to uid 65534 before it connects: SO_PEERCRED records the
credentials of connect() time)."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amountd.access import (
    Peer,
    ProcNs,
    own_namespaces,
    process_namespaces,
    scope_filter,
    scope_request,
    sees_all,
    tcp_owner,
    unix_peer,
)
from amountd.filter import Filter
from amountd.model import Error, Event, Ready, Snapshot, decode_json
from amountd.ns import own_ns_id
from amountd.protocol import ProtocolError, SubscribeRequest, encode_request

from ..conftest import MakeNs, PrivateNs
from ..multihelp import Serve
from ..nsharness import kernel_table, ns_id_of

NOBODY = 65534

# --- pure ------------------------------------------------------------------------------


def test_root_and_the_socket_group_see_all() -> None:
    assert sees_all(Peer(uid=0, gid=0), None)
    assert sees_all(Peer(uid=1000, gid=50), 50)
    assert sees_all(Peer(uid=1000, gid=1000, groups=(7, 50)), 50)
    assert not sees_all(Peer(uid=1000, gid=1000, groups=(7,)), 50)
    assert not sees_all(Peer(uid=1000, gid=0), None)


def test_a_uid_sees_the_namespaces_of_its_processes() -> None:
    procs = [ProcNs(1, 0, 10), ProcNs(2, 1000, 11), ProcNs(3, 1000, 12), ProcNs(4, 1001, 13)]
    assert own_namespaces(1000, procs) == {11, 12}
    assert own_namespaces(1002, procs) == frozenset()


def test_scope_filter() -> None:
    f = Filter(fstypes=["tmpfs"])
    assert scope_filter(f, None, {}) is f  # sees all, asks for nothing in particular
    assert scope_filter(f, frozenset({11, 12}), {}) == Filter(
        fstypes=["tmpfs"], namespaces=[11, 12]
    )
    assert scope_filter(f, frozenset(), {}) == Filter(fstypes=["tmpfs"], namespaces=[])
    asked = Filter(namespaces=[12], pids=[40])
    assert scope_filter(asked, frozenset({11, 12}), {40: 11}) == Filter(namespaces=[11, 12])
    assert scope_filter(Filter(pids=[40]), None, {40: 13}) == Filter(namespaces=[13])
    with pytest.raises(ProtocolError) as info:
        scope_filter(Filter(namespaces=[13]), frozenset({11}), {}, who="uid 1000")
    assert info.value.code == "forbidden" and "13" in info.value.message
    assert "uid 1000" in info.value.message
    with pytest.raises(ProtocolError) as info:
        scope_filter(Filter(pids=[41]), frozenset({11}), {40: 11})
    assert info.value.code == "bad-request" and "41" in info.value.message


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 11 1
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 12 1
   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 13 1
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:9C40 00000000000000000000000001000000:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 14 1
"""  # noqa: E501


def test_tcp_owner_finds_the_peer_socket_not_ours() -> None:
    if sys.byteorder != "little":
        pytest.skip("the sample is a little-endian machine's /proc/net/tcp")
    assert tcp_owner(PROC_NET_TCP, ("127.0.0.1", 0xD431), ("127.0.0.1", 8080)) == 1000
    assert tcp_owner(PROC_NET_TCP, ("127.0.0.1", 0xD432), ("127.0.0.1", 8080)) is None
    # A v4 peer as a dual-stack listener sees it: ::ffff:127.0.0.1
    assert tcp_owner(PROC_NET_TCP, ("::ffff:127.0.0.1", 0xD431), ("::ffff:127.0.0.1", 8080)) == (
        1000
    )
    assert tcp_owner(PROC_NET_TCP6, ("::1", 40000), ("::1", 8080)) == 1001


def test_unix_peer_and_scope_request_for_ourselves() -> None:
    a, b = socket.socketpair()
    with a, b:
        peer = unix_peer(a)
        assert (peer.uid, peer.gid, peer.pid) == (os.getuid(), os.getgid(), os.getpid())
        req = SubscribeRequest(filter=Filter(pids=[os.getpid()]))
        scoped = scope_request(req, a, token=False, socket_gid=None)
        if os.getuid() == 0:
            assert scoped.filter == Filter(namespaces=[own_ns_id()])
        else:
            assert own_ns_id() in (scoped.filter.namespaces or [])
    mine = process_namespaces(os.getuid())
    assert any(p.pid == os.getpid() and p.ns_id == own_ns_id() for p in mine)


# --- a server, and clients that are not root ------------------------------------------------

CLIENT = r"""
import os, socket, sys
where, line = sys.argv[1], sys.argv[2]
want, uid, gid = (int(x) for x in sys.argv[3:6])
"localhost".encode("idna")  # loads the codec connect() uses: nothing is importable later
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)  # before connecting: SO_PEERCRED is taken at connect()
assert (os.getuid(), os.geteuid()) == (uid, uid)
if where.startswith("tcp:"):
    s = socket.create_connection(("127.0.0.1", int(where[4:])), timeout=30)
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(where)
s.sendall(line.encode() + b"\n")
out, buf, events, ready = sys.stdout.buffer, b"", 0, False
while not (ready and events >= want):  # `want` events after `ready`, or the end
    data = s.recv(65536)
    if not data:
        break
    buf += data
    while b"\n" in buf:
        frame, buf = buf.split(b"\n", 1)
        out.write(frame + b"\n")
        out.flush()
        events += b'"type":"event"' in frame
        ready = ready or b'"type":"ready"' in frame or b'"type":"error"' in frame
"""


class Client:
    """A subscriber process that becomes `uid`/`gid` and then connects (the venv's
    python lives under /root, which uid 65534 cannot enter: it starts as root,
    imports what it needs, and drops its ids before it touches the socket)."""

    def __init__(
        self, where: str, flt: Filter | None = None, *, events: int = 1, uid: int = NOBODY
    ) -> None:
        line = encode_request(
            SubscribeRequest(format="json", snapshot=True, filter=flt or Filter())
        ).decode()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, where, line.strip(), str(events), str(uid), str(uid)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,  # unbuffered: a line read leaves the next one for select() to see
        )

    def frame(self, timeout: float = 15) -> object:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the client printed nothing in time"
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else "closed"
        return decode_json(line)

    def rest(self, timeout: float = 30) -> list[object]:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err.decode()
        return [decode_json(line) for line in out.splitlines()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def two_ns(make_ns: MakeNs) -> tuple[PrivateNs, PrivateNs]:
    if shutil.which("setpriv") is None:
        pytest.skip("needs util-linux setpriv to run a client as another uid")
    a, b = make_ns(2)
    return a, b


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A socket directory others may enter (pytest's tmp_path is under a 0700 dir)."""
    d = Path(tempfile.mkdtemp(prefix="amountd-access-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _hold(ns: PrivateNs, uid: int) -> subprocess.Popen[bytes]:
    """A process of `uid` inside `ns` (nsenter and setpriv exec: the PID stays)."""
    proc = subprocess.Popen(
        [
            *("nsenter", "-t", str(ns.pid), "-m", "--"),
            *("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"),
            *("sleep", "infinity"),
        ]
    )
    want = os.readlink(f"/proc/{ns.pid}/ns/mnt")
    deadline = time.monotonic() + 10
    while True:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                uid_line = next(line for line in f if line.startswith("Uid:"))
            if int(uid_line.split()[1]) == uid and os.readlink(f"/proc/{proc.pid}/ns/mnt") == want:
                return proc
        except (OSError, StopIteration):
            pass
        assert time.monotonic() < deadline, "the holder process did not start"
        time.sleep(0.01)


def test_a_client_that_is_not_root_sees_only_its_processes_namespaces(
    two_ns: tuple[PrivateNs, PrivateNs], open_dir: Path, anyio_backend: str
) -> None:
    a, b = two_ns
    ida, idb = ns_id_of(a.pid), ns_id_of(b.pid)
    for ns in (a, b):
        ns.mkdir(ns.path("m"))
    holder = _hold(b, NOBODY)  # uid 65534 has a process in B, none in A
    srv = Serve(
        open_dir / "amountd.sock",
        anyio_backend,
        *("--ns", str(a.pid), "--ns", str(b.pid), "--tcp", "127.0.0.1:0"),
    ).start()
    clients: list[Client] = []
    try:
        os.chmod(srv.sock, 0o666)  # anyone may connect; what each sees is the question
        port = next(
            int(w.rsplit(":", 1)[1]) for w in srv.text().split() if w.startswith("tcp://127.0.0.1:")
        )
        unix = Client(str(srv.sock))
        tcp = Client(f"tcp:{port}")  # loopback, no token: its owner found in /proc/net/tcp
        by_pid = Client(str(srv.sock), Filter(pids=[holder.pid]))
        root = Client(str(srv.sock), events=2, uid=0)
        clients += [unix, tcp, by_pid, root]
        for c in (unix, tcp, by_pid):
            snap, ready = c.frame(), c.frame()
            assert isinstance(snap, Snapshot) and isinstance(ready, Ready)
            assert {m.ns_id for m in snap.mounts} == {idb}
            assert len(snap.mounts) == len(kernel_table(b.pid))
        snap, _ = root.frame(), root.frame()
        assert isinstance(snap, Snapshot) and {m.ns_id for m in snap.mounts} == {ida, idb}
        # A first, then B: a client that could see A would get A's mount first.
        a.run("mount", "-t", "tmpfs", "in-a", a.path("m"))
        b.run("mount", "-t", "tmpfs", "in-b", b.path("m"))
        for c in (unix, tcp, by_pid):
            [ev] = c.rest()
            assert isinstance(ev, Event) and ev.mount.ns_id == idb
        got = root.rest()
        assert [e.mount.ns_id for e in got if isinstance(e, Event)] == [ida, idb]

        # Asking for what it may not see is refused, with a reason it can act on.
        for flt in (Filter(namespaces=[ida]), Filter(pids=[a.pid])):
            denied = Client(str(srv.sock), flt)
            clients.append(denied)
            [err] = denied.rest()
            assert isinstance(err, Error) and err.code == "forbidden", err
            assert str(ida) in err.message and "own processes" in err.message
        log = srv.text()
        assert f"uid={NOBODY}" in log and f"namespaces {idb}" in log
        assert srv.running()
    finally:
        for c in clients:
            c.kill()
        holder.kill()
        holder.wait()
        srv.stop()


def test_the_socket_group_and_a_token_see_everything(
    two_ns: tuple[PrivateNs, PrivateNs], open_dir: Path, anyio_backend: str
) -> None:
    a, b = two_ns
    ida, idb = ns_id_of(a.pid), ns_id_of(b.pid)
    token = open_dir / "token"
    token.write_text("s3cret-s3cret-s3cret\n")
    token.chmod(0o600)
    group = 1  # "daemon" on Debian; any group will do
    srv = Serve(
        open_dir / "amountd.sock",
        anyio_backend,
        *("--ns", str(a.pid), "--ns", str(b.pid), "--socket-group", str(group)),
        *("--tcp", "127.0.0.1:0", "--token-file", str(token)),
    ).start()
    try:
        port = next(
            int(w.rsplit(":", 1)[1]) for w in srv.text().split() if w.startswith("tcp://127.0.0.1:")
        )
        # uid 65534 in the socket's group (gid 1: the socket is 0660, root:1).
        script_args = [str(srv.sock), '{"type":"subscribe","version":1,"snapshot":true}', "0"]
        proc = subprocess.run(
            [sys.executable, "-c", CLIENT, *script_args, str(NOBODY), str(group)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        frames = [decode_json(x) for x in proc.stdout.splitlines()]
        assert proc.returncode == 0, proc.stderr.decode()
        snap = frames[0]
        assert isinstance(snap, Snapshot) and {m.ns_id for m in snap.mounts} == {ida, idb}
        req = {"type": "subscribe", "version": 1, "snapshot": True, "token": "s3cret-s3cret-s3cret"}
        line = json.dumps(req)
        proc = subprocess.run(
            [sys.executable, "-c", CLIENT, f"tcp:{port}", line, "0", str(NOBODY), str(NOBODY)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        snap = decode_json(proc.stdout.splitlines()[0])
        assert isinstance(snap, Snapshot) and {m.ns_id for m in snap.mounts} == {ida, idb}
    finally:
        srv.stop()

"""`amountd status`: the `status` request on the wire, the `status` frame, its text
form, and the command against a real server over a private namespace."""

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
    Container,
    Event,
    NamespaceStatus,
    Status,
    SubscriberStatus,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
)
from amountd.ns import resolve_ns
from amountd.protocol import (
    FrameReader,
    ProtocolError,
    RequestReader,
    StatusRequest,
    SubscribeRequest,
    encode_frame,
    encode_request,
    parse_request,
)
from amountd.status import duration, format_status

from .conftest import PrivateNs, next_events, next_frames, run_cli
from .nsharness import kernel_table
from .test_service import Daemon

pytestmark = pytest.mark.anyio


# --- the request ---------------------------------------------------------------------------


def test_status_request_parses_beside_subscribe() -> None:
    assert parse_request(b'{"type":"status","version":1}\n') == StatusRequest()
    assert parse_request(b'{"type":"subscribe","version":1}') == SubscribeRequest()
    req = parse_request(b'{"type":"status","version":1,"format":"msgpack","token":"t"}')
    assert req == StatusRequest(format="msgpack", token="t")
    assert parse_request(encode_request(StatusRequest(token="x"))) == StatusRequest(token="x")
    reader = RequestReader()
    assert reader.feed(b'{"type":"sta') is None
    assert reader.feed(b'tus","version":1}\n') == StatusRequest()


@pytest.mark.parametrize(
    ("line", "code", "needle"),
    [
        (b'{"type":"status"}', "bad-request", "missing field 'version'"),
        (b'{"type":"status","version":2}', "unsupported-version", "version 2"),
        (
            b'{"type":"status","version":1,"snapshot":true}',
            "bad-request",
            "unknown field 'snapshot' in the request (known fields: type, version, format, token)",
        ),
        (b'{"type":"status","version":1,"format":"xml"}', "bad-request", "'format' must be"),
        (b'{"type":"stats","version":1}', "bad-request", 'accepts "subscribe" and "status"'),
    ],
)
def test_bad_status_requests(line: bytes, code: str, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == code
    assert needle in info.value.message


# --- the frame -------------------------------------------------------------------------------

SAMPLE = Status(
    version="0.1.0",
    pid=4242,
    uptime=3725.5,
    source="fanotify",
    listeners=["unix:/run/amountd/amountd.sock", "tcp://127.0.0.1:7333"],
    namespaces=[NamespaceStatus(ns_id=4026531841, mounts=34)],
    seq=1746771234567890,
    events=12,
    resyncs=1,
    overflows=1,
    subscribers=2,
    subscriber=[
        SubscriberStatus(
            id=1, peer="unix pid=77 uid=0 gid=0", format="msgpack", queued=0, lag=0, delivered=14
        ),
        SubscriberStatus(
            id=2,
            peer="tcp 127.0.0.1:50210",
            format="json",
            filter="types tmpfs, under /mnt",
            queued=3,
            lag=3,
            drops=1,
            delivered=9,
        ),
    ],
)


def test_status_frame_round_trips_in_both_formats() -> None:
    assert decode_json(encode_json(SAMPLE)) == SAMPLE
    assert decode_msgpack(encode_msgpack(SAMPLE)) == SAMPLE
    for fmt in ("json", "msgpack"):
        assert FrameReader(fmt).feed(encode_frame(fmt, SAMPLE)) == [SAMPLE]  # type: ignore[arg-type]


def test_every_status_field_has_a_default() -> None:
    # An older or newer server's frame still decodes: absent fields take defaults,
    # unknown ones are ignored.
    assert decode_json(b'{"type":"status"}') == Status()
    assert decode_json(b'{"type":"status","pid":5,"brand_new":[1]}') == Status(pid=5)


def test_format_status() -> None:
    assert format_status(SAMPLE) == "\n".join(
        [
            "amountd 0.1.0, pid 4242, up 1h 02m 05s",
            "source:      fanotify",
            "listening:   unix:/run/amountd/amountd.sock, tcp://127.0.0.1:7333",
            "namespaces:  1",
            "  NS_ID       MOUNTS  CONTAINER",
            "  4026531841      34  -",
            "seq:         1746771234567890",
            "events:      12 published; 1 resync (1 overflow); 0 queue drops",
            "subscribers: 2",
            "  ID  PEER                     FORMAT   QUEUED  LAG  DROPS  DELIVERED  FILTER",
            "   1  unix pid=77 uid=0 gid=0  msgpack       0    0      0         14  -",
            "   2  tcp 127.0.0.1:50210      json          3    3      1          9  "
            "types tmpfs, under /mnt",
        ]
    )
    bare = format_status(Status())
    assert "subscribers: 0" in bare and "namespaces:  0" in bare
    docker = Container(runtime="docker", id="3f" * 32)
    boxed = Status(namespaces=[NamespaceStatus(ns_id=9, mounts=3, container=docker)])
    assert "  9           3  docker:3f3f3f3f3f3f" in format_status(boxed)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.04, "0.0s"), (4.25, "4.2s"), (125, "2m 05s"), (3725, "1h 02m 05s"), (90061, "1d 01h 01m")],
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


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

"""`amountd status`: the `status` request on the wire, the `status` frame and its text
form (the command against a real server is in tests/kernel/)."""

from __future__ import annotations

import pytest

from amountd.model import (
    Container,
    NamespaceStatus,
    Status,
    SubscriberStatus,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
)
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

"""The wire protocol, without sockets: requests, framing, partial reads, garbage."""

from __future__ import annotations

import itertools
import json
import struct

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amountd.filter import Filter
from amountd.model import (
    End,
    Error,
    Event,
    Frame,
    Mount,
    Ready,
    Resync,
    Snapshot,
    encode_msgpack,
    fspath,
)
from amountd.protocol import (
    MAX_REQUEST,
    Format,
    FrameReader,
    ProtocolError,
    RequestReader,
    SubscribeRequest,
    check_token,
    encode_frame,
    encode_request,
    error_frame,
    frame_json,
    frame_msgpack,
    parse_request,
)

# --- requests ------------------------------------------------------------------------


def _err(line: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    return info.value


def test_minimal_request_gets_defaults() -> None:
    req = parse_request(b'{"type":"subscribe","version":1}\n')
    assert req == SubscribeRequest()
    assert req.format == "json"
    assert req.snapshot is False
    assert req.since is None
    assert req.token is None


def test_full_request_as_in_design() -> None:
    line = (
        b'{"type":"subscribe","version":1,"format":"msgpack","snapshot":true,"since":42,'
        b'"filter":{"actions":["mount","umount"],"fstypes":["tmpfs"],"under":"/mnt"}}\r\n'
    )
    req = parse_request(line)
    assert req.format == "msgpack"
    assert req.snapshot is True
    assert req.since == 42
    assert req.filter.actions == ["mount", "umount"]
    assert req.filter.fstypes == ["tmpfs"]
    assert req.filter.under == "/mnt"


@pytest.mark.parametrize(
    "req",
    [
        SubscribeRequest(),
        SubscribeRequest(format="msgpack", snapshot=True, since=0, token="s3cret"),
        SubscribeRequest(filter=Filter(under=fspath(b"/mnt/caf\xe9 \\x41 dir"))),
        SubscribeRequest(filter=Filter(actions=["move"], fstypes=["fuse.sshfs", "tmpfs"])),
    ],
)
def test_request_round_trip(req: SubscribeRequest) -> None:
    line = encode_request(req)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert parse_request(line) == req


def test_non_utf8_under_survives_exactly() -> None:
    raw = b"/mnt/\xff\xfe/x"
    req = parse_request(encode_request(SubscribeRequest(filter=Filter(under=fspath(raw)))))
    assert req.filter.under is not None
    assert req.filter.under.encode("utf-8", "surrogateescape") == raw


def test_unknown_field_is_named() -> None:
    e = _err(b'{"type":"subscribe","version":1,"x":1}')
    assert e.code == "bad-request"
    assert "unknown field 'x'" in e.message
    assert "since" in e.message  # lists the known ones


def test_unknown_filter_field_is_named() -> None:
    e = _err(b'{"type":"subscribe","version":1,"filter":{"fstype":["tmpfs"]}}')
    assert e.code == "bad-request"
    assert "unknown field 'fstype'" in e.message
    assert "filter" in e.message


def test_unsupported_version() -> None:
    e = _err(b'{"type":"subscribe","version":2,"brand_new_field":true}')
    assert e.code == "unsupported-version"
    assert e.message == "version 2 is not supported; this server speaks 1"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"", "empty"),
        (b"   \r\n", "empty"),
        (b"hello", "not valid JSON"),
        (b"[1,2]", "one JSON object"),
        (b'"subscribe"', "one JSON object"),
        (b'{"version":1}', "missing field 'type'"),
        (b'{"type":"watch","version":1}', 'unknown request type "watch"'),
        (b'{"type":"subscribe"}', "missing field 'version'"),
        (b'{"type":"subscribe","version":"1"}', "must be an integer"),
        (b'{"type":"subscribe","version":true}', "must be an integer"),
        (b'{"type":"subscribe","version":1,"format":"xml"}', "'format' must be"),
        (b'{"type":"subscribe","version":1,"since":-1}', "since"),
        (b'{"type":"subscribe","version":1,"since":"3"}', "since"),
        (b'{"type":"subscribe","version":1,"snapshot":1}', "snapshot"),
        (b'{"type":"subscribe","version":1,"filter":{"actions":["mkdir"]}}', "actions"),
        (b'{"type":"subscribe","version":1} {"type":"subscribe","version":1}', "JSON"),
        (b"[[[", "JSON"),
        (b"[" * 60000, "nested"),
    ],
)
def test_bad_requests(line: bytes, needle: str) -> None:
    e = _err(line)
    assert e.code == "bad-request"
    assert needle in e.message


def test_too_large() -> None:
    ok = b'{"type":"subscribe","version":1}'
    line = ok[:-1] + b" " * (MAX_REQUEST - len(ok)) + b"}"
    assert len(line) == MAX_REQUEST
    assert parse_request(line + b"\n") == SubscribeRequest()
    e = _err(ok[:-1] + b" " * (MAX_REQUEST + 1 - len(ok)) + b"}")
    assert e.code == "too-large"


def test_error_frame() -> None:
    assert error_frame(ProtocolError("too-large", "big")) == Error(code="too-large", message="big")
    internal = error_frame(ValueError("secret detail"))
    assert internal.code == "internal"
    assert "secret" not in internal.message


def test_check_token() -> None:
    check_token(SubscribeRequest(), None)
    check_token(SubscribeRequest(token="abc"), "abc")
    for token in (None, "abd", "", "\udcff"):
        with pytest.raises(ProtocolError) as info:
            check_token(SubscribeRequest(token=token), "abc")
        assert info.value.code == "forbidden"


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        req = parse_request(data)
    except ProtocolError as e:
        assert e.code in {"bad-request", "too-large", "unsupported-version"}
        assert e.message
    else:
        assert isinstance(req, SubscribeRequest)


_VALID = encode_request(
    SubscribeRequest(
        format="msgpack",
        snapshot=True,
        since=7,
        filter=Filter(actions=["mount"], fstypes=["tmpfs"], under=fspath(b"/a")),
        token="t",
    )
)


@settings(max_examples=1000)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["replace", "insert", "delete"]),
            st.integers(min_value=0, max_value=len(_VALID)),
            st.binary(min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_mutated_valid_request(edits: list[tuple[str, int, bytes]]) -> None:
    data = bytearray(_VALID)
    for op, where, blob in edits:
        pos = min(where, len(data))
        if op == "replace":
            data[pos : pos + len(blob)] = blob
        elif op == "insert":
            data[pos:pos] = blob
        else:
            del data[pos : pos + len(blob)]
    try:
        parse_request(bytes(data))
    except ProtocolError as e:
        assert e.message


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
_keys = st.sampled_from(
    ["type", "version", "format", "snapshot", "since", "filter", "token", "actions", "under", "x"]
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _json_values | st.dictionaries(_keys, _json_values), max_size=7))
def test_fuzz_structured(obj: dict[str, object]) -> None:
    obj.setdefault("type", "subscribe")
    obj.setdefault("version", 1)
    try:
        parse_request(json.dumps(obj).encode())
    except ProtocolError as e:
        assert e.message


# --- RequestReader -------------------------------------------------------------------


def test_reader_byte_by_byte() -> None:
    line = encode_request(SubscribeRequest(format="msgpack", since=3))
    reader = RequestReader()
    results = [reader.feed(line[i : i + 1]) for i in range(len(line))]
    assert results[:-1] == [None] * (len(line) - 1)
    assert results[-1] == SubscribeRequest(format="msgpack", since=3)


def test_reader_keeps_rest_and_stops() -> None:
    reader = RequestReader()
    req = reader.feed(b'{"type":"subscribe","version":1}\nextra')
    assert req == SubscribeRequest()
    assert reader.rest == b"extra"
    assert reader.feed(b"more\n") is None


def test_reader_too_large_as_soon_as_limit_passes() -> None:
    reader = RequestReader()
    assert reader.feed(b" " * MAX_REQUEST) is None
    with pytest.raises(ProtocolError) as info:
        reader.feed(b" ")
    assert info.value.code == "too-large"


def test_reader_too_large_in_one_feed() -> None:
    with pytest.raises(ProtocolError) as info:
        RequestReader().feed(b"x" * (MAX_REQUEST + 10) + b"\n")
    assert info.value.code == "too-large"


def test_reader_bad_line() -> None:
    with pytest.raises(ProtocolError) as info:
        RequestReader().feed(b"nonsense\n")
    assert info.value.code == "bad-request"


def test_reader_eof_without_newline() -> None:
    reader = RequestReader()
    assert reader.feed(b'{"type":"subscribe","version":1}') is None
    assert reader.feed_eof() == SubscribeRequest()
    assert RequestReader().feed_eof() is None


# --- frames ----------------------------------------------------------------------------

_M = Mount(
    id=2**32 + 5,
    legacy_id=30,
    parent_id=2**32 + 1,
    legacy_parent_id=1,
    ns_id=2**32 + 9,
    target=fspath(b"/mnt/a b\n\xff\\x41"),
    root=fspath(b"/"),
    source=fspath(b"tmpfs"),
    fstype="tmpfs",
    options="rw,relatime",
    fs_options=fspath(b"rw,size=1024k"),
    propagation="shared:5",
    dev="0:55",
)
FRAMES: list[Frame] = [
    Snapshot(seq=0, ns_id=None, mounts=[]),
    Snapshot(seq=3, ns_id=7, mounts=[_M, Mount(id=9)]),
    Ready(source="fanotify", ns_id=7, reason=None),
    Ready(source="mountinfo", ns_id=None, reason="fanotify needs Linux 6.15"),
    Event(seq=4, time=1.5, action="mount", via="fanotify", mount=_M, pid=12, comm="mount"),
    Event(seq=5, time=2.0, action="move", via="mountinfo", mount=_M, old=Mount(id=9)),
    Resync(seq=6, reason="overflow"),
    End(reason="namespace gone"),
    Error(code="bad-request", message="unknown field 'x'"),
]


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_frames_round_trip_whole(fmt: Format) -> None:
    data = b"".join(encode_frame(fmt, f) for f in FRAMES)
    assert FrameReader(fmt).feed(data) == FRAMES


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_frames_byte_by_byte(fmt: Format) -> None:
    data = b"".join(encode_frame(fmt, f) for f in FRAMES)
    reader = FrameReader(fmt)
    out: list[Frame] = []
    for i in range(len(data)):
        out += reader.feed(data[i : i + 1])
        assert reader.buffered < len(data)
    assert out == FRAMES
    assert reader.buffered == 0
    reader.feed_eof()


@settings(max_examples=200)
@given(st.sampled_from(["json", "msgpack"]), st.lists(st.integers(0, 400), max_size=30))
def test_frames_any_split(fmt: Format, cuts: list[int]) -> None:
    data = b"".join(encode_frame(fmt, f) for f in FRAMES)
    points = sorted({min(c * 7, len(data)) for c in cuts} | {0, len(data)})
    reader = FrameReader(fmt)
    out: list[Frame] = []
    for a, b in itertools.pairwise(points):
        out += reader.feed(data[a:b])
    assert out == FRAMES


def test_paths_exact_in_both_formats() -> None:
    ev = FRAMES[4]
    formats: list[Format] = ["json", "msgpack"]
    for fmt in formats:
        (back,) = FrameReader(fmt).feed(encode_frame(fmt, ev))
        assert isinstance(back, Event)
        assert back.mount.target is not None
        assert back.mount.target.encode("utf-8", "surrogateescape") == b"/mnt/a b\n\xff\\x41"


def test_framing_shapes() -> None:
    end = End(reason="x")
    j = frame_json(end)
    assert j.endswith(b"\n")
    assert b"\n" not in j[:-1]
    assert json.loads(j) == {"type": "end", "reason": "x"}
    m = frame_msgpack(end)
    (n,) = struct.unpack(">I", m[:4])
    assert n == len(m) - 4
    assert msgspec.msgpack.decode(m[4:]) == {"type": "end", "reason": "x"}
    with pytest.raises(ValueError, match="format"):
        encode_frame("xml", end)  # type: ignore[arg-type]


def test_json_blank_lines_are_ignored() -> None:
    assert FrameReader("json").feed(b"\n\r\n" + frame_json(End(reason="x"))) == [End(reason="x")]


def test_unknown_frame_type_is_skipped() -> None:
    future = msgspec.msgpack.encode({"type": "heartbeat", "t": 1})
    data = struct.pack(">I", len(future)) + future + frame_msgpack(End(reason="x"))
    assert FrameReader("msgpack").feed(data) == [End(reason="x")]
    assert FrameReader("json").feed(b'{"type":"heartbeat"}\n') == []


def test_new_fields_are_tolerated() -> None:
    line = b'{"type":"end","reason":"x","added_later":1}\n'
    assert FrameReader("json").feed(line) == [End(reason="x")]


@pytest.mark.parametrize(
    "data",
    [b"garbage\n", b'{"type":"event"}\n', b"[1]\n", b'{"type":"end"}\n', b"\xff\xfe\n"],
)
def test_json_garbage(data: bytes) -> None:
    reader = FrameReader("json")
    with pytest.raises(ProtocolError) as info:
        reader.feed(data)
    assert info.value.code == "bad-frame"
    with pytest.raises(ProtocolError):  # a broken stream stays broken
        reader.feed(frame_json(End(reason="x")))


def test_msgpack_garbage() -> None:
    body = b"\xc1\xc1"
    with pytest.raises(ProtocolError) as info:
        FrameReader("msgpack").feed(struct.pack(">I", 2) + body)
    assert info.value.code == "bad-frame"
    bad = encode_msgpack(Mount(id=1))  # a map, but no frame
    with pytest.raises(ProtocolError):
        FrameReader("msgpack").feed(struct.pack(">I", len(bad)) + bad)


def test_msgpack_size_limit() -> None:
    reader = FrameReader("msgpack", max_frame=1000)
    with pytest.raises(ProtocolError) as info:
        reader.feed(struct.pack(">I", 1001))
    assert info.value.code == "too-large"
    with pytest.raises(ProtocolError) as info:  # JSON text read as msgpack
        FrameReader("msgpack").feed(b'{"type":"end","reason":"x"}\n')
    assert info.value.code == "too-large"
    assert "JSON" in info.value.message


def test_json_size_limit() -> None:
    reader = FrameReader("json", max_frame=100)
    assert reader.feed(b"x" * 100) == []
    with pytest.raises(ProtocolError) as info:
        reader.feed(b"x")
    assert info.value.code == "too-large"


def test_eof_inside_a_frame() -> None:
    data = frame_msgpack(End(reason="x"))
    reader = FrameReader("msgpack")
    assert reader.feed(data[:-1]) == []
    with pytest.raises(ProtocolError):
        reader.feed_eof()
    reader = FrameReader("json")
    reader.feed(b'{"type":"end"')
    with pytest.raises(ProtocolError):
        reader.feed_eof()


@settings(max_examples=300)
@given(st.sampled_from(["json", "msgpack"]), st.lists(st.binary(max_size=64), max_size=8))
def test_frame_reader_fuzz(fmt: Format, chunks: list[bytes]) -> None:
    reader = FrameReader(fmt, max_frame=4096)
    try:
        for chunk in chunks:
            for frame in reader.feed(chunk):
                assert isinstance(frame, Snapshot | Ready | Event | Resync | End | Error)
        reader.feed_eof()
    except ProtocolError as e:
        assert e.code in {"bad-frame", "too-large"}

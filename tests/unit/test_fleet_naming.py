"""Pure parts of amountd.fleet: names, keys, payloads, and the publisher's mirror."""

from __future__ import annotations

import msgspec
import pytest

from amountd.fleet.consumer import FleetFrame, fleet_json
from amountd.fleet.mirror import KvOp, Mirror
from amountd.fleet.naming import (
    MOUNTS_BUCKET,
    NAMESPACES_BUCKET,
    decode_mount,
    default_host_id,
    frame_payload,
    host_subject,
    kv_subject,
    mount_key,
    msg_id,
    namespace_key,
    parse_key,
    sanitize_host_id,
    subject,
)
from amountd.model import End, Event, Mount, Ready, Resync, Snapshot, encode_json

from ..factories import mount


def _m(mid: int, target: str, ns: int | None = 7, options: str = "rw") -> Mount:
    return mount(mid, target, None, full=False, legacy_id=mid % 1000, ns_id=ns, options=options)


def test_host_ids_keep_only_safe_characters() -> None:
    assert sanitize_host_id("web-1.example.com") == "web-1examplecom"
    assert sanitize_host_id("a_b*c>d e") == "a_bcde"
    with pytest.raises(ValueError, match="no character"):
        sanitize_host_id(". *>")


def test_default_host_id_is_the_machine_id_else_the_host_name() -> None:
    assert default_host_id("0123456789ABCDEF0123456789abcdef\n", "h") == "0123456789ab"
    assert default_host_id("not hex", "node.example") == "nodeexample"
    assert default_host_id(None, "n1") == "n1"
    assert default_host_id("", "") == "localhost"
    got = default_host_id()  # this machine's
    assert got and sanitize_host_id(got) == got


def test_subjects_keys_and_ids() -> None:
    assert subject("h", 42, "mount") == "amountd.h.42.mount"
    assert subject("h", None, "end") == "amountd.h.0.end"
    assert host_subject("h") == "amountd.h.>"
    assert host_subject("web-*") == "amountd.>"  # a glob is matched by the consumer
    assert host_subject("*") == "amountd.>"
    assert msg_id("h", 100, 101) == "h.100.101"
    assert msg_id("h", 100, 101, "end0.7") == "h.100.101.end0.7"
    assert mount_key("h", 7, _m(9, "/a")) == "h.7.9"
    assert mount_key("h", 7, Mount(legacy_id=31)) == "h.7.L31"
    assert namespace_key("h", None) == "h.0"
    assert parse_key("h.7.9") == ("h", 7, "9")
    assert parse_key("h.0.9") == ("h", None, "9")
    assert kv_subject(MOUNTS_BUCKET, "h.7.9") == "$KV.amountd_mounts.h.7.9"


def test_payload_is_the_json_frame_with_host() -> None:
    ev = Event(seq=5, time=1.5, action="mount", via="fanotify", mount=_m(9, "/a\udcff"))
    out = frame_payload(ev, "web1")
    d = msgspec.json.decode(out)
    assert d["host"] == "web1"
    assert {k: v for k, v in d.items() if k != "host"} == msgspec.json.decode(encode_json(ev))
    assert d["mount"]["target"] == "/a\\xff"  # exact bytes, as --json writes them
    assert fleet_json(FleetFrame("web1", ev)) == out
    assert decode_mount(encode_json(ev.mount)) == ev.mount


def test_mirror_follows_events_and_ends() -> None:
    m = Mirror("h")
    m.ready(Ready(source="fanotify", ns_id=7))
    m.snapshot(Snapshot(seq=1, ns_id=7, mounts=[_m(1, "/"), _m(2, "/a")]))
    assert set(m.tables[7]) == {"h.7.1", "h.7.2"}
    ns, op = m.event(Event(seq=2, time=0, action="mount", via="fanotify", mount=_m(3, "/b")))
    assert (ns, op.op, op.key) == (7, "put", "h.7.3")
    assert decode_mount(op.value) == _m(3, "/b")
    ns, op = m.event(Event(seq=3, time=0, action="umount", via="fanotify", mount=_m(2, "/a")))
    assert (op.op, op.key) == ("del", "h.7.2")
    # A mount the kernel could not describe has no ns_id: the server's is used.
    ns, op = m.event(
        Event(seq=4, time=0, action="mount", via="fanotify", mount=_m(4, "/c", ns=None))
    )
    assert (ns, op.key) == (7, "h.7.4")
    rec = msgspec.json.decode(m.record(7).value)
    assert rec["host"] == "h" and rec["ns_id"] == 7 and rec["mounts"] == 3
    assert rec["source"] == "fanotify"
    ops = m.end(7)
    assert {o.key for o in ops if o.bucket == MOUNTS_BUCKET} == {"h.7.1", "h.7.3", "h.7.4"}
    assert all(o.op == "purge" for o in ops)
    assert KvOp("purge", NAMESPACES_BUCKET, "h.7") in ops
    assert m.namespaces == []
    assert isinstance(End(reason="x", ns_id=7), End)


def test_mirror_diff_writes_only_the_difference() -> None:
    m = Mirror("h")
    m.snapshot(Snapshot(seq=1, ns_id=None, mounts=[_m(1, "/", ns=7), _m(2, "/a", ns=8)]))
    same = encode_json(_m(1, "/", ns=7))
    remote = {"h.7.1": same, "h.7.5": b"{}", "h.8.2": b"stale"}
    ops = m.diff(remote, ["h.7", "h.9"])
    mounts = {(o.op, o.key) for o in ops if o.bucket == MOUNTS_BUCKET}
    assert mounts == {("put", "h.8.2"), ("del", "h.7.5")}
    spaces = {(o.op, o.key) for o in ops if o.bucket == NAMESPACES_BUCKET}
    assert spaces == {("put", "h.7"), ("put", "h.8"), ("del", "h.9")}
    assert isinstance(Resync(seq=1, reason="lagged"), Resync)


def test_status_shows_the_publisher() -> None:
    from amountd.model import PublisherStatus, Status
    from amountd.status import format_status

    assert "publisher" not in format_status(Status())
    st = Status(
        publisher=PublisherStatus(
            state="down",
            host="web1",
            urls=["nats://n:4222"],
            backlog=3,
            published=10,
            reconciles=2,
            errors=1,
            last_error="no acknowledgement within 5 s",
        )
    )
    line = format_status(st).splitlines()[-1]
    assert line.startswith("publisher:   down as host web1 to nats://n:4222")
    assert "backlog 3" in line and "2 reconciles" in line and "1 error " in line
    assert "no acknowledgement" in line

"""Pure: the names amountd uses in NATS JetStream, and the bytes it puts there.

Everything a host writes is addressed by its host ID, so many hosts share one stream
and two buckets without colliding, and one host's part can be read (or reconciled)
with one subject filter:

- stream `AMOUNTD`, subject `amountd.<host>.<ns_id>.<action|resync|end>`, payload the
  frame's JSON (what `--json` prints) with a `host` field, header
  `Nats-Msg-Id: <host>.<server start>.<seq>` (JetStream drops a re-sent copy);
- bucket `amountd_mounts`, key `<host>.<ns_id>.<mount id>`, value the Mount's JSON;
- bucket `amountd_namespaces`, key `<host>.<ns_id>`, value a NamespaceRecord.

No I/O here: unit-tested without a NATS server.
"""

from __future__ import annotations

import re
import socket

import msgspec

from ..model import Event, Frame, Mount, Snapshot, decode_json, encode_json

__all__ = [
    "MOUNTS_BUCKET",
    "NAMESPACES_BUCKET",
    "STREAM",
    "SUBJECTS",
    "NamespaceRecord",
    "decode_mount",
    "default_host_id",
    "event_ns",
    "frame_payload",
    "host_subject",
    "kv_subject",
    "mount_key",
    "msg_id",
    "namespace_key",
    "ns_token",
    "parse_key",
    "sanitize_host_id",
    "subject",
    "with_host",
]

STREAM = "AMOUNTD"
SUBJECTS = "amountd.>"
MOUNTS_BUCKET = "amountd_mounts"
NAMESPACES_BUCKET = "amountd_namespaces"

_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_-]")
_HEX = re.compile(r"[0-9a-fA-F]{12}")


class NamespaceRecord(msgspec.Struct, kw_only=True):
    """The value under `<host>.<ns_id>` in `amountd_namespaces`."""

    host: str
    ns_id: int | None
    mounts: int
    source: str
    started: float
    """When this server started watching the namespace (Unix time)."""


def sanitize_host_id(name: str) -> str:
    """Only [A-Za-z0-9_-]: a host ID is one token of a subject and of a KV key (a dot
    or a wildcard would split or widen it). Raises ValueError if nothing is left."""
    out = _NOT_ALLOWED.sub("", name)
    if not out:
        raise ValueError(f"host ID {name!r} has no character from [A-Za-z0-9_-]")
    return out


def default_host_id(machine_id: str | None = None, hostname: str | None = None) -> str:
    """The machine ID's first 12 hex digits, else the host name (sanitised).

    With no arguments, /etc/machine-id and socket.gethostname() are read; the pure part
    takes them as arguments.
    """
    if machine_id is None and hostname is None:
        try:
            with open("/etc/machine-id", encoding="ascii") as f:
                machine_id = f.read()
        except (OSError, UnicodeDecodeError):
            machine_id = None
        hostname = socket.gethostname()
    if machine_id is not None:
        m = _HEX.match(machine_id.strip())
        if m:
            return m.group(0).lower()
    return sanitize_host_id(hostname or "localhost")


def ns_token(ns_id: int | None) -> str:
    """A namespace ID as one token; 0 stands for "the kernel did not say"."""
    return str(ns_id) if ns_id is not None else "0"


def subject(host: str, ns_id: int | None, kind: str) -> str:
    """`amountd.<host>.<ns_id>.<kind>`: kind is an event's action, or resync / end."""
    return f"amountd.{host}.{ns_token(ns_id)}.{kind}"


def host_subject(host_glob: str) -> str:
    """The stream subject filter for a `--host` glob: exact for a plain name, else every
    host (the glob is then matched client-side: NATS wildcards are whole tokens)."""
    if host_glob and not _NOT_ALLOWED.search(host_glob):
        return f"amountd.{host_glob}.>"
    return SUBJECTS


def msg_id(host: str, started: int, seq: int, suffix: str = "") -> str:
    """`<host>.<server start>.<seq>` (plus `.<suffix>` for frames without a seq of their
    own: `end`, a reconcile's `resync`)."""
    base = f"{host}.{started}.{seq}"
    return f"{base}.{suffix}" if suffix else base


def mount_key(host: str, ns_id: int | None, mount: Mount) -> str:
    """`<host>.<ns_id>.<mount id>`; a mount without a unique ID (some mountinfo
    readings) is filed under `L<32-bit id>`."""
    mid = str(mount.id) if mount.id is not None else f"L{mount.legacy_id}"
    return f"{host}.{ns_token(ns_id)}.{mid}"


def namespace_key(host: str, ns_id: int | None) -> str:
    return f"{host}.{ns_token(ns_id)}"


def parse_key(key: str) -> tuple[str, int | None, str]:
    """(host, ns_id, mount id) of an `amountd_mounts` key. Raises ValueError."""
    host, ns, mid = key.split(".")
    return host, (int(ns) or None), mid


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV write goes to (how nats-py's KeyValue.put addresses it)."""
    return f"$KV.{bucket}.{key}"


def frame_payload(frame: Frame, host: str) -> bytes:
    """The frame's JSON as `--json` prints it (no newline), with `"host"` added last."""
    return with_host(encode_json(frame), host)


def with_host(body: bytes, host: str) -> bytes:
    """A frame's JSON object (no newline) with `"host"` added last (host IDs are
    sanitised to [A-Za-z0-9_-]: nothing to escape)."""
    return body[:-1] + b',"host":"' + host.encode("ascii") + b'"}'


def decode_mount(value: bytes) -> Mount:
    """A `amountd_mounts` value back as a Mount, paths exact (the frames' \\xNN rule)."""
    frame = decode_json(b'{"type":"snapshot","seq":0,"ns_id":null,"mounts":[' + value + b"]}")
    if not isinstance(frame, Snapshot) or len(frame.mounts) != 1:
        raise ValueError("not one mount")
    return frame.mounts[0]


def event_ns(ev: Event, default: int | None) -> int | None:
    """The namespace an event belongs to: its mount's, else the server's."""
    ns = ev.mount.ns_id
    return ns if ns is not None else default

"""The records and frames that cross every boundary (docs/protocol.md, "Records" and "Frames").

Paths are exact. In Python a path is a `FsPath`: a `str` holding the kernel's bytes
decoded as UTF-8 with surrogateescape (the convention of `os.listdir`), so every byte
survives. msgpack carries it as `bin` (the raw bytes); JSON carries it as text in which
a byte that is not valid UTF-8, and the backslash itself, are written `\\xNN`, so the
JSON form is readable and still reversible.

Records and frames are frozen values: one handed on is never changed under its holder.
Whoever needs another value builds one (`msgspec.structs.replace`); the broker's
`publish` is the one place a frame gets its `seq`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from .container import Container

__all__ = [
    "ACTIONS",
    "Action",
    "Container",
    "End",
    "Error",
    "Event",
    "Frame",
    "FsPath",
    "Mount",
    "NamespaceStatus",
    "PublisherStatus",
    "Ready",
    "Resync",
    "Snapshot",
    "Status",
    "SubscriberStatus",
    "Via",
    "decode_json",
    "decode_msgpack",
    "encode_json",
    "encode_msgpack",
    "fspath",
    "fspath_bytes",
]


class FsPath(str):
    """A path from the kernel: `str` with surrogateescape, encoded exactly on the wire."""

    __slots__ = ()


def fspath(raw: bytes | str) -> FsPath:
    """The one way kernel bytes become a path value."""
    if isinstance(raw, bytes):
        return FsPath(raw.decode("utf-8", "surrogateescape"))
    return raw if type(raw) is FsPath else FsPath(raw)


def fspath_bytes(path: str) -> bytes:
    """The kernel's bytes behind a path value."""
    return path.encode("utf-8", "surrogateescape")


_JSON_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def _path_to_json(path: str) -> str:
    if "\\" in path:
        path = path.replace("\\", "\\x5c")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return str(path)  # a plain str: an FsPath would come back to this hook forever


def _path_from_json(text: str) -> FsPath:
    if "\\x" not in text:
        return FsPath(text)
    raw = _JSON_ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), text.encode("utf-8"))
    return fspath(raw)


Action = Literal["mount", "umount", "move", "remount", "propagation"]
Via = Literal["fanotify", "mountinfo", "resync"]
ACTIONS: tuple[str, ...] = ("mount", "umount", "move", "remount", "propagation")


class Mount(msgspec.Struct, kw_only=True, frozen=True):
    """One mount: a line of mountinfo, or one statmount answer.

    A field the source cannot know (or the kernel no longer gives, for a mount that is
    gone) is None. `dev` (mountinfo's third field, statmount's sb_dev_major/minor) is
    an addition to the original design: it tells a reused 32-bit ID from the same mount.
    """

    id: int | None = None
    legacy_id: int | None = None
    parent_id: int | None = None
    legacy_parent_id: int | None = None
    ns_id: int | None = None
    target: FsPath | None = None
    root: FsPath | None = None
    source: FsPath | None = None
    fstype: str | None = None
    options: str | None = None
    fs_options: FsPath | None = None
    propagation: str | None = None
    dev: str | None = None

    @property
    def key(self) -> int:
        """The ID a table files this mount under: the unique ID, else the 32-bit one."""
        k = self.id if self.id is not None else self.legacy_id
        if k is None:
            raise ValueError("a mount needs an id or a legacy_id")
        return k


class Snapshot(msgspec.Struct, kw_only=True, frozen=True, tag="snapshot", tag_field="type"):
    seq: int
    ns_id: int | None
    mounts: list[Mount]
    container: Container | None = None
    """What runs in namespace `ns_id` (from a process's cgroup), where known."""


class Ready(msgspec.Struct, kw_only=True, frozen=True, tag="ready", tag_field="type"):
    source: str
    ns_id: int | None
    reason: str | None = None
    container: Container | None = None


class Event(msgspec.Struct, kw_only=True, frozen=True, tag="event", tag_field="type"):
    seq: int
    time: float
    action: Action
    via: Via
    mount: Mount
    old: Mount | None = None
    pid: int | None = None
    comm: str | None = None


class Resync(
    msgspec.Struct, kw_only=True, frozen=True, tag="resync", tag_field="type", omit_defaults=True
):
    seq: int
    reason: str
    ns_id: int | None = None
    """The one namespace this concerns, from a server watching several (else None)."""
    container: Container | None = None


class End(
    msgspec.Struct, kw_only=True, frozen=True, tag="end", tag_field="type", omit_defaults=True
):
    reason: str
    ns_id: int | None = None
    """Set when one namespace of several ended (the stream goes on); None: the stream ends."""
    container: Container | None = None


class Error(msgspec.Struct, kw_only=True, frozen=True, tag="error", tag_field="type"):
    code: str
    message: str


class NamespaceStatus(msgspec.Struct, kw_only=True, frozen=True):
    """One watched namespace in a `status` frame."""

    ns_id: int | None = None
    mounts: int = 0
    container: Container | None = None


class SubscriberStatus(msgspec.Struct, kw_only=True, frozen=True):
    """One subscriber in a `status` frame: who, what it asked for, how far behind."""

    id: int = 0
    peer: str = ""
    format: str = ""
    filter: str = ""
    queued: int = 0
    lag: int = 0
    drops: int = 0
    delivered: int = 0


class PublisherStatus(msgspec.Struct, kw_only=True, frozen=True):
    """The NATS publisher in a `status` frame (`serve --publish`; amountd.fleet)."""

    state: str = ""
    """connecting, live, down, reconciling or stopped."""
    host: str = ""
    urls: list[str] = []
    backlog: int = 0
    """Frames waiting: queued for it in the server plus sent and not yet acknowledged."""
    published: int = 0
    reconciles: int = 0
    errors: int = 0
    last_error: str | None = None


class Status(msgspec.Struct, kw_only=True, frozen=True, tag="status", tag_field="type"):
    """A running server's state: its one answer to a `status` request (`amountd status`).
    Every field has a default, so a field added later still decodes in an older client."""

    version: str = ""
    pid: int = 0
    uptime: float = 0.0
    source: str = ""
    reason: str | None = None
    listeners: list[str] = []
    namespaces: list[NamespaceStatus] = []
    seq: int = 0
    events: int = 0
    resyncs: int = 0
    overflows: int = 0
    drops: int = 0
    subscribers: int = 0
    subscriber: list[SubscriberStatus] = []
    connections: int = 0
    """Connections open now (subscribers, status requests, those being refused)."""
    max_connections: int = 0
    max_connections_per_uid: int = 0
    connections_by_uid: dict[str, int] = {}
    """Open connections per uid (a remote peer: its address; `None`: not known)."""
    refused_too_many: int = 0
    stalled: int = 0
    snapshot_cache_bytes: int = 0
    snapshot_cache_limit: int = 0
    publisher: PublisherStatus | None = None


Frame = Snapshot | Ready | Event | Resync | End | Error | Status


def _json_enc_hook(obj: Any) -> Any:
    if isinstance(obj, FsPath):
        return _path_to_json(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _msgpack_enc_hook(obj: Any) -> Any:
    if isinstance(obj, FsPath):
        return obj.encode("utf-8", "surrogateescape")
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is FsPath:
        if isinstance(obj, bytes):
            return fspath(obj)
        if isinstance(obj, str):
            return _path_from_json(obj)
    raise NotImplementedError(f"cannot decode {tp!r}")


_json_encoder = msgspec.json.Encoder(enc_hook=_json_enc_hook)
_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=_msgpack_enc_hook)
# The decoders are built on first use, not at import: building one walks every frame
# type (tens of milliseconds), which `amountd --help` and a server that only encodes
# need not pay, and which an import interrupted by a signal must not be in the middle of.
_json_decoder: msgspec.json.Decoder[Frame] | None = None
_msgpack_decoder: msgspec.msgpack.Decoder[Frame] | None = None


def _build_json_decoder() -> msgspec.json.Decoder[Frame]:
    global _json_decoder
    _json_decoder = msgspec.json.Decoder(Frame, dec_hook=_dec_hook)
    return _json_decoder


def _build_msgpack_decoder() -> msgspec.msgpack.Decoder[Frame]:
    global _msgpack_decoder
    _msgpack_decoder = msgspec.msgpack.Decoder(Frame, dec_hook=_dec_hook)
    return _msgpack_decoder


def encode_json(obj: Frame | Mount) -> bytes:
    """One frame as compact JSON (no newline)."""
    return _json_encoder.encode(obj)


def encode_msgpack(obj: Frame | Mount) -> bytes:
    return _msgpack_encoder.encode(obj)


def decode_json(data: bytes | str) -> Frame:
    """Raises msgspec.DecodeError / ValidationError for anything that is not a frame."""
    dec = _json_decoder if _json_decoder is not None else _build_json_decoder()
    return dec.decode(data)


def decode_msgpack(data: bytes) -> Frame:
    dec = _msgpack_decoder if _msgpack_decoder is not None else _build_msgpack_decoder()
    return dec.decode(data)

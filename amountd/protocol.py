"""The wire protocol, sans-IO (docs/protocol.md, "The wire protocol").

Plain functions and accumulators over bytes, so the server and the client are thin
shells and every edge (partial reads, garbage, oversize lines) is tested without sockets.

The client speaks first: one JSON line, at most `MAX_REQUEST` bytes. The server answers
in the chosen format: JSON lines, or msgpack frames each behind a 4-byte big-endian length.
"""

from __future__ import annotations

import functools
import hmac
import re
import struct
from typing import Annotated, Any, Literal

import msgspec

from .errors import AmountdError
from .filter import Filter
from .model import (
    Error,
    Frame,
    _dec_hook,
    _json_enc_hook,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
)

__all__ = [
    "FRAME_TYPES",
    "MAX_FRAME",
    "MAX_REQUEST",
    "PROTOCOL_VERSION",
    "Format",
    "FrameReader",
    "ProtocolError",
    "Request",
    "RequestReader",
    "StatusRequest",
    "SubscribeRequest",
    "check_token",
    "encode_frame",
    "encode_request",
    "error_frame",
    "frame_json",
    "frame_msgpack",
    "parse_request",
]

PROTOCOL_VERSION = 1
MAX_REQUEST = 65536
"""The longest request line, newline excluded."""
MAX_FRAME = 256 * 1024 * 1024
"""The largest frame a `FrameReader` accepts: a snapshot of ~1M mounts fits."""

Format = Literal["json", "msgpack"]
FRAME_TYPES = frozenset({"snapshot", "ready", "event", "resync", "end", "error", "status"})

_LEN = struct.Struct(">I")


class ProtocolError(AmountdError):
    """Bad input on the wire; `code` goes into the `error` frame the peer receives."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r})"


class SubscribeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a client asks for. `type` and `version` must be on the wire; the defaults
    here only make building a request in Python short."""

    type: Literal["subscribe"] = "subscribe"
    version: int = PROTOCOL_VERSION
    format: Format = "json"
    snapshot: bool = False
    since: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    filter: Filter = msgspec.field(default_factory=Filter)
    token: str | None = None


class StatusRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`amountd status`: the server answers with one `status` frame and closes."""

    type: Literal["status"] = "status"
    version: int = PROTOCOL_VERSION
    format: Format = "json"
    token: str | None = None


Request = SubscribeRequest | StatusRequest
"""What a client may send first (told apart by `type`)."""

_request_encoder = msgspec.json.Encoder(enc_hook=_json_enc_hook)


@functools.cache
def _request_decoder() -> msgspec.json.Decoder[SubscribeRequest]:
    """Built on first use (like model's frame decoders): an import stays cheap."""
    return msgspec.json.Decoder(SubscribeRequest, dec_hook=_dec_hook)


@functools.cache
def _status_decoder() -> msgspec.json.Decoder[StatusRequest]:
    return msgspec.json.Decoder(StatusRequest)


def error_frame(exc: BaseException) -> Error:
    """The frame to send before closing; anything but a ProtocolError is ours, not theirs."""
    if isinstance(exc, ProtocolError):
        return Error(code=exc.code, message=exc.message)
    return Error(code="internal", message="internal server error")


def encode_request(req: Request) -> bytes:
    """A request as the one JSON line a client sends."""
    return _request_encoder.encode(req) + b"\n"


def check_token(req: Request, expected: str | None) -> None:
    """Raise "forbidden" unless the request carries the listener's token (if it has one)."""
    if expected is None:
        return
    given = req.token
    if given is None:
        raise ProtocolError("forbidden", 'this listener requires a token: add "token":"..."')
    if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode()):
        raise ProtocolError("forbidden", "wrong token")


# --- request parsing ---------------------------------------------------------------

_MSG_UNKNOWN = re.compile(r"Object contains unknown field `(.*)`")
_MSG_MISSING = re.compile(r"Object missing required field `(.*)`")
_MSG_AT = re.compile(r"^(.*) - at `\$(.*)`$", re.DOTALL)


def _where(path: str) -> str:
    return path.lstrip(".") or "the request"


def _known(path: str, kind: type[Request] = SubscribeRequest) -> str:
    if path.lstrip(".") == "filter" and kind is SubscribeRequest:
        names = Filter.__struct_fields__
    elif path == "":
        names = kind.__struct_fields__
    else:
        return ""
    return " (known fields: " + ", ".join(names) + ")"


def _explain(err: msgspec.ValidationError, kind: type[Request] = SubscribeRequest) -> str:
    """msgspec's message, reworded so a person at `socat` knows what to change."""
    text = str(err)
    m = _MSG_AT.match(text)
    msg, path = (m.group(1), m.group(2)) if m else (text, "")
    where = _where(path)
    if u := _MSG_UNKNOWN.match(msg):
        return f"unknown field {u.group(1)!r} in {where}{_known(path, kind)}"
    if u := _MSG_MISSING.match(msg):
        return f"missing field {u.group(1)!r} in {where}"
    if path == ".format":
        return '\'format\' must be "json" or "msgpack"'
    if path == ".filter" and msg.startswith("bad filter "):
        return msg  # filter.check_filter's words already name the field
    msg = msg.replace("`", "")
    return f"bad value for {where!r}: {msg}" if path else f"bad request: {msg}"


def parse_request(line: bytes) -> Request:
    """The client's first line -> a request (subscribe, or status). Raises
    ProtocolError, and only that, for any input whatsoever."""
    try:
        return _parse_request(line)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("bad-request", "the request is nested too deeply") from None
    except Exception as exc:  # the contract: nothing but ProtocolError escapes
        raise ProtocolError("bad-request", f"bad request: {exc}") from None


def _parse_request(line: bytes) -> Request:
    line = bytes(line)
    if line.endswith(b"\n"):
        line = line[:-1]
    if len(line) > MAX_REQUEST:
        raise ProtocolError(
            "too-large", f"the request line is {len(line)} bytes; the limit is {MAX_REQUEST}"
        )
    if not line.strip():
        raise ProtocolError("bad-request", "empty request: send one JSON object on one line")
    try:
        raw: Any = msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        raise ProtocolError("bad-request", f"the request is not valid JSON: {exc}") from None
    except msgspec.ValidationError as exc:  # e.g. a number out of range
        raise ProtocolError("bad-request", f"bad request: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("bad-request", "the request must be one JSON object")
    kind = raw.get("type")
    if kind is None:
        raise ProtocolError("bad-request", 'missing field \'type\': send "type":"subscribe"')
    if kind not in ("subscribe", "status"):
        raise ProtocolError(
            "bad-request",
            f'unknown request type {_short(kind)}; this server accepts "subscribe" and "status"',
        )
    if "version" not in raw:
        raise ProtocolError(
            "bad-request", f"missing field 'version': this server speaks {PROTOCOL_VERSION}"
        )
    version = raw["version"]
    if type(version) is not int:
        raise ProtocolError("bad-request", f"'version' must be an integer, not {_short(version)}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported-version",
            f"version {version} is not supported; this server speaks {PROTOCOL_VERSION}",
        )
    try:
        if kind == "status":
            return _status_decoder().decode(line)
        return _request_decoder().decode(line)
    except msgspec.ValidationError as exc:
        what = StatusRequest if kind == "status" else SubscribeRequest
        raise ProtocolError("bad-request", _explain(exc, what)) from None


def _short(value: object) -> str:
    text = msgspec.json.encode(value).decode() if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: object) -> bool:
    try:
        msgspec.json.encode(value)
    except Exception:
        return False
    return True


class RequestReader:
    """Accumulates the client's bytes until the request line is complete.

    Raises "too-large" as soon as more than MAX_REQUEST bytes have come without a
    newline, so a peer cannot make the server buffer without bound. Bytes after the
    newline are kept in `rest` (a client should send nothing more).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done = False
        self.rest = b""

    def feed(self, data: bytes) -> Request | None:
        """The request once its line is complete, else None."""
        if self._done:
            return None
        start = len(self._buf)
        self._buf += data
        nl = self._buf.find(b"\n", start)
        if nl < 0:
            if len(self._buf) > MAX_REQUEST:
                self._buf.clear()
                raise ProtocolError(
                    "too-large", f"no newline within {MAX_REQUEST} bytes: the request is too long"
                )
            return None
        self._done = True
        line = bytes(self._buf[:nl])
        self.rest = bytes(self._buf[nl + 1 :])
        self._buf.clear()
        return parse_request(line)

    def feed_eof(self) -> Request | None:
        """At end of input: a final line without a newline still counts (Ctrl-D at socat)."""
        if self._done or not self._buf.strip():
            return None
        self._done = True
        line = bytes(self._buf)
        self._buf.clear()
        return parse_request(line)


# --- frames --------------------------------------------------------------------------


def frame_json(frame: Frame) -> bytes:
    """One JSON line."""
    return encode_json(frame) + b"\n"


def frame_msgpack(frame: Frame) -> bytes:
    """A 4-byte big-endian length, then the msgpack body."""
    body = encode_msgpack(frame)
    return _LEN.pack(len(body)) + body


def encode_frame(fmt: Format, frame: Frame) -> bytes:
    if fmt == "json":
        return frame_json(frame)
    if fmt == "msgpack":
        return frame_msgpack(frame)
    raise ValueError(f"unknown format {fmt!r}")


class FrameReader:
    """The client side: bytes as they arrive -> frames, for either format.

    A frame whose `type` this version does not know is skipped, so a newer server can add
    frame types; anything else that does not decode is a ProtocolError ("bad-frame").
    """

    def __init__(self, fmt: Format, *, max_frame: int = MAX_FRAME) -> None:
        if fmt not in ("json", "msgpack"):
            raise ValueError(f"unknown format {fmt!r}")
        self.format: Format = fmt
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # start of the unread part of _buf
        self._scan = 0  # JSON: where the search for the next newline resumes
        self._broken = False

    def feed(self, data: bytes) -> list[Frame]:
        if self._broken:
            raise ProtocolError("bad-frame", "the stream is already broken")
        self._buf += data
        try:
            out = self._json() if self.format == "json" else self._msgpack()
        except ProtocolError:
            self._broken = True
            raise
        if self._pos:
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        return out

    def feed_eof(self) -> None:
        """Raise if the stream ended inside a frame."""
        rest = len(self._buf) - self._pos
        if rest and (self.format == "msgpack" or self._buf[self._pos :].strip()):
            raise ProtocolError(
                "bad-frame", f"the connection closed inside a frame ({rest} bytes left over)"
            )

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buf) - self._pos

    def _json(self) -> list[Frame]:
        out: list[Frame] = []
        buf = self._buf
        while True:
            nl = buf.find(b"\n", max(self._scan, self._pos))
            if nl < 0:
                self._scan = len(buf)
                if len(buf) - self._pos > self.max_frame:
                    raise ProtocolError(
                        "too-large", f"a JSON frame longer than {self.max_frame} bytes"
                    )
                return out
            line = bytes(buf[self._pos : nl])
            self._pos = self._scan = nl + 1
            if line.strip():
                frame = self._decode(line, json=True)
                if frame is not None:
                    out.append(frame)

    def _msgpack(self) -> list[Frame]:
        out: list[Frame] = []
        buf = self._buf
        while len(buf) - self._pos >= 4:
            (size,) = _LEN.unpack_from(buf, self._pos)
            if size > self.max_frame:
                raise ProtocolError(
                    "too-large",
                    f"a msgpack frame of {size} bytes; the limit is {self.max_frame}"
                    " (is the server speaking JSON?)",
                )
            end = self._pos + 4 + size
            if len(buf) < end:
                break
            body = bytes(buf[self._pos + 4 : end])
            self._pos = end
            frame = self._decode(body, json=False)
            if frame is not None:
                out.append(frame)
        return out

    def _decode(self, data: bytes, *, json: bool) -> Frame | None:
        try:
            return decode_json(data) if json else decode_msgpack(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            if _unknown_type(data, json=json):
                return None
            what = data[:80]
            raise ProtocolError("bad-frame", f"cannot decode a frame ({exc}): {what!r}") from None
        except RecursionError:
            raise ProtocolError("bad-frame", "a frame nested too deeply") from None


def _unknown_type(data: bytes, *, json: bool) -> bool:
    try:
        raw = msgspec.json.decode(data) if json else msgspec.msgpack.decode(data)
    except Exception:
        return False
    return (
        isinstance(raw, dict)
        and isinstance(raw.get("type"), str)
        and raw["type"] not in FRAME_TYPES
    )

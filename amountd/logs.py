"""Logging for `amountd serve`: stdlib logging to stderr, shaped for where stderr goes.

Under systemd stderr is usually the journal (JOURNAL_STREAM names it): each line then
starts with a `<N>` syslog priority, which journald strips and stores as the entry's
priority (`journalctl -p warning` works), and carries no timestamp, since journald adds
its own. Elsewhere a line has a timestamp and a level name. `json` writes one JSON
object a line for log shippers, with whatever `extra=` fields the call gave.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import traceback
from typing import Any, Literal, TextIO

import msgspec

from .errors import UsageError

__all__ = [
    "JournalFormatter",
    "JsonFormatter",
    "TextFormatter",
    "setup_logging",
    "stderr_is_journal",
]

LogFormat = Literal["text", "json"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def syslog_priority(levelno: int) -> int:
    """sd-daemon(3)'s `<N>`: 7 debug, 6 info, 5 notice, 4 warning, 3 err, 2 crit."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stderr_is_journal(fd: int = 2, environ: dict[str, str] | None = None) -> bool:
    """True when `fd` is the journal stream systemd connected us to (JOURNAL_STREAM).

    JOURNAL_STREAM is "DEV:INODE" of that stream; it is inherited by children whose
    stderr may be redirected elsewhere, so the fd itself must match it.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError):
        return False


_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """`2026-05-09T07:35:25.123+00:00 WARNING amountd.server: message` (for a terminal)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        when = datetime.datetime.fromtimestamp(record.created).astimezone()
        return when.isoformat(timespec="milliseconds")


class JournalFormatter(logging.Formatter):
    """`<4>amountd.server: message`, the prefix on every line of a multi-line message."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def _default(obj: Any) -> Any:
    return str(obj)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extra fields, exception."""

    _encoder = msgspec.json.Encoder(enc_hook=_default)

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc: dict[str, Any] = {
            "time": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extra(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        try:
            data = self._encoder.encode(doc)
        except (TypeError, ValueError, OverflowError):
            # A str with lone surrogates (an undecodable path): make every field safe.
            safe = {
                k: v if isinstance(v, int | float | bool) else _safe(str(v)) for k, v in doc.items()
            }
            data = self._encoder.encode(safe)
        return data.decode()


def _safe(text: str) -> str:
    """Undecodable path bytes as `\\xNN`, like amountd's JSON frames and findmnt."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Handler(logging.StreamHandler[TextIO]):
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(
    level: str = "info", fmt: LogFormat = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """Send the root logger's records to stderr (or `stream`), formatted for where it goes.

    Safe to call again (SIGHUP with a new log level): the handler it installed before
    is replaced, other handlers are left alone. Returns the handler.
    """
    levelno = LEVELS.get(level.lower())
    if levelno is None:
        raise UsageError(f"unknown log level {level!r}: choose from {', '.join(LEVELS)}")
    if fmt not in ("text", "json"):
        raise UsageError(f"unknown log format {fmt!r}: choose from text, json")
    out = sys.stderr if stream is None else stream
    try:
        journal = stderr_is_journal(out.fileno())
    except (AttributeError, OSError, ValueError):
        journal = False  # not a real file (a test's StringIO)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JournalFormatter(JsonFormatter()) if journal else JsonFormatter()
    else:
        formatter = JournalFormatter() if journal else TextFormatter()
    handler = _Handler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(levelno)
    return handler

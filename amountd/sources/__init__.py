"""Interchangeable sources of mount changes, and `auto`, which picks one and says why."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..errors import AmountdError, UsageError
from ..ns import Namespace
from ..table import MountTable
from .base import Change, Source

__all__ = ["SOURCES", "Change", "Source", "arm_source", "open_source", "read_table"]

SOURCES = ("auto", "fanotify", "mountinfo")


def _fanotify(ns: Namespace, unlimited_queue: bool) -> Source:
    from .fanotify import FanotifySource

    return FanotifySource(ns, unlimited_queue=unlimited_queue)


def _mountinfo(ns: Namespace) -> Source:
    from .mountinfo_poll import MountinfoSource

    return MountinfoSource(ns)


async def arm_source(kind: str, ns: Namespace, *, unlimited_queue: bool = False) -> Source:
    """An armed source, the caller's to close: fanotify, or mountinfo (`auto` falls back
    to it where fanotify is refused, and its `reason` says why). The one way a source
    is opened: `open_source` and each namespace of a MultiSource come through here."""
    if kind not in SOURCES:
        raise UsageError(f"unknown source {kind!r}: choose one of {', '.join(SOURCES)}")
    reason: str | None = None
    if kind in ("auto", "fanotify"):
        src: Source | None = None
        try:
            src = _fanotify(ns, unlimited_queue)
            await src.arm()
        except (AmountdError, ImportError) as e:
            if src is not None:
                src.close()
            if kind == "fanotify":
                if isinstance(e, AmountdError):
                    raise
                raise AmountdError(f"the fanotify source is not available: {e}") from None
            reason = f"fanotify unavailable: {e}; fell back to mountinfo"
        except BaseException:
            if src is not None:
                src.close()
            raise
        else:
            return src
    src = _mountinfo(ns)
    src.reason = reason
    try:
        await src.arm()
    except BaseException:
        src.close()
        raise
    return src


@asynccontextmanager
async def open_source(
    kind: str, ns: Namespace, *, unlimited_queue: bool = False
) -> AsyncIterator[Source]:
    """An armed source: every change after this yields is reported by `changes()`."""
    src = await arm_source(kind, ns, unlimited_queue=unlimited_queue)
    try:
        yield src
    finally:
        src.close()


def read_table(kind: str, ns: Namespace) -> MountTable:
    """The table now, once, without arming a watch (`amountd list`, `snapshot()`)."""
    if kind not in SOURCES:
        raise UsageError(f"unknown source {kind!r}: choose one of {', '.join(SOURCES)}")
    if kind in ("auto", "fanotify"):
        try:
            from .fanotify import read_kernel_table
        except ImportError as e:
            if kind == "fanotify":
                raise AmountdError(f"the fanotify source is not available: {e}") from None
        else:
            try:
                return read_kernel_table(ns)
            except AmountdError:
                if kind == "fanotify":
                    raise
    from .mountinfo_poll import MountinfoSource

    return MountinfoSource(ns).read()

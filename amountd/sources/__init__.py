"""Interchangeable sources of mount changes, and `auto`, which picks one and says why."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..errors import AmountdError, UsageError
from ..ns import Namespace
from ..sweep import DEFAULT_SWEEP, SweepSettings
from ..table import MountTable
from .base import Change, Source

__all__ = ["SOURCES", "Change", "Source", "arm_source", "fell_back", "open_source", "read_table"]

SOURCES = ("auto", "fanotify", "listmount", "mountinfo")


def _fanotify(ns: Namespace, unlimited_queue: bool, sweep: SweepSettings) -> Source:
    from .fanotify import FanotifySource

    return FanotifySource(
        ns,
        unlimited_queue=unlimited_queue,
        sweep_interval=sweep.interval,
        sweep_budget=sweep.budget,
    )


def _listmount(ns: Namespace, sweep: SweepSettings) -> Source:
    from .listmount import ListmountSource

    return ListmountSource(ns, sweep_interval=sweep.interval, sweep_budget=sweep.budget)


def fell_back(what: str, e: BaseException, to: str) -> str:
    """`ready.reason` for `auto`: which call failed, how, and what is used instead
    (e.g. "fanotify_init: EINVAL (Linux 6.15+ needed); using listmount")."""
    import errno

    from ..kernel.errors import Unsupported

    err = getattr(e, "errno", None)
    name = errno.errorcode.get(err, str(err)) if isinstance(err, int) else None
    if isinstance(e, Unsupported) and name is not None:
        since = "6.15+" if what == "fanotify_init" else "6.8+"
        return f"{what}: {name} (Linux {since} needed); using {to}"
    return f"{what} unavailable: {e}; using {to}"


async def _armed(src: Source) -> Source:
    try:
        await src.arm()
    except BaseException:
        src.close()
        raise
    return src


def _mountinfo(ns: Namespace) -> Source:
    from .mountinfo_poll import MountinfoSource

    return MountinfoSource(ns)


@asynccontextmanager
async def open_source(
    kind: str,
    ns: Namespace,
    *,
    unlimited_queue: bool = False,
    sweep: SweepSettings = DEFAULT_SWEEP,
) -> AsyncIterator[Source]:
    """An armed source: every change after this yields is reported by `changes()`."""
    src = await arm_source(kind, ns, unlimited_queue=unlimited_queue, sweep=sweep)
    try:
        yield src
    finally:
        src.close()


async def arm_source(
    kind: str,
    ns: Namespace,
    *,
    unlimited_queue: bool = False,
    sweep: SweepSettings = DEFAULT_SWEEP,
) -> Source:
    """The source `kind` names, armed (the caller closes it). `auto`: fanotify (6.15+),
    else listmount (6.8+), else mountinfo, with `reason` saying why."""
    if kind not in SOURCES:
        raise UsageError(f"unknown source {kind!r}: choose one of {', '.join(SOURCES)}")
    reason: str | None = None
    src: Source | None = None
    if kind in ("auto", "fanotify"):
        try:
            src = await _armed(_fanotify(ns, unlimited_queue, sweep))  # closed if interrupted
        except (AmountdError, ImportError) as e:
            src = None
            if kind == "fanotify":
                if isinstance(e, AmountdError):
                    raise
                raise AmountdError(f"the fanotify source is not available: {e}") from None
            reason = fell_back("fanotify_init", e, "listmount")
    if src is None and kind in ("auto", "listmount"):
        try:
            src = await _armed(_listmount(ns, sweep))
        except (AmountdError, ImportError) as e:
            src = None
            if kind == "listmount":
                if isinstance(e, AmountdError):
                    raise
                raise AmountdError(f"the listmount source is not available: {e}") from None
            why = fell_back("listmount", e, "mountinfo")
            reason = why if reason is None else f"{reason}; {why}"
        else:
            src.reason = reason
    if src is None:
        src = _mountinfo(ns)
        src.reason = reason
        await _armed(src)
    return src


def read_table(kind: str, ns: Namespace) -> MountTable:
    """The table now, once, without arming a watch (`amountd list`, `snapshot()`)."""
    if kind not in SOURCES:
        raise UsageError(f"unknown source {kind!r}: choose one of {', '.join(SOURCES)}")
    if kind in ("auto", "fanotify", "listmount"):
        try:
            from .fanotify import read_kernel_table
        except ImportError as e:
            if kind != "auto":
                raise AmountdError(f"the fanotify source is not available: {e}") from None
        else:
            try:
                return read_kernel_table(ns)
            except AmountdError:
                if kind != "auto":
                    raise
    from .mountinfo_poll import MountinfoSource

    return MountinfoSource(ns).read()

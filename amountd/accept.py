"""Accept loops that outlive a shortage of file descriptors or memory.

anyio's `Listener.serve` ends at the first error `accept()` raises, and with it the
server: a local user who holds connections open until the fd limit is reached
(EMFILE), or a host out of fds (ENFILE) or memory (ENOMEM, ENOBUFS), would stop amountd
for everyone. Here such an error is logged (once per interval) and the loop backs off
briefly and goes on; the connection waits in the backlog until an fd is free. An
aborted handshake (ECONNABORTED, EPROTO, ...) is skipped. Anything else is a real
failure of the listening socket and is raised.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc
from anyio.streams.stapled import MultiListener
from anyio.streams.tls import TLSListener

from .limits import RateLog

__all__ = ["SHORTAGE", "ResilientListener", "resilient"]

log = logging.getLogger("amountd.accept")

SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept() errors that say "not now": wait, then accept again."""
_SKIP = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN, errno.ENETDOWN}
    | {errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP}
    | {errno.ENETUNREACH, errno.ECONNRESET}
)
"""accept() errors about the one connection that was going to be accepted."""

BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0
LOG_EVERY = 10.0
"""Seconds between two log lines about the same accept() error on one listener."""


def _errno(exc: BaseException) -> int | None:
    """The errno behind an accept failure (anyio wraps some in BrokenResourceError)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc = exc.__cause__  # type: ignore[assignment]
    return None


class ResilientListener(anyio.abc.Listener[Any]):
    """One listener whose `serve` never ends on a shortage (see the module doc)."""

    def __init__(self, inner: anyio.abc.Listener[Any], name: str = "") -> None:
        self.inner = inner
        self.name = name
        self.shortages = 0
        """accept() calls that failed for want of fds or memory."""
        self._log = RateLog(LOG_EVERY)

    async def accept(self) -> Any:
        return await self.inner.accept()  # type: ignore[attr-defined]

    async def serve(
        self, handler: Callable[[Any], Any], task_group: anyio.abc.TaskGroup | None = None
    ) -> None:
        if task_group is None:
            async with anyio.create_task_group() as tg:
                await self._accept_loop(handler, tg)
        else:
            await self._accept_loop(handler, task_group)

    async def _accept_loop(self, handler: Callable[[Any], Any], tg: anyio.abc.TaskGroup) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                stream = await self.accept()
            except anyio.ClosedResourceError:
                raise
            except (OSError, anyio.BrokenResourceError) as e:
                code = _errno(e)
                if code in SHORTAGE:
                    self.shortages += 1
                    held = self._log.allow(code, time.monotonic())
                    if held is not None:
                        log.warning(
                            "%s: cannot accept a connection: %s%s; retrying",
                            self.name or "listener",
                            errno.errorcode.get(code or 0, "?"),
                            f" ({held} more since the last message)" if held else "",
                        )
                    await anyio.sleep(backoff)
                    backoff = min(BACKOFF_MAX, backoff * 2)
                    continue
                if code in _SKIP:
                    continue
                raise
            backoff = BACKOFF_MIN
            tg.start_soon(handler, stream)

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.inner.extra_attributes


def resilient(listener: Any, name: str = "") -> Any:
    """`listener` with every socket listener in it made resilient (inside a TLS
    listener, and each address of a name with several)."""
    if isinstance(listener, ResilientListener):
        return listener
    if isinstance(listener, TLSListener):
        listener.listener = resilient(listener.listener, name)
        return listener
    if isinstance(listener, MultiListener):
        return MultiListener([resilient(one, name) for one in listener.listeners])
    return ResilientListener(listener, name)

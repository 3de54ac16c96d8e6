"""A stream of frames fed by a background task: what `watch()` and `connect()` hand out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .model import Frame

__all__ = ["FrameStream", "lone_exception"]


@contextmanager
def lone_exception() -> Iterator[None]:
    """A consumer's own exception out of a stream's task group, as itself: the pump
    task never fails (it hands its failure to the stream), so a group of one is the
    consumer's."""
    try:
        yield
    except BaseExceptionGroup as eg:
        if len(eg.exceptions) == 1:
            raise eg.exceptions[0] from None
        raise


class FrameStream:
    """The frames of a watch: an async iterator that a timeout or cancellation can
    interrupt without losing the watch (unlike a bare async generator's `anext`)."""

    def __init__(self, receive: MemoryObjectReceiveStream[Frame]) -> None:
        self._receive = receive
        self.error: BaseException | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Frame:
        try:
            try:
                # No checkpoint per frame when frames are waiting (tens of thousands a
                # second): the consumer's own awaits, or the wait below, let others run.
                return self._receive.receive_nowait()
            except anyio.WouldBlock:
                return await self._receive.receive()
        except anyio.EndOfStream:
            if self.error is not None:
                raise self.error from None
            raise StopAsyncIteration from None

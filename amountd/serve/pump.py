"""The pump: the source's batches -> the broker.

There is one table: the source's, as of the end of the batch it last yielded; the
broker takes its snapshots from it. The pump publishes a big batch (a drained kernel
queue: thousands of events) in slices and lets the writers drain the subscribers'
queues in between (otherwise one batch larger than a queue would resync even the
fastest subscriber); while it does, the table is ahead of the last published seq, so
the batch is opened on the broker and the snapshots asked for meanwhile wait for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import aclosing
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import msgspec

from ..cgroups import ContainerLookup
from ..constants import STOPPING
from ..errors import AmountdError
from ..model import End, Event, Resync
from ..sources import Source
from .daemon import Change

if TYPE_CHECKING:
    from ..broker import Broker

__all__ = ["Pump"]

log = logging.getLogger("amountd.server")  # the name the daemon's log lines have always had


class Pump:
    """Moves one source's changes into the broker, `step` frames between checkpoints.

    `publish` is `broker`'s, with the server-wide filter and the counts on it
    (amountd.serve.daemon.Service.publisher); `stamp` marks a batch's arrival."""

    def __init__(
        self,
        broker: Broker,
        publish: Callable[[Change], None],
        stamp: Callable[[], None],
        step: int,
    ) -> None:
        self.broker = broker
        self.publish = publish
        self.stamp = stamp
        self.step = step
        self.failure: BaseException | None = None
        """The source's failure, raised by serve() once subscribers were told."""
        self.stop_reason = STOPPING
        """The `end` reason the server sends when it stops."""

    async def run(self, src: Source, done: anyio.CancelScope) -> None:
        """Batches -> broker, in slices (the batch opened on the broker while the table
        is ahead of the last seq). Cancels `done` when the source ends or fails."""

        containers = ContainerLookup()  # what runs in each namespace, for resync/end
        for ns in getattr(src, "namespaces", [src.ns]):
            containers.hint(ns.ns_id, ns.pid)
            if ns.ns_id is not None:
                containers(ns.ns_id)
        try:
            async with aclosing(src.changes()) as batches:
                async for batch in batches:
                    self.stamp()
                    if len(batch) <= self.step:
                        ended = self._out(batch, containers)
                    else:
                        self.broker.open_batch()
                        try:
                            ended = await self._out_sliced(batch, containers)
                        finally:
                            self.broker.close_batch()
                    if ended:
                        done.cancel()
                        return
            log.error("the source stopped without an end: stopping")
            self.stop_reason = f"{STOPPING}: the source stopped"
        except Exception as e:
            if isinstance(e, AmountdError):
                log.error("the source failed: %s", e)  # noqa: TRY400 (its message says it all)
            else:
                log.exception("the source failed")
            self.failure = e
            self.stop_reason = f"{STOPPING}: {e}"
        done.cancel()

    def _out(self, batch: list[Change], containers: ContainerLookup) -> bool:
        """Publish `batch` (no await); True once the namespace's `end` is out."""
        return any(self._one(frame, containers) for frame in batch)  # stops at `end`

    async def _out_sliced(self, batch: list[Change], containers: ContainerLookup) -> bool:
        """Publish `batch`, `step` frames between checkpoints: one batch can hold more
        events than a subscriber's queue (the kernel's whole queue), so the writers
        drain the queues in between. True once the namespace's `end` is out."""
        step = self.step
        for i in range(0, len(batch), step):
            if i:
                await anyio.lowlevel.checkpoint()
            if self._out(batch[i : i + step], containers):
                return True
        return False

    def _one(self, frame: Change, containers: ContainerLookup) -> bool:
        if type(frame) is Event:  # the common case, first
            self.publish(frame)
            return False
        if isinstance(frame, (Resync, End)) and frame.ns_id is not None:
            if frame.container is not None:
                containers.remember(frame.ns_id, frame.container)
            else:
                frame = msgspec.structs.replace(frame, container=containers(frame.ns_id))
        self.publish(frame)
        if isinstance(frame, End) and frame.ns_id is None:  # else: one of several
            log.info("the namespace ended (%s): stopping", frame.reason)
            return True
        return False

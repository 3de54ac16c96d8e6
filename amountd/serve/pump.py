"""The pump: the source's batches -> the server's table -> the broker.

The broker takes snapshots from a table that must be as of the last published seq.
The server keeps that table itself, applying each event just before publishing it (a
consumer's invariant: every frame applied gives the kernel's table), so the pump can
publish a big batch (a drained kernel queue: thousands of events) in slices and let the
writers drain the subscribers' queues in between; otherwise one batch larger than a
queue would resync even the fastest subscriber.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import aclosing

import anyio
import anyio.lowlevel
import msgspec

from ..cgroups import ContainerLookup
from ..constants import STOPPING
from ..errors import AmountdError
from ..model import End, Event, Resync
from ..sources import Source
from ..table import MountTable, apply
from .daemon import Change

__all__ = ["Pump"]

log = logging.getLogger("amountd.server")  # the name the daemon's log lines have always had


class Pump:
    """Moves one source's changes into the broker, `step` frames between checkpoints.

    `publish` is the broker's, with the server-wide filter and the counts on it
    (amountd.serve.daemon.Service.publisher); `stamp` marks a batch's arrival."""

    def __init__(
        self,
        table: MountTable,
        publish: Callable[[Change], None],
        stamp: Callable[[], None],
        step: int,
    ) -> None:
        self.table = table
        self.publish = publish
        self.stamp = stamp
        self.step = step
        self.failure: BaseException | None = None
        """The source's failure, raised by serve() once subscribers were told."""
        self.stop_reason = STOPPING
        """The `end` reason the server sends when it stops."""

    async def run(self, src: Source, done: anyio.CancelScope) -> None:
        """Batches -> broker, in slices, each frame applied to our table and published
        with no await in between (snapshots come from that table, as of the last seq).
        Cancels `done` when the source ends or fails."""

        publish, stamp, table, step = self.publish, self.stamp, self.table, self.step
        containers = ContainerLookup()  # what runs in each namespace, for resync/end
        for ns in getattr(src, "namespaces", [src.ns]):
            containers.hint(ns.ns_id, ns.pid)
            if ns.ns_id is not None:
                containers(ns.ns_id)
        try:
            async with aclosing(src.changes()) as batches:
                async for batch in batches:
                    stamp()
                    for i, item in enumerate(batch, 1):
                        frame = item
                        if type(frame) is Event:
                            apply(table, frame)
                        elif isinstance(frame, (Resync, End)) and frame.ns_id is not None:
                            if frame.container is not None:
                                containers.remember(frame.ns_id, frame.container)
                            else:
                                frame = msgspec.structs.replace(
                                    frame, container=containers(frame.ns_id)
                                )
                        publish(frame)
                        if isinstance(frame, End) and frame.ns_id is None:  # else: one of several
                            log.info("the namespace ended (%s): stopping", frame.reason)
                            done.cancel()
                            return
                        if i % step == 0:
                            # Let the writers drain the queues: one batch can hold more
                            # events than a subscriber's queue (the kernel's whole queue).
                            await anyio.lowlevel.checkpoint()
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

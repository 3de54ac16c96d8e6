"""The in-process Python API: `watch()` and `snapshot()`, on whichever loop calls them."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from msgspec.structs import replace

from .cgroups import container_of_pid
from .filter import Filter, filter_event, filter_mounts
from .model import End, Event, Frame, Mount, Ready, Resync, Snapshot
from .ns import Namespace, resolve_ns
from .sources import Source, open_source
from .stream import FrameStream, lone_exception
from .sweep import DEFAULT_SWEEP, SweepSettings, check_budget, check_interval

__all__ = ["FrameStream", "frames_of", "snapshot", "watch"]


async def frames_of(
    src: Source, *, snapshot: bool = False, filter: Filter | None = None
) -> AsyncGenerator[Frame, None]:
    """Number a source's changes and frame them: [snapshot], ready, event/resync..., [end]."""
    flt = filter if filter is not None and not filter.is_empty else None
    seq = 0
    if snapshot:
        mounts = src.table.mounts()
        yield Snapshot(
            seq=seq,
            ns_id=src.ns_id,
            mounts=filter_mounts(flt, mounts) if flt else mounts,
            container=container_of_pid(src.ns.pid),
        )
    yield Ready(
        source=src.kind, ns_id=src.ns_id, reason=src.reason, container=container_of_pid(src.ns.pid)
    )
    async with aclosing(src.changes()) as batches:
        async for batch in batches:
            for frame in batch:
                if isinstance(frame, Event):
                    seq += 1
                    numbered = replace(frame, seq=seq)
                    if flt is not None:
                        shown = filter_event(flt, numbered)
                        if shown is not None:
                            yield shown
                        continue
                    yield numbered
                elif isinstance(frame, Resync):
                    seq += 1
                    yield replace(frame, seq=seq)
                else:
                    yield frame
                    if isinstance(frame, End):
                        return


async def _pump(
    frames: AsyncGenerator[Frame, None], send: MemoryObjectSendStream[Frame], out: FrameStream
) -> None:
    async with send, aclosing(frames):
        try:
            async for frame in frames:
                await send.send(frame)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as e:  # handed to the consumer, raised at its next anext()
            out.error = e


@asynccontextmanager
async def watch(
    *,
    source: str = "auto",
    ns: str | int | Namespace | None = None,
    snapshot: bool = False,
    filter: Filter | None = None,
    unlimited_queue: bool = False,
    buffer: int = 1024,
    sweep: SweepSettings = DEFAULT_SWEEP,
) -> AsyncIterator[FrameStream]:
    """Watch one mount namespace (ours, or `ns` = a PID or namespace file path).

    Once this yields, the watch is armed: every later change is reported. The stream is
    `snapshot` (if asked), `ready`, then `event`/`resync` frames, and `end` if the
    namespace goes away. A consumer that falls `buffer` frames behind stops the source
    reading; the kernel's queue then bounds what waits, and an overflow comes back as
    `resync` and the difference. `sweep`: how often and at what CPU share the
    fanotify and listmount sources look for what the kernel does not report
    (`--sweep-interval`, `--sweep-budget`); invalid values raise ValueError.
    """
    sweep = SweepSettings(check_interval(sweep.interval), check_budget(sweep.budget))
    target = ns if isinstance(ns, Namespace) else resolve_ns(ns)
    send, receive = anyio.create_memory_object_stream[Frame](buffer)
    stream = FrameStream(receive)
    with lone_exception():
        async with (
            open_source(source, target, unlimited_queue=unlimited_queue, sweep=sweep) as src,
            receive,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(_pump, frames_of(src, snapshot=snapshot, filter=filter), send, stream)
            yield stream
            tg.cancel_scope.cancel()


def snapshot(ns: str | int | Namespace | None = None, *, source: str = "auto") -> list[Mount]:
    """The namespace's mounts now, parents before children.

    With fanotify/statmount available (`auto`), records carry unique IDs; the
    `mountinfo` source reads /proc/PID/mountinfo and leaves them null.
    """
    from .sources import read_table

    target = ns if isinstance(ns, Namespace) else resolve_ns(ns)
    return read_table(source, target).mounts()

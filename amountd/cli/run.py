"""Running a command: the loop, the signals that end it, and frames printed to stdout.

Shared by the commands that stream (watch, subscribe, fleet) and those that ask once
(status, serve). anyio and the model are imported inside, when a command runs.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from typing import IO, Any

__all__ = ["Output", "print_frames", "run", "run_until_signal"]


class Output:
    """Frames to stdout, one line each, flushed at once (a pipe reader sees them live)."""

    def __init__(self, json: bool, stream: IO[bytes] | None = None, view: Any = None) -> None:
        from ..model import encode_json

        self.json = json
        self.stream = stream if stream is not None else sys.stdout.buffer
        self._header = False
        self._encode = encode_json  # bound here: a frame's path is the hot path
        self._render: Any = None
        if not json:
            from ..cgroups import ContainerLookup
            from ..columns import DEFAULT_WATCH, View
            from ..render import Renderer

            if view is None:
                view = View(DEFAULT_WATCH, with_notes=True)
            lookup = ContainerLookup() if "CONTAINER" in view.columns else None
            self._render = Renderer(view, lookup)

    def _write(self, data: bytes) -> None:
        self.stream.write(data)
        self.stream.flush()

    def header(self) -> None:
        if not self.json and not self._header:
            self._header = True
            line = self._render.header()
            if line is not None:
                self._write(line.encode("utf-8", "surrogateescape") + b"\n")

    def frame(self, frame: Any) -> None:
        if self.json:
            self._write(self._encode(frame) + b"\n")
            return
        from ..model import End, Ready, Resync

        self.header()
        rows = self._render.lines(frame)
        if rows:
            self._write("\n".join(rows).encode("utf-8", "surrogateescape") + b"\n")
        elif isinstance(frame, Ready):
            if frame.reason:
                print(f"amountd: {frame.reason}", file=sys.stderr, flush=True)
        elif isinstance(frame, (Resync, End)):
            print(f"amountd: {notice(frame)}", file=sys.stderr, flush=True)


def notice(frame: Any) -> str:
    """A resync or end as one line for people: which namespace, what runs in it."""
    from ..model import Resync

    what = f"resync ({frame.reason})" if isinstance(frame, Resync) else frame.reason
    if frame.ns_id is None:
        return str(what)
    where = f"mount namespace {frame.ns_id}"
    if frame.container is not None:
        where += f" ({frame.container.short})"
    if isinstance(frame, Resync) and frame.reason == "found":
        return f"new {where}"
    return f"{where}: {what}"


async def run_until_signal(body: Callable[[], Any], timeout: float | None) -> None:
    """Run `body` until it returns, `timeout` passes, or SIGINT/SIGTERM arrives."""
    import signal

    import anyio

    from ..interrupt import rearm

    async with anyio.create_task_group() as tg:

        async def signals() -> None:
            try:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                    async for _ in received:
                        tg.cancel_scope.cancel()
                        return
            finally:
                rearm()  # asyncio restored Python's defaults on the way out

        tg.start_soon(signals)
        with anyio.move_on_after(timeout):
            await body()
        tg.cancel_scope.cancel()


async def print_frames(frames: AsyncIterator[Any], out: Output, count: int | None) -> None:
    """Print frames until the stream ends or `count` events were printed."""
    from ..model import Event

    n = 0
    async for frame in frames:
        out.frame(frame)
        if isinstance(frame, Event):
            n += 1
            if count is not None and n >= count:
                return


def _leaves(eg: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def run(fn: Callable[[], Any], backend: str) -> None:
    """Run on the chosen loop; a task group's lone failure comes out as itself."""
    import anyio

    from ..interrupt import rearm

    try:
        anyio.run(fn, backend=backend)
    except BaseExceptionGroup as eg:
        leaves = _leaves(eg)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    finally:
        rearm()  # a signal receiver inside may have restored Python's defaults

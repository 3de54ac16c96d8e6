"""SIGINT/SIGTERM end the `amountd` command with status 0, at any moment.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread happens
to be: inside an import (a traceback from the import machinery), inside a C extension
building its type tables (msgspec 0.23 crashed with SIGSEGV), or inside code that
catches BaseException (the signal is then swallowed). So the command's first act
(amountd/__main__.py, cli.main) is `arm()`: until an event loop takes the signals over
(anyio.open_signal_receiver, which ends the command cleanly), a signal ends the process
at once with status 0. Nothing is half-written: output is flushed a line at a time.

Only the command arms this; a program that imports amountd keeps its own handlers.
"""

from __future__ import annotations

# Only modules the interpreter has loaded at startup: `signal` would import `enum` (and
# `typing` is not loaded yet either), and a signal during that import is exactly what
# this module is here to prevent.
import _signal  # type: ignore[import-not-found]
import os

__all__ = ["arm", "rearm"]

_SIGNALS: tuple[int, ...] = (_signal.SIGINT, _signal.SIGTERM)
_armed = False


def _exit(signum: int, frame: object) -> None:
    # Not sys.exit: an exception here would be raised wherever the main thread is.
    # stdout is flushed a line at a time and stderr is line-buffered: a reader has
    # every complete line.
    os._exit(0)


def _install() -> None:
    for sig in _SIGNALS:
        _signal.signal(sig, _exit)


def arm() -> None:
    """From now on SIGINT/SIGTERM end the process with status 0 (the command only)."""
    global _armed
    _armed = True
    _install()


def rearm() -> None:
    """After an event loop's signal receiver closes (asyncio then restores Python's
    defaults: KeyboardInterrupt, and death by SIGTERM): arm again, if the command armed."""
    if _armed:
        _install()

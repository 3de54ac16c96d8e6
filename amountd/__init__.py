"""amountd: follow Linux mount tables through fanotify mount events (or mountinfo).

    async with amountd.watch(snapshot=True) as frames:
        async for frame in frames:
            ...

Names are loaded on first use, so `amountd --help` does not pay for the event loop.
"""

from __future__ import annotations

import sys as _sys

_argv0 = (getattr(_sys, "argv", None) or [""])[0]
if _argv0 == "-m" or _argv0.rsplit("/", 1)[-1] == "amountd":
    # This process is the `amountd` command (`python -m amountd`: argv[0] is "-m" while
    # the package is located; or the console script), so SIGINT/SIGTERM end it with
    # status 0 from this line on, before any import can be interrupted: no import here,
    # only modules loaded at startup (amountd.interrupt, which cli.main arms again,
    # explains). A program that imports amountd keeps its own handlers.
    import _signal  # type: ignore[import-not-found]
    import os as _os

    def _exit_0(signum: int, frame: object) -> None:
        _os._exit(0)

    _signal.signal(_signal.SIGINT, _exit_0)
    _signal.signal(_signal.SIGTERM, _exit_0)

from typing import TYPE_CHECKING, Any  # noqa: E402 (after the signals)

from .constants import DEFAULT_SOCKET, __version__  # noqa: E402, F401 (a leaf: no cycle)

__all__ = [
    "DEFAULT_SOCKET",
    "AmountdError",
    "ClientError",
    "End",
    "Error",
    "Event",
    "Filter",
    "Frame",
    "FsPath",
    "Mount",
    "MountTable",
    "Ready",
    "Resync",
    "Snapshot",
    "SweepSettings",
    "apply_frame",
    "connect",
    "snapshot",
    "watch",
]

_LAZY = {
    "AmountdError": "errors",
    "ClientError": "client",
    "connect": "client",
    "End": "model",
    "Error": "model",
    "Event": "model",
    "Frame": "model",
    "FsPath": "model",
    "Mount": "model",
    "Ready": "model",
    "Resync": "model",
    "Snapshot": "model",
    "SweepSettings": "sweep",
    "Filter": "filter",
    "MountTable": "table",
    "apply_frame": "table",
    "snapshot": "api",
    "watch": "api",
}

if TYPE_CHECKING:
    from .api import snapshot, watch
    from .client import ClientError, connect
    from .errors import AmountdError
    from .filter import Filter
    from .model import End, Error, Event, Frame, FsPath, Mount, Ready, Resync, Snapshot
    from .sweep import SweepSettings
    from .table import MountTable, apply_frame


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'amountd' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"amountd.{mod}"), name)
    globals()[name] = value
    return value

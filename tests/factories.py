"""The one way tests build records: a Mount or an Event with defaults, any field overridden.

No kernel and no pytest: pure values, for unit tests and kernel tests alike.
"""

from __future__ import annotations

from typing import Any, Literal

from amountd.model import Action, Event, Mount, Via, fspath

Ids = Literal["both", "unique", "legacy"]
_PATHS = ("target", "root", "source", "fs_options")


def mount(
    key: int,
    target: str | bytes | None = "/",
    parent: int | None = 1,
    *,
    ids: Ids = "both",
    full: bool = True,
    **fields: Any,
) -> Mount:
    """A tmpfs record filed under `key`, below `parent`; `fields` override any field.

    `ids`: which IDs carry `key` and `parent`: the unique ones ("unique": listmount and
    fanotify), the 32-bit ones ("legacy": mountinfo), or both. `full` fills every field
    the kernel gives (root, source, options...); without it, only IDs, target and fstype.
    Paths may be given as str or bytes.
    """
    rec: dict[str, Any] = {"target": target, "fstype": "tmpfs"}
    if full:
        rec |= {
            "root": "/",
            "source": "src",
            "options": "rw,relatime",
            "fs_options": "rw",
            "propagation": "",
        }
    if ids != "legacy":
        rec |= {"id": key, "parent_id": parent}
    if ids != "unique":
        rec |= {"legacy_id": key, "legacy_parent_id": parent}
    rec |= fields
    for name in _PATHS:
        if isinstance(rec.get(name), str | bytes):
            rec[name] = fspath(rec[name])
    return Mount(**rec)


def event(
    action: Action,
    mount: Mount,
    old: Mount | None = None,
    *,
    seq: int = 0,
    time: float = 1.0,
    via: Via = "fanotify",
    **fields: Any,
) -> Event:
    """An Event of `mount` (and the `old` record of a remount or move)."""
    return Event(seq=seq, time=time, action=action, via=via, mount=mount, old=old, **fields)

"""Kernel shells: fanotify mount events, listmount/statmount, statx, nsfs ioctls.

`layouts` is pure (bytes in, values out); `syscalls` is the thin ctypes layer over it;
`errors` holds the exceptions, each with a message that says what to do.
"""

from __future__ import annotations

from .errors import (
    KernelError,
    MalformedBuffer,
    MountGone,
    NamespaceGone,
    PermissionDenied,
    Unsupported,
)
from .layouts import (
    FanEvent,
    StatMount,
    build_mnt_id_req,
    parse_fanotify_events,
    parse_statmount,
    statmount_to_mount,
)

__all__ = [
    "FanEvent",
    "KernelError",
    "MalformedBuffer",
    "MountGone",
    "NamespaceGone",
    "PermissionDenied",
    "StatMount",
    "Unsupported",
    "build_mnt_id_req",
    "parse_fanotify_events",
    "parse_statmount",
    "statmount_to_mount",
]

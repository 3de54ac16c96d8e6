"""Errors from the kernel shells, each saying what the user can do about it.

`MountGone` is raised on the hot path (a mount that came and went before statmount
asked about it), so it is a plain class with a fixed message and no uname() call.
"""

from __future__ import annotations

import errno as _errno
import os

from ..errors import AmountdError

__all__ = [
    "KernelError",
    "MalformedBuffer",
    "MountGone",
    "NamespaceGone",
    "PermissionDenied",
    "Unsupported",
    "from_errno",
]


def _release() -> str:
    try:
        return os.uname().release
    except OSError:  # pragma: no cover - uname does not fail on Linux
        return "unknown"


class KernelError(AmountdError, OSError):
    """A syscall failed; `.errno` holds the kernel's errno."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)


class Unsupported(KernelError):
    """The running kernel lacks a feature amountd needs."""

    def __init__(self, err: int, feature: str, since: str) -> None:
        super().__init__(
            err,
            f"this kernel ({_release()}) lacks {feature} (Linux {since}+): "
            f"{os.strerror(err)}; use the mountinfo source instead",
        )
        self.feature = feature


class PermissionDenied(KernelError):
    """The caller lacks the privilege the call needs."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(
            err,
            f"{what}: {os.strerror(err)}; it needs CAP_SYS_ADMIN in the user namespace "
            "that owns the watched mount namespace: run amountd as root (or inside that "
            "user namespace), or use the mountinfo source",
        )


class MountGone(KernelError):
    """The mount is no longer in the namespace (ENOENT): expected for short-lived mounts."""

    def __init__(self, mnt_id: int) -> None:
        OSError.__init__(self, _errno.ENOENT, "mount is gone")
        self.mnt_id = mnt_id

    def __str__(self) -> str:
        return f"mount {self.mnt_id} is gone"


class NamespaceGone(KernelError):
    """The mount namespace no longer exists (or was never there)."""

    def __init__(self, err: int, ns_id: int) -> None:
        super().__init__(err, f"mount namespace {ns_id} is gone: {os.strerror(err)}")
        self.ns_id = ns_id


class MalformedBuffer(ValueError):
    """A buffer from the kernel does not have the layout we expect."""


def from_errno(err: int, what: str, *, feature: str = "", since: str = "") -> KernelError:
    """The exception for a failed call, by errno (generic `KernelError` for the rest)."""
    if err in (_errno.EPERM, _errno.EACCES):
        return PermissionDenied(err, what)
    if err == _errno.ENOSYS and feature:
        return Unsupported(err, feature, since)
    return KernelError(err, f"{what}: {os.strerror(err)}")

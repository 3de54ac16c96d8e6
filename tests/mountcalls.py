"""mount(2) and umount2(2) through plain ctypes, for the scripts that run INSIDE a
private namespace (tests/nsops.py, nsscript.py, nschurn.py, benchmarks/nsdriver.py).

Standard library only: the scripts run with whichever Python the test or benchmark
runs, by path, so this sits next to them and is imported as `mountcalls`.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
MNT_DETACH = 2
PROP = {"unbindable": 1 << 17, "private": 1 << 18, "slave": 1 << 19, "shared": 1 << 20}
"""mount --make-KIND's flag, by KIND."""


def check(r: int, what: str) -> None:
    """OSError with errno's text when a libc call returned non-zero."""
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(
    src: bytes | None,
    target: bytes,
    fstype: bytes | None,
    flags: int = 0,
    data: bytes | None = None,
) -> None:
    check(libc.mount(src, target, fstype, flags, data), f"mount {target!r}")


def umount(target: bytes, flags: int = 0) -> None:
    check(libc.umount2(target, flags), f"umount {target!r}")


# open_tree(2) and move_mount(2): the same numbers on every architecture (Linux 5.2+)
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH, AT_FDCWD = 1, 4, -100


def clone_tree(path: bytes) -> int:
    """A detached copy of the mount at `path` (open_tree OPEN_TREE_CLONE): its fd."""
    fd: int = libc.syscall(_SYS_OPEN_TREE, AT_FDCWD, path, OPEN_TREE_CLONE | os.O_CLOEXEC)
    if fd < 0:
        check(fd, f"open_tree {path!r}")
    return fd


def attach_tree(fd: int, target: bytes) -> None:
    """move_mount a detached tree (an fd of clone_tree) onto `target`."""
    r = libc.syscall(_SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)
    check(r, f"move_mount onto {target!r}")

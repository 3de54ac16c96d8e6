"""Thin ctypes shells over fanotify, listmount, statmount, statx and the nsfs ioctls.

Each call does the syscall, turns a failure into an `errors` exception that says what
to do, and hands the bytes to `layouts` for decoding. Nothing here keeps state besides
one reusable statmount/listmount buffer per thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import threading

from amountd.model import Mount

from . import consts as c
from .errors import KernelError, MountGone, NamespaceGone, Unsupported, from_errno
from .layouts import (
    IO_EVENT_SIZE,
    FanEvent,
    build_mnt_id_req,
    build_poll_iocb,
    parse_fanotify_events,
    parse_statmount,
    statmount_to_mount,
    unpack_ids,
)

__all__ = [
    "AioPoll",
    "enter_mntns",
    "fanotify_init",
    "fanotify_mark",
    "libc",
    "listmount",
    "listmount_raw",
    "mntns_id",
    "mntns_info",
    "read_fanotify",
    "stat_mount",
    "statmount",
    "statx_mnt_id",
]

libc = ctypes.CDLL(None, use_errno=True)

_syscall = libc.syscall
_syscall.restype = ctypes.c_long

_fanotify_init = libc.fanotify_init
_fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_fanotify_init.restype = ctypes.c_int

_fanotify_mark = libc.fanotify_mark
_fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
_fanotify_mark.restype = ctypes.c_int

_statx = libc.statx
_statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
_statx.restype = ctypes.c_int

_SYS_statmount = ctypes.c_long(c.SYS_statmount)
_SYS_listmount = ctypes.c_long(c.SYS_listmount)
_ZERO = ctypes.c_uint(0)
_CLONE_FS = 0x200
_CLONE_NEWNS = 0x20000

_LISTMOUNT_SOME = "listmount()/statmount()"
_LISTMOUNT_SINCE = "6.8"
_FAN_MNT = "fanotify mount events (FAN_REPORT_MNT, FAN_MARK_MNTNS)"
_FAN_MNT_SINCE = "6.15"

if c.MACHINE.startswith(("alpha", "mips", "ia64")):
    # statmount/listmount have the same number on every arch of the unified syscall
    # table; these three number them differently, and amountd does not run there.
    raise ImportError(f"amountd.kernel does not know the syscall numbers of {c.MACHINE}")


def _fail(what: str, *, feature: str = "", since: str = "") -> KernelError:
    err = ctypes.get_errno()
    return from_errno(err, what, feature=feature, since=since)


# ---------------------------------------------------------------------------- fanotify


def fanotify_init(flags: int, event_f_flags: int = os.O_RDONLY | os.O_CLOEXEC) -> int:
    """A new fanotify group fd (for amountd: FAN_REPORT_MNT | FAN_CLOEXEC | FAN_NONBLOCK)."""
    fd: int = _fanotify_init(flags, event_f_flags)
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL and flags & c.FAN_REPORT_MNT:
            raise Unsupported(err, _FAN_MNT, _FAN_MNT_SINCE)
        if err in (errno.EPERM, errno.EACCES) and flags & c.FAN_UNLIMITED_QUEUE:
            raise from_errno(err, "fanotify_init(FAN_UNLIMITED_QUEUE) needs real root")
        raise from_errno(err, "fanotify_init", feature="fanotify", since="2.6.37")
    return fd


def fanotify_mark(
    fd: int, flags: int, mask: int, dirfd: int = c.AT_FDCWD, path: str | bytes | None = None
) -> None:
    """Add/remove a mark. A namespace mark: FAN_MARK_ADD|FAN_MARK_MNTNS on the ns file
    (its `path`, or `dirfd` = an open ns fd and no path)."""
    p = os.fsencode(path) if path is not None else None
    if _fanotify_mark(fd, flags, mask, dirfd, p) < 0:
        err = ctypes.get_errno()
        mntns = flags & c.FAN_MARK_MNTNS == c.FAN_MARK_MNTNS
        if err == errno.EINVAL and mntns:
            raise Unsupported(err, _FAN_MNT, _FAN_MNT_SINCE)
        what = f"fanotify_mark({path!r})" if path is not None else f"fanotify_mark(fd {dirfd})"
        raise from_errno(err, what)


def read_fanotify(fd: int, size: int = 65536) -> list[FanEvent]:
    """One read() of a group, decoded; [] when nothing is queued (non-blocking fd).

    `size` bounds a batch: 40 bytes an event, so 64 KiB holds ~1,600 events.
    """
    try:
        data = os.read(fd, size)
    except BlockingIOError:
        return []
    return parse_fanotify_events(data)


# ------------------------------------------------------------------ listmount, statmount


class _Buffers(threading.local):
    def __init__(self) -> None:
        self.sm_size = 4096
        self.sm = ctypes.create_string_buffer(self.sm_size)
        self.lm_n = 4096
        self.lm = (ctypes.c_uint64 * self.lm_n)()


_tls = _Buffers()
_U32 = struct.Struct("<I")


def statmount(mnt_id: int, ns_id: int = 0, mask: int = c.STATMOUNT_MOUNT) -> bytes:
    """The raw statmount() answer for a unique mount ID (decode with parse_statmount).

    `ns_id` 0 means the caller's namespace. MountGone when the mount is not (or no
    longer) in that namespace, and also when `ns_id` names no namespace (the kernel
    says ENOENT for both; listmount tells them apart). The buffer is per thread and
    grows on EOVERFLOW.
    """
    req = build_mnt_id_req(mnt_id, mask, ns_id)
    tls = _tls
    while True:
        buf = tls.sm
        r = _syscall(_SYS_statmount, req, buf, ctypes.c_size_t(tls.sm_size), _ZERO)
        if r == 0:
            size = _U32.unpack_from(buf)[0]
            return ctypes.string_at(buf, min(size, tls.sm_size))
        err = ctypes.get_errno()
        if err == errno.EOVERFLOW and tls.sm_size < 1 << 24:
            tls.sm_size *= 4
            tls.sm = ctypes.create_string_buffer(tls.sm_size)
            continue
        if err == errno.ENOENT:
            raise MountGone(mnt_id)
        if err == errno.ENOSYS:
            raise Unsupported(err, _LISTMOUNT_SOME, _LISTMOUNT_SINCE)
        if err == errno.EINVAL and mnt_id < 1 << 31:
            raise KernelError(
                err, f"statmount({mnt_id}): not a unique mount ID (those are >= 2**31)"
            )
        raise from_errno(err, f"statmount({mnt_id})")


def stat_mount(mnt_id: int, ns_id: int = 0) -> Mount:
    """statmount() decoded into the Mount mountinfo would show (MountGone if gone)."""
    return statmount_to_mount(parse_statmount(statmount(mnt_id, ns_id)))


def listmount_raw(
    ns_id: int = 0, *, root: int = c.LSMT_ROOT, after: int = 0, page: int = 0
) -> bytes:
    """Every unique mount ID below `root` (LSMT_ROOT: the whole table), ascending, as the
    kernel writes them: u64s in the machine's byte order. Bytes, each page copied out
    whole, because a caller that only compares lists (layouts.diff_id_lists) need not
    make 10,000 ints.

    `ns_id` 0 means the caller's namespace. NamespaceGone if `ns_id` names none.
    `after`: only IDs above it (unique IDs only grow, so: the mounts made since).
    `page`: IDs asked for per call (0: as many as the buffer holds; libmount asks 512).
    """
    tls = _tls
    buf, n = tls.lm, tls.lm_n
    if 0 < page < n:
        n = page
    size = ctypes.c_size_t(n)
    pages: list[bytes] = []
    last = after
    while True:
        req = build_mnt_id_req(root, last, ns_id)
        r = _syscall(_SYS_listmount, req, buf, size, _ZERO)
        if r < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSYS:
                raise Unsupported(err, _LISTMOUNT_SOME, _LISTMOUNT_SINCE)
            if err == errno.ENOENT and root != c.LSMT_ROOT:
                raise MountGone(root)
            if err == errno.ENOENT and ns_id:
                raise NamespaceGone(err, ns_id)
            raise from_errno(err, f"listmount(ns {ns_id or 'own'})")
        pages.append(ctypes.string_at(buf, r * 8))
        if r < n:
            return pages[0] if len(pages) == 1 else b"".join(pages)
        last = buf[r - 1]


def listmount(
    ns_id: int = 0, *, root: int = c.LSMT_ROOT, after: int = 0, page: int = 0
) -> list[int]:
    """listmount_raw's IDs as ints, for callers that look at each one."""
    return unpack_ids(listmount_raw(ns_id, root=root, after=after, page=page))


# ----------------------------------------------------------------------- statx, nsfs

_STATX_SIZE = 256
_statx_tls = threading.local()
_U64 = struct.Struct("<Q")


def statx_mnt_id(path: str | bytes, dirfd: int = c.AT_FDCWD) -> int:
    """The unique mount ID (the one fanotify and statmount use) of the mount holding path.

    An empty path with a dirfd names the fd itself (AT_EMPTY_PATH).
    """
    buf = getattr(_statx_tls, "buf", None)
    if buf is None:
        buf = _statx_tls.buf = ctypes.create_string_buffer(_STATX_SIZE)
    p = os.fsencode(path)
    flags = c.AT_STATX_DONT_SYNC | (c.AT_EMPTY_PATH if not p else 0)
    if _statx(dirfd, p, flags, c.STATX_MNT_ID_UNIQUE, buf) < 0:
        err = ctypes.get_errno()
        raise from_errno(err, f"statx({path!r})")
    if not _U32.unpack_from(buf)[0] & c.STATX_MNT_ID_UNIQUE:
        raise Unsupported(errno.EINVAL, "statx(STATX_MNT_ID_UNIQUE)", "6.8")
    mnt_id: int = _U64.unpack_from(buf, c.STATX_OFF_MNT_ID)[0]
    return mnt_id


_NS_GET_NSTYPE = 0xB703


def _nsfs_error(fd: int, e: OSError, ioctl: str, since: str) -> KernelError:
    """ENOTTY means "not a namespace file" or "kernel too old": ask which (error path only)."""
    err = e.errno or 0
    if err not in (errno.ENOTTY, errno.EINVAL):
        return from_errno(err, f"ioctl({ioctl})")
    try:
        kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        kind = -1
    if kind != _CLONE_NEWNS:
        return KernelError(err, f"ioctl({ioctl}): fd {fd} is not a mount namespace file")
    return Unsupported(err, f"{ioctl} on mount namespace files", since)


def mntns_id(fd: int) -> int:
    """The 64-bit ID of the mount namespace an nsfs fd refers to (NS_GET_MNTNS_ID)."""
    try:
        out = fcntl.ioctl(fd, c.NS_GET_MNTNS_ID, bytes(8))
    except OSError as e:
        raise _nsfs_error(fd, e, "NS_GET_MNTNS_ID", "6.8") from None
    ns_id: int = _U64.unpack(out)[0]
    return ns_id


_MNT_NS_INFO = struct.Struct("<IIQ")


def mntns_info(fd: int) -> tuple[int, int]:
    """(nr_mounts, ns_id) of the mount namespace an nsfs fd refers to (NS_MNT_GET_INFO)."""
    try:
        out = fcntl.ioctl(fd, c.NS_MNT_GET_INFO, _MNT_NS_INFO.pack(c.MNT_NS_INFO_SIZE_VER0, 0, 0))
    except OSError as e:
        raise _nsfs_error(fd, e, "NS_MNT_GET_INFO", "6.12") from None
    _size, nr_mounts, ns_id = _MNT_NS_INFO.unpack(out)
    return nr_mounts, ns_id


def enter_mntns(fd: int) -> None:
    """Move the calling THREAD (not the process) into the mount namespace of nsfs `fd`.

    For a dedicated worker thread: it first unshares its cwd/root (CLONE_FS) from the
    other threads, then setns(). Why: statmount computes `propagate_from` and
    `mnt_point` against the caller's root, so only a caller inside the namespace gets
    what /proc/PID/mountinfo shows (from outside, propagate_from is always 0).
    """
    if libc.unshare(_CLONE_FS) < 0:
        raise _fail("unshare(CLONE_FS)")
    if libc.setns(fd, _CLONE_NEWNS) < 0:
        raise _fail("setns(CLONE_NEWNS)")


class AioPoll:
    """One-shot POLL requests on one fd through a Linux AIO context of its own: when
    the file fires, the kernel signals eventfd `resfd` (and nothing more, until
    `rearm()`). No thread waits, and nothing is lost between firing and rearming: a
    request polls the file when submitted, so a change made meanwhile fires it at once.

    Raises KernelError where AIO is not to be had (an arch amountd does not know the
    numbers of, CONFIG_AIO off, a seccomp filter, fs.aio-max-nr reached).
    """

    def __init__(self, fd: int, events: int, resfd: int) -> None:
        nums = c.AIO_SYSCALLS.get(c.MACHINE)
        if nums is None:
            raise KernelError(errno.ENOSYS, f"no Linux AIO syscall numbers for {c.MACHINE}")
        self._setup, self._destroy, self._getevents, self._submit = (ctypes.c_long(n) for n in nums)
        ctx = ctypes.c_ulong(0)
        if _syscall(self._setup, ctypes.c_long(1), ctypes.byref(ctx)) != 0:
            raise _fail("io_setup", feature="Linux AIO", since="2.6")
        self._ctx = ctypes.c_ulong(ctx.value)
        self._iocb = ctypes.create_string_buffer(build_poll_iocb(fd, events, resfd), 64)
        self._list = (ctypes.c_void_p * 1)(ctypes.addressof(self._iocb))
        self._events = ctypes.create_string_buffer(IO_EVENT_SIZE)
        self._zero = (ctypes.c_long * 2)(0, 0)
        try:
            self._submit_one()
        except BaseException:
            self.close()
            raise

    def _submit_one(self) -> None:
        if _syscall(self._submit, self._ctx, ctypes.c_long(1), self._list) != 1:
            raise _fail("io_submit(IOCB_CMD_POLL)", feature="AIO poll", since="4.18")

    def rearm(self) -> None:
        """After the eventfd was read: reap the completion that signalled it, poll again."""
        _syscall(self._getevents, self._ctx, ctypes.c_long(0), ctypes.c_long(1), self._events,
                 self._zero)  # fmt: skip
        self._submit_one()

    def close(self) -> None:
        """Destroying the context cancels the request in flight."""
        if self._ctx.value:
            _syscall(self._destroy, self._ctx)
            self._ctx = ctypes.c_ulong(0)

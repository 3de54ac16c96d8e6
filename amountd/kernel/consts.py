"""Kernel constants amountd uses (x86_64, Linux uapi as of 6.18).

The installed userspace headers predate listmount/statmount and fanotify mount events,
so the numbers are written out here; kernel-facts.md records where each was checked.
"""

from __future__ import annotations

import errno as _errno
import platform as _platform

# --- syscall numbers (x86_64). Only statmount/listmount are called by number (the
# unified table gives them the same number almost everywhere); fanotify and statx go
# through their libc wrappers. The rest are for tests and tools. ---
MACHINE = _platform.machine()
SYS_fanotify_init = 300
SYS_fanotify_mark = 301
SYS_statx = 332
SYS_open_tree = 428
SYS_move_mount = 429
SYS_fsopen = 430
SYS_fsconfig = 431
SYS_fsmount = 432
SYS_mount_setattr = 442
SYS_statmount = 457
SYS_listmount = 458

# --- fanotify_init flags ---
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20
FAN_REPORT_PIDFD = 0x80
FAN_REPORT_TID = 0x100
FAN_REPORT_FID = 0x200
FAN_REPORT_MNT = 0x4000

# --- fanotify_mark flags and mark types ---
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_FLUSH = 0x80
FAN_MARK_INODE = 0x0
FAN_MARK_MOUNT = 0x10
FAN_MARK_FILESYSTEM = 0x100
FAN_MARK_MNTNS = 0x110

# --- fanotify event mask bits ---
FAN_Q_OVERFLOW = 0x4000
FAN_MNT_ATTACH = 0x01000000
FAN_MNT_DETACH = 0x02000000

# --- fanotify records ---
FANOTIFY_METADATA_VERSION = 3
FAN_EVENT_METADATA_LEN = 24
FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3
FAN_EVENT_INFO_TYPE_PIDFD = 4
FAN_EVENT_INFO_TYPE_ERROR = 5
FAN_EVENT_INFO_TYPE_RANGE = 6
FAN_EVENT_INFO_TYPE_MNT = 7
FAN_NOFD = -1

# --- listmount / statmount ---
MNT_ID_REQ_SIZE_VER0 = 24
MNT_ID_REQ_SIZE_VER1 = 32
LSMT_ROOT = 0xFFFF_FFFF_FFFF_FFFF
LISTMOUNT_REVERSE = 0x1

STATMOUNT_SB_BASIC = 0x1
STATMOUNT_MNT_BASIC = 0x2
STATMOUNT_PROPAGATE_FROM = 0x4
STATMOUNT_MNT_ROOT = 0x8
STATMOUNT_MNT_POINT = 0x10
STATMOUNT_FS_TYPE = 0x20
STATMOUNT_MNT_NS_ID = 0x40
STATMOUNT_MNT_OPTS = 0x80
STATMOUNT_FS_SUBTYPE = 0x100
STATMOUNT_SB_SOURCE = 0x200
STATMOUNT_OPT_ARRAY = 0x400
STATMOUNT_OPT_SEC_ARRAY = 0x800
STATMOUNT_SUPPORTED_MASK = 0x1000
STATMOUNT_MNT_UIDMAP = 0x2000
STATMOUNT_MNT_GIDMAP = 0x4000

#: Everything a `Mount` is built from (what the hot path asks for).
STATMOUNT_MOUNT = (
    STATMOUNT_SB_BASIC
    | STATMOUNT_MNT_BASIC
    | STATMOUNT_PROPAGATE_FROM
    | STATMOUNT_MNT_ROOT
    | STATMOUNT_MNT_POINT
    | STATMOUNT_FS_TYPE
    | STATMOUNT_MNT_NS_ID
    | STATMOUNT_MNT_OPTS
    | STATMOUNT_FS_SUBTYPE
    | STATMOUNT_SB_SOURCE
)
#: Every field 6.18 knows.
STATMOUNT_ALL = 0x7FFF
#: The fixed part of struct statmount; the string area starts here.
STATMOUNT_FIXED_SIZE = 512

# --- mnt_attr (struct statmount.mnt_attr, mount_setattr) ---
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_IDMAP = 0x100000
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

# --- superblock flags (struct statmount.sb_flags) ---
SB_RDONLY = 1
SB_SYNCHRONOUS = 16
SB_MANDLOCK = 64
SB_DIRSYNC = 128
SB_LAZYTIME = 1 << 25

# --- mount(2) flags; also struct statmount.mnt_propagation bits ---
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 2

# --- statx ---
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_STATX_DONT_SYNC = 0x4000
STATX_MNT_ID = 0x1000
STATX_MNT_ID_UNIQUE = 0x4000
STATX_SIZE = 0x100
STATX_OFF_MASK = 0x0
STATX_OFF_MNT_ID = 0x90

# --- nsfs ioctls ---
NS_GET_MNTNS_ID = 0x8008B705
NS_MNT_GET_INFO = 0x8010B70A
NS_MNT_GET_NEXT = 0x8010B70B
NS_MNT_GET_PREV = 0x8010B70C
NS_GET_ID = 0x8008B70D
MNT_NS_INFO_SIZE_VER0 = 16

# errno names used by errors.py (re-exported for callers that match on them)
ENOENT = _errno.ENOENT
EINVAL = _errno.EINVAL
EOVERFLOW = _errno.EOVERFLOW


# --- Linux AIO, for IOCB_CMD_POLL (4.18+): the kernel polls a file for us and signals an
# eventfd when it fires. Called by number: glibc has no wrappers. (io_setup, io_destroy,
# io_getevents, io_submit) per arch; elsewhere amountd polls with a thread instead. ---
AIO_SYSCALLS: dict[str, tuple[int, int, int, int]] = {
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
    "riscv64": (0, 1, 4, 2),
    "loongarch64": (0, 1, 4, 2),
    "ppc64le": (227, 228, 229, 230),
    "s390x": (243, 244, 245, 246),
}
IOCB_CMD_POLL = 5
IOCB_FLAG_RESFD = 1 << 0

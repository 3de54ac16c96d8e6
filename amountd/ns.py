"""Which mount namespace to watch: `--ns PID|NSPATH` resolved once, with clear errors."""

from __future__ import annotations

import errno
import fcntl
import os

import msgspec

from .errors import NamespaceError

__all__ = ["Namespace", "find_pid", "mntns_id", "resolve_ns"]

NS_GET_NSTYPE = 0xB703
CLONE_NEWNS = 0x00020000


class Namespace(msgspec.Struct, frozen=True):
    """A mount namespace, named by the file that opens it and, where known, a process in it."""

    path: str
    pid: int | None
    ns_id: int | None
    inode: int
    dev: int

    @property
    def label(self) -> str:
        return f"pid {self.pid}" if self.pid is not None else self.path


def mntns_id(fd: int) -> int | None:
    """The 64-bit namespace ID (Linux 6.8+), or None on an older kernel."""
    from .kernel.errors import KernelError
    from .kernel.syscalls import mntns_id as ns_id_of

    try:
        return ns_id_of(fd)
    except KernelError:
        return None


def _open_ns(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(f"{what} does not exist") from None
    except PermissionError:
        raise NamespaceError(
            f"cannot open {path}: watching another process's mount namespace needs root "
            "(CAP_SYS_ADMIN and CAP_SYS_PTRACE over it); run amountd as root"
        ) from None
    except OSError as e:
        raise NamespaceError(f"cannot open {path}: {e.strerror}") from None


def find_pid(ns: Namespace) -> int | None:
    """A live process in the namespace (mountinfo is read through /proc/PID/)."""
    return _pid_of(ns.inode, ns.dev)


def _pid_of(inode: int, dev: int) -> int | None:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{name}/ns/mnt")
        except OSError:
            continue
        if st.st_ino == inode and st.st_dev == dev:
            return int(name)
    return None


def resolve_ns(spec: str | int | None) -> Namespace:
    """None: our own namespace; a PID: that process's; else a namespace file path."""
    if spec is None:
        spec = os.getpid()
    if isinstance(spec, int) or spec.isdigit():
        pid = int(spec)
        if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
            raise NamespaceError(f"no process with PID {pid}: give --ns the PID of a live process")
        path = f"/proc/{pid}/ns/mnt"
        fd = _open_ns(path, f"process {pid}")
    else:
        path = spec
        fd = _open_ns(path, f"namespace file {path}")
        pid = None
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                raise NamespaceError(
                    f"{path} is not a namespace file: "
                    "give --ns a PID or a path like /proc/PID/ns/mnt"
                ) from None
            raise NamespaceError(f"cannot inspect {path}: {e.strerror}") from None
        if kind != CLONE_NEWNS:
            raise NamespaceError(f"{path} is a namespace, but not a mount namespace")
        st = os.fstat(fd)
        ns_id = mntns_id(fd)
    finally:
        os.close(fd)
    if pid is None:
        pid = _pid_of(st.st_ino, st.st_dev)
    return Namespace(path=path, pid=pid, ns_id=ns_id, inode=st.st_ino, dev=st.st_dev)

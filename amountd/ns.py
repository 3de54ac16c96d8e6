"""Which mount namespace to watch: `--ns PID|NSPATH` resolved once, with clear errors."""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import struct
from collections.abc import Iterator

import msgspec

from .errors import NamespaceError

__all__ = [
    "Namespace",
    "all_namespaces",
    "find_pid",
    "locate",
    "mntns_id",
    "namespace_of",
    "open_ns",
    "own_ns_id",
    "pids_by_inode",
    "resolve_ns",
    "walk_namespaces",
]

NS_GET_NSTYPE = 0xB703
CLONE_NEWNS = 0x00020000


class Namespace(msgspec.Struct, frozen=True):
    """A mount namespace: the file that opens it (None for one that no process is in,
    found by the kernel's walk), and, where known, a process in it."""

    path: str | None
    pid: int | None
    ns_id: int | None
    inode: int
    dev: int

    @property
    def label(self) -> str:
        if self.pid is not None:
            return f"pid {self.pid}"
        return self.path or f"mount namespace {self.ns_id}"


def mntns_id(fd: int) -> int | None:
    """The 64-bit namespace ID (Linux 6.8+), or None on an older kernel."""
    from .kernel.errors import KernelError
    from .kernel.syscalls import mntns_id as ns_id_of

    try:
        return ns_id_of(fd)
    except KernelError:
        return None


@functools.cache
def own_ns_id() -> int | None:
    """Our own mount namespace's ID (a process does not change it under amountd)."""
    fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mntns_id(fd)
    finally:
        os.close(fd)


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


def locate(ns: Namespace) -> Namespace | None:
    """The namespace as it can be opened now, or None if it is gone. Its file may have
    gone with the process it was found through while the namespace lives on (another
    process in it, or none but held by a mount or an fd): then through another process,
    else by the kernel's walk. Blocking (a /proc scan at worst): run it in a thread."""
    here = (ns.dev, ns.inode)
    if ns.path is not None and _stat_key(ns.path) == here:
        if ns.pid is not None and _stat_key(f"/proc/{ns.pid}/ns/mnt") == here:
            return ns
        return msgspec.structs.replace(ns, pid=find_pid(ns))
    pid = find_pid(ns)
    if pid is not None:
        return msgspec.structs.replace(ns, path=f"/proc/{pid}/ns/mnt", pid=pid)
    if ns.ns_id is not None and ns.ns_id in _listed_ids():
        return msgspec.structs.replace(ns, path=None, pid=None)
    return None


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _listed_ids() -> set[int]:
    """The IDs of every mount namespace the kernel's walk shows us (empty without it)."""
    from .kernel import consts as c

    own = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        ids = {i for i in (mntns_id(own),) if i is not None}
        for op in (c.NS_MNT_GET_PREV, c.NS_MNT_GET_NEXT):
            ids.update(ns_id for _fd, ns_id in walk_namespaces(own, op))
    finally:
        os.close(own)
    return ids


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


_INFO = struct.Struct("<IIQ")


def walk_namespaces(start: int, op: int) -> Iterator[tuple[int, int]]:
    """(fd, ns_id) of each namespace after (or before) `start`, in ID order; the caller
    must not keep the fds: an open namespace fd keeps the namespace alive."""
    cur = os.dup(start)
    try:
        while True:
            buf = bytearray(_INFO.pack(_INFO.size, 0, 0))
            try:
                nxt = fcntl.ioctl(cur, op, buf)
            except OSError:
                return
            os.close(cur)
            cur = nxt
            yield cur, _INFO.unpack(buf)[2]
    finally:
        os.close(cur)


def pids_by_inode() -> dict[tuple[int, int], int]:
    """(dev, inode) of each mount namespace a process is in -> one such process."""
    out: dict[tuple[int, int], int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                st = os.stat(f"/proc/{name}/ns/mnt")
            except OSError:
                continue
            out.setdefault((st.st_dev, st.st_ino), int(name))
    return out


def all_namespaces() -> list[Namespace]:
    """Every mount namespace we may see: the kernel's walk (NS_MNT_GET_NEXT/PREV, Linux
    6.12+, which finds namespaces no process is in), else one per process in /proc."""
    from .kernel import consts as c

    pids = pids_by_inode()
    found: dict[int, Namespace] = {}
    own = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(own)
        own_id = mntns_id(own)
        if own_id is not None:
            found[st.st_ino] = namespace_of(pids.get((st.st_dev, st.st_ino)), st, own_id)
            for op in (c.NS_MNT_GET_PREV, c.NS_MNT_GET_NEXT):
                for fd, ns_id in walk_namespaces(own, op):
                    fst = os.fstat(fd)
                    found[fst.st_ino] = namespace_of(pids.get((fst.st_dev, fst.st_ino)), fst, ns_id)
    finally:
        os.close(own)
    if len(found) <= 1:  # no walk here (old kernel, or not allowed): processes only
        for pid in sorted(pids.values()):
            try:
                ns = resolve_ns(pid)
            except NamespaceError:
                continue
            found.setdefault(ns.inode, ns)
    return sorted(found.values(), key=lambda n: (n.ns_id or 0, n.inode))


def namespace_of(pid: int | None, st: os.stat_result, ns_id: int) -> Namespace:
    """The namespace behind `st` (a stat of its file), with a process in it if known."""
    path = f"/proc/{pid}/ns/mnt" if pid is not None else None
    return Namespace(path=path, pid=pid, ns_id=ns_id, inode=st.st_ino, dev=st.st_dev)


def open_ns(ns: Namespace) -> int:
    """An fd on the namespace, for marking; close it at once after (it keeps ns alive)."""
    if ns.path is not None:
        return _open_ns(ns.path, ns.label)
    from .kernel import consts as c

    own = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for op in (c.NS_MNT_GET_PREV, c.NS_MNT_GET_NEXT):
            for fd, ns_id in walk_namespaces(own, op):
                if ns_id == ns.ns_id:
                    return os.dup(fd)
    finally:
        os.close(own)
    raise NamespaceError(f"{ns.label} is gone")

"""I/O: what runs in a mount namespace, from the cgroup of a process in it, cached.

The naming is pure (amountd.container); this is the thin shell that finds a process
in a namespace and reads its `/proc/PID/cgroup`.
"""

from __future__ import annotations

import os
import time

from .container import Container, container_of_cgroup, parse_cgroup

__all__ = ["ContainerLookup", "cgroup_path", "container_of_pid"]


def container_of_pid(pid: int | None) -> Container | None:
    """What process `pid` runs in (None: no pid, gone, or the root cgroup)."""
    return None if pid is None else container_of_cgroup(cgroup_path(pid))


def cgroup_path(pid: int) -> str | None:
    """The cgroup of process `pid` (None if it is gone or has none we can read)."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="surrogateescape") as f:
            return parse_cgroup(f.read())
    except OSError:
        return None


class ContainerLookup:
    """ns_id -> Container, cached per namespace (a namespace never changes container;
    IDs are never reused). A namespace not seen yet costs one /proc scan, at most one
    per `rescan` seconds; `hint(ns_id, pid)` saves even that when a process is known."""

    def __init__(self, rescan: float = 1.0, limit: int = 4096) -> None:
        self._cache: dict[int, Container | None] = {}
        self._pids: dict[int, int] = {}
        self._scanned = -1e9
        self._rescan = rescan
        self._limit = limit

    def hint(self, ns_id: int | None, pid: int | None) -> None:
        if ns_id is not None and pid is not None:
            self._pids[ns_id] = pid

    def remember(self, ns_id: int, container: Container) -> None:
        """What a source found when it met the namespace (its process may be gone by its
        end, when the frame still names the container)."""
        self._cache[ns_id] = container

    def __call__(self, ns_id: int) -> Container | None:
        if ns_id in self._cache:
            return self._cache[ns_id]
        pid = self._pids.get(ns_id)
        if pid is None:
            now = time.monotonic()
            if now - self._scanned < self._rescan:
                return None
            self._scanned = now
            self._pids.update(_pids_by_ns_id())
            pid = self._pids.get(ns_id)
            if pid is None:
                return None
        c = container_of_pid(pid)
        if c is None and not os.path.exists(f"/proc/{pid}"):
            self._pids.pop(ns_id, None)  # that process is gone: look again next time
            return None
        if len(self._cache) >= self._limit:
            self._cache.clear()
        self._cache[ns_id] = c
        return c


def _pids_by_ns_id() -> dict[int, int]:
    """One process per mount namespace in /proc (the first found), by namespace ID."""
    from .ns import mntns_id, pids_by_inode

    out: dict[int, int] = {}
    for pid in pids_by_inode().values():
        try:
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            ns_id = mntns_id(fd)
        finally:
            os.close(fd)
        if ns_id is not None:
            out.setdefault(ns_id, pid)
    return out

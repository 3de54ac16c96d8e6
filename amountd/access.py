"""Who may see which mount namespaces: a mount table tells a lot about the containers
on a host, so a subscriber sees, by default, only what its credentials allow.

- Unix socket: the kernel's record of the peer at connect() (SO_PEERCRED: pid, uid,
  gid; SO_PEERGROUPS: its other groups). Root and members of the socket's group see
  every namespace; any other uid sees the namespaces its own processes are in (by
  real uid), as /proc shows them when it subscribes. That is computed once: a
  namespace its processes enter later shows only to a new subscription.
- TCP with a token: a valid token sees everything (the token is the credential).
  Loopback TCP without a token: the peer is found by its socket in /proc/net/tcp
  (whose owner is its uid) and treated like a Unix peer outside the socket's group;
  one that cannot be found is refused.
- A subscriber names namespaces by ID (`namespaces`) or by PID (`pids`, resolved
  here): asking for one it may not see is refused ("forbidden"), naming none means
  every namespace it may see.

The decisions are pure functions over plain values (`sees_all`, `own_namespaces`,
`scope_filter`, `tcp_owner`); the rest reads the kernel's answers.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections.abc import Iterable, Mapping

import msgspec

from .filter import Filter
from .ns import mntns_id
from .protocol import ProtocolError, SubscribeRequest

__all__ = [
    "Peer",
    "ProcNs",
    "own_namespaces",
    "process_namespaces",
    "resolve_pids",
    "scope_filter",
    "scope_request",
    "sees_all",
    "tcp_owner",
    "tcp_peer_uid",
    "unix_peer",
]

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")


class Peer(msgspec.Struct, frozen=True, kw_only=True):
    """Who is connected: uid and groups, and (Unix sockets) the pid at connect()."""

    uid: int
    gid: int | None = None
    pid: int | None = None
    groups: tuple[int, ...] = ()


class ProcNs(msgspec.Struct, frozen=True):
    """One process: its real uid and the ID of its mount namespace."""

    pid: int
    uid: int
    ns_id: int


# --- pure decisions --------------------------------------------------------------------


def sees_all(peer: Peer, socket_gid: int | None) -> bool:
    """Root, and members of the socket's group (primary or supplementary)."""
    if peer.uid == 0:
        return True
    if socket_gid is None:
        return False
    return peer.gid == socket_gid or socket_gid in peer.groups


def own_namespaces(uid: int, procs: Iterable[ProcNs]) -> frozenset[int]:
    """The namespaces that processes of `uid` are in."""
    return frozenset(p.ns_id for p in procs if p.uid == uid)


def scope_filter(
    f: Filter,
    allowed: frozenset[int] | None,
    pid_ns: Mapping[int, int | None],
    *,
    who: str = "",
    container_ns: Mapping[str, Iterable[int]] | None = None,
) -> Filter:
    """The subscriber's filter with its namespaces settled: `pids` resolved (through
    `pid_ns`), narrowed to `allowed` (None: everything). Raises ProtocolError
    ("forbidden") for a namespace it may not see, ("bad-request") for a PID with no
    process."""
    wanted: set[int] | None = None if f.namespaces is None else set(f.namespaces)
    if f.pids:
        wanted = wanted if wanted is not None else set()
        for pid in f.pids:
            ns = pid_ns.get(pid)
            if ns is None:
                raise ProtocolError(
                    "bad-request", f"no process with PID {pid} (in 'pids'), or it has no namespace"
                )
            wanted.add(ns)
    if f.containers:
        wanted = wanted if wanted is not None else set()
        for spec in f.containers:
            found = set((container_ns or {}).get(spec, ()))
            if not found:
                raise ProtocolError(
                    "bad-request",
                    f"no running container matches {spec!r} (in 'containers'): give an ID, "
                    "a prefix, a pod UID, or RUNTIME:PREFIX",
                )
            wanted |= found
    if allowed is not None:
        if wanted is None:
            wanted = set(allowed)
        denied = wanted - allowed
        if denied:
            ids = ", ".join(str(n) for n in sorted(denied))
            raise ProtocolError(
                "forbidden",
                f"mount namespace {ids} is not yours to see: a client that is neither root "
                "nor in the socket's group sees only the mount namespaces its own processes "
                f"are in ({who or 'you'})",
            )
    spaces = None if wanted is None else sorted(wanted)
    if spaces == f.namespaces and not f.pids and not f.containers:
        return f
    return msgspec.structs.replace(f, namespaces=spaces, pids=None, containers=None)


def _hex_addr(ip: str) -> tuple[str, ...]:
    """How /proc/net/tcp{,6} writes an address (each 32-bit word in host byte order)."""
    out = []
    try:
        raw = socket.inet_pton(socket.AF_INET6, ip)
    except OSError:
        raw = socket.inet_pton(socket.AF_INET, ip)
        out.append(f"{int.from_bytes(raw, sys.byteorder):08X}")
        raw = b"\0" * 10 + b"\xff\xff" + raw  # the same peer, seen through a v6 socket
    else:
        if raw[:12] == b"\0" * 10 + b"\xff\xff":  # v4-mapped: the peer may be plain v4
            out.append(f"{int.from_bytes(raw[12:], sys.byteorder):08X}")
    words = (raw[i : i + 4] for i in range(0, 16, 4))
    out.append("".join(f"{int.from_bytes(w, sys.byteorder):08X}" for w in words))
    return tuple(out)


def tcp_owner(table: str, peer: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid that owns the TCP socket whose local end is `peer` and remote end
    `server`, in the text of /proc/net/tcp or tcp6 (None if it is not there)."""
    locals_ = {f"{a}:{peer[1]:04X}" for a in _hex_addr(peer[0])}
    remotes = {f"{a}:{server[1]:04X}" for a in _hex_addr(server[0])}
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[1] in locals_ and fields[2] in remotes:
            return int(fields[7])
    return None


# --- what the kernel says ----------------------------------------------------------------


def unix_peer(sock: socket.socket) -> Peer:
    """SO_PEERCRED and SO_PEERGROUPS: the peer as it was at connect()."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    groups: tuple[int, ...] = ()
    size = 256 * 4
    while size <= 65536 * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                size *= 16
                continue
            break  # no SO_PEERGROUPS (before Linux 4.13): the primary group only
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
        break
    return Peer(uid=uid, gid=gid, pid=pid if pid > 0 else None, groups=groups)


def tcp_peer_uid(sock: socket.socket) -> int | None:
    """The uid of a loopback peer's socket, from /proc/net/tcp{,6}."""
    try:
        peer = sock.getpeername()[:2]
        server = sock.getsockname()[:2]
    except OSError:
        return None
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, encoding="ascii") as f:
                uid = tcp_owner(f.read(), peer, server)
        except OSError:
            continue
        if uid is not None:
            return uid
    return None


def _real_uid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ns_id_of(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return mntns_id(fd)
    finally:
        os.close(fd)


def process_namespaces(uid: int | None = None) -> list[ProcNs]:
    """Every process (of `uid`, if given) with its mount namespace's ID, from /proc.
    One open + ioctl per distinct namespace, a stat per process."""
    by_inode: dict[tuple[int, int], int | None] = {}
    out: list[ProcNs] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        ruid = _real_uid(name)
        if ruid is None or (uid is not None and ruid != uid):
            continue
        path = f"/proc/{name}/ns/mnt"
        try:
            st = os.stat(path)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key not in by_inode:
            by_inode[key] = _ns_id_of(path)
        ns_id = by_inode[key]
        if ns_id is not None:
            out.append(ProcNs(int(name), ruid, ns_id))
    return out


def resolve_pids(pids: Iterable[int]) -> dict[int, int | None]:
    """Each PID's mount namespace ID (None: no such process, or no ID)."""
    return {pid: _ns_id_of(f"/proc/{pid}/ns/mnt") if pid > 0 else None for pid in pids}


def resolve_containers(specs: Iterable[str]) -> dict[str, set[int]]:
    """Each `containers` spec -> the mount namespaces of the processes whose cgroup
    names a matching container (one /proc scan, reading each process's cgroup)."""
    from .cgroups import container_of_pid

    specs = list(specs)
    out: dict[str, set[int]] = {s: set() for s in specs}
    by_inode: dict[tuple[int, int], int | None] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        c = container_of_pid(int(name))
        if c is None:
            continue
        matched = [s for s in specs if c.matches(s)]
        if not matched:
            continue
        path = f"/proc/{name}/ns/mnt"
        try:
            st = os.stat(path)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key not in by_inode:
            by_inode[key] = _ns_id_of(path)
        ns_id = by_inode[key]
        if ns_id is not None:
            for s in matched:
                out[s].add(ns_id)
    return out


def scope_request(
    req: SubscribeRequest,
    sock: socket.socket | None,
    *,
    token: bool,
    socket_gid: int | None,
) -> SubscribeRequest:
    """The request with its namespaces settled for this peer (see the module doc).
    Blocking (it may scan /proc): run it in a thread."""
    allowed: frozenset[int] | None = None
    who = ""
    if not token:
        if sock is None:
            raise ProtocolError("forbidden", "cannot tell who is connected")
        if sock.family == socket.AF_UNIX:
            peer = unix_peer(sock)
            restricted = not sees_all(peer, socket_gid)
        else:
            uid = tcp_peer_uid(sock)
            if uid is None:
                raise ProtocolError(
                    "forbidden",
                    "cannot tell which user is connected over TCP: use the Unix socket, "
                    "or a listener with --token-file",
                )
            peer = Peer(uid=uid)
            restricted = uid != 0
        if restricted:
            who = f"uid {peer.uid}"
            allowed = own_namespaces(peer.uid, process_namespaces(peer.uid))
    f = req.filter
    if allowed is None and not f.pids and not f.containers:
        return req
    pid_ns = resolve_pids(f.pids) if f.pids else {}
    container_ns = resolve_containers(f.containers) if f.containers else None
    scoped = scope_filter(f, allowed, pid_ns, who=who, container_ns=container_ns)
    return req if scoped is f else msgspec.structs.replace(req, filter=scoped)

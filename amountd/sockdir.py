"""The Unix socket's file and directory, as strict as sshd's StrictModes.

A root daemon's socket is only as trustworthy as the directories above it: a user who
can write one of them can rename the socket away and put their own in its place, and
root's `amountd subscribe` would then print what that user wants. So, before binding:

- the socket's directory and every ancestor must be owned by root or by the server's
  own uid, and writable by nobody else (no group or other write bit), unless sticky
  (/tmp: others may create there but not rename or remove what is ours);
- a symlink on the way must be owned by root or the server's uid;
- at most the last directory level is created (a missing parent is a typo, or a
  directory some package should have made: said in one line, not made silently).

The socket is then bound inside a fresh private directory (mkdtemp: 0700, a random
name), given its mode and group there, where nobody else can reach or swap it, and
renamed into place: no path is followed where another user could have put something.

Clients check the other side too (`peer_problem`): the server's SO_PEERCRED uid must be
root's or the client's own, or one the caller names (`server_uid`).

`unsafe_reason` and `peer_problem` are pure; the rest is the thin shell around them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Iterable

import msgspec

from .errors import AmountdError

__all__ = [
    "Node",
    "bind_unix",
    "check_socket_dir",
    "check_stale",
    "peer_problem",
    "precheck",
    "prepare_dir",
    "server_uid_of",
    "stat_chain",
    "unsafe_reason",
]

log = logging.getLogger("amountd.server")


class Node(msgspec.Struct, frozen=True):
    """One path on the way to the socket, as lstat() saw it."""

    path: str
    uid: int
    mode: int


def _trusted(uid: int, own_uid: int) -> bool:
    return uid in (0, own_uid)


def unsafe_reason(nodes: Iterable[Node], own_uid: int) -> str | None:
    """Pure: why a socket may not live under these paths (None: it may).

    `nodes` are the socket's directory and its ancestors, and any symlink met on the
    way, each as lstat() saw it. The answer is one sentence naming the path."""
    for n in nodes:
        if stat.S_ISLNK(n.mode):
            if not _trusted(n.uid, own_uid):
                return (
                    f"{n.path} is a symlink owned by uid {n.uid} (not root or uid {own_uid}): "
                    "that user decides where it points"
                )
            continue
        if not stat.S_ISDIR(n.mode):
            return f"{n.path} is not a directory"
        if not _trusted(n.uid, own_uid):
            return (
                f"{n.path} is owned by uid {n.uid} (not root or uid {own_uid}): "
                "that user could replace the socket"
            )
        writable = n.mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not n.mode & stat.S_ISVTX:
            who = "its group" if writable == stat.S_IWGRP else "other users"
            return (
                f"{n.path} is writable by {who} (mode {stat.S_IMODE(n.mode):04o}) and not "
                "sticky: they could replace the socket"
            )
    return None


def peer_problem(peer_uid: int, own_uid: int, server_uid: int | None) -> str | None:
    """Pure: why a client should not trust a server running as `peer_uid` (None: it
    may). Trusted: root, the client's own uid, and `server_uid` when the caller names one."""
    if peer_uid in (0, own_uid) or peer_uid == server_uid:
        return None
    return (
        f"the server runs as uid {peer_uid}, not root or uid {own_uid}: another user may "
        f"have put their socket there (trust it with --server-uid {peer_uid}, or "
        f"server_uid={peer_uid})"
    )


def _prefixes(path: str) -> list[str]:
    """`/a/b/c` -> [`/`, `/a`, `/a/b`, `/a/b/c`] (an absolute, normalised path)."""
    out = ["/"]
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts)):
        out.append("/" + "/".join(parts[: i + 1]))
    return out


def stat_chain(directory: str) -> list[Node]:
    """lstat() of every path from / to `directory` as written (symlinks included),
    then of every directory on its real path. Raises OSError."""
    seen: dict[str, Node] = {}
    real = os.path.realpath(directory)
    for p in [*_prefixes(os.path.abspath(directory)), *_prefixes(real)]:
        if p not in seen:
            st = os.lstat(p)
            seen[p] = Node(p, st.st_uid, st.st_mode)
    return list(seen.values())


def check_socket_dir(directory: str, own_uid: int | None = None) -> None:
    """AmountdError (one line) unless `directory` is safe for the socket (module doc)."""
    uid = os.geteuid() if own_uid is None else own_uid
    try:
        nodes = stat_chain(directory)
    except OSError as e:
        raise AmountdError(
            f"cannot check the socket directory {directory}: {e.strerror or e}"
            + (f" ({e.filename})" if e.filename else "")
        ) from None
    why = unsafe_reason(nodes, uid)
    if why is not None:
        raise AmountdError(f"refusing the socket directory {directory}: {why}")


def prepare_dir(directory: str) -> None:
    """Create the socket's directory if it is missing, but only that last level."""
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory.rstrip("/")) or "/"
    if not os.path.isdir(parent):
        raise AmountdError(
            f"cannot create the socket directory {directory}: its parent {parent} does not "
            "exist (amountd creates only the last level; create it, or choose another --unix)"
        )
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:
        return  # made meanwhile: checked like any other
    except OSError as e:
        raise AmountdError(
            f"cannot create the socket directory {directory}: {e.strerror or e}"
        ) from None
    log.info("created the socket directory %s", directory)


def check_stale(path: str) -> None:
    """A socket nobody listens on is replaced; a live server or another file is not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise AmountdError(f"cannot look at {path}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise AmountdError(f"{path} exists and is not a socket: remove it or choose another --unix")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("replacing the stale socket %s", path)
        return
    except OSError:
        return  # cannot tell (e.g. a full backlog); binding will say
    finally:
        probe.close()
    raise AmountdError(
        f"another server is listening on {path}: stop it first, or choose another --unix"
    )


def precheck(path: str) -> None:
    """Everything bind_unix checks, before a server opens anything else: a socket it
    cannot bind is said at once, in one line, not after reading a mount table."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    prepare_dir(directory)
    check_socket_dir(directory)
    check_stale(path)


def bind_unix(
    path: str, mode: int, gid: int | None, *, backlog: int = 4096
) -> tuple[socket.socket, int]:
    """A listening socket at `path`, with its mode and group set before anyone can
    reach it; returns it and the socket file's inode (to remove only our own later).

    Checks the directory (check_socket_dir), binds in a private mkdtemp directory,
    sets mode and group there, renames into place. Raises AmountdError (one line)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    prepare_dir(directory)
    check_socket_dir(directory)
    check_stale(path)
    try:
        private = tempfile.mkdtemp(prefix=".amountd-", dir=directory)
    except OSError as e:
        raise AmountdError(f"cannot listen on {path}: {e.strerror or e}") from None
    inner = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(inner)
        # Only we can reach `inner` (its directory is ours, 0700): chmod and chown by
        # path follow nothing another user could have placed.
        os.chmod(inner, mode)
        if gid is not None:
            os.chown(inner, -1, gid)
        sock.listen(backlog)
        os.rename(inner, path)
        ino = os.lstat(path).st_ino
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(inner)
        raise AmountdError(f"cannot listen on {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return sock, ino


def server_uid_of(sock: socket.socket) -> int:
    """The uid at the other end of a connected Unix socket (SO_PEERCRED)."""
    import struct

    ucred = struct.Struct("3i")
    _, uid, _ = ucred.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, ucred.size))
    return int(uid)

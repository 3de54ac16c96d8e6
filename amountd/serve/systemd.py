"""systemd's service protocols, with the stdlib alone: sd_notify and socket activation.

`notify()` speaks the sd_notify(3) datagram protocol to `$NOTIFY_SOCKET`, so
`Type=notify` knows when the first snapshot is built, `systemctl status` shows our
counts, and `WatchdogSec=` can restart a wedged server. `listen_fds()` takes the sockets
systemd opened for us (`amountd.socket`), as sd_listen_fds(3) does: a socket that
systemd holds keeps accepting connections while the service restarts.

Outside systemd every function is a cheap no-op, so the server calls them
unconditionally.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket

from ..errors import AmountdError

__all__ = [
    "SD_LISTEN_FDS_START",
    "SystemdError",
    "listen_fds",
    "notify",
    "ready",
    "socket_for",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger("amountd.systemd")  # its name before the move to serve/

SD_LISTEN_FDS_START = 3
"""The first passed fd: systemd hands sockets over as fds 3, 4, ... (sd_listen_fds(3))."""


class SystemdError(AmountdError):
    """The environment systemd gave us is malformed (LISTEN_FDS, LISTEN_PID)."""


def _address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET's address: a path, or `@name` for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Linux abstract socket: a leading NUL byte instead of the "@".
        return b"\0" + value[1:].encode()
    return None


def notify(state: str) -> bool:
    """Send one sd_notify message (e.g. "READY=1\\nSTATUS=..."); True if it was sent.

    False, without a word, when NOTIFY_SOCKET is unset (not run by systemd); False with
    a warning when it is set but unusable: a daemon must not die because its
    supervisor's socket went away.
    """
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    address = _address(where)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r: only Unix socket addresses are supported", where)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Bounded: this runs on the event loop, and a receiver whose queue is full
            # must not stall it for long.
            sock.settimeout(1.0)
            sock.sendto(state.encode(), address)
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", where, e.strerror or e)
        return False
    return True


def _one_line(text: str) -> str:
    """A STATUS= value is one line: a newline would start another assignment."""
    return " ".join(text.split())


def ready(status_text: str | None = None) -> bool:
    """The service is up (Type=notify): send after the first snapshot is built."""
    msg = "READY=1"
    if status_text:
        msg += f"\nSTATUS={_one_line(status_text)}"
    return notify(msg)


def status(text: str) -> bool:
    """A one-line state for `systemctl status` (counts, subscribers)."""
    return notify(f"STATUS={_one_line(text)}")


def stopping(status_text: str | None = None) -> bool:
    """The service has begun to shut down: systemd stops waiting for READY/WATCHDOG."""
    msg = "STOPPING=1"
    if status_text:
        msg += f"\nSTATUS={_one_line(status_text)}"
    return notify(msg)


def watchdog() -> bool:
    """One keep-alive ping; send every `watchdog_interval() / 2` seconds."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds (WATCHDOG_USEC), or None when there is none.

    Like sd_watchdog_enabled(3): WATCHDOG_PID, when set, must be our PID (the variables
    may have leaked to a child of the service). Ping at half this interval.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r: not a number", pid)
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return None
    if value <= 0:
        return None
    return value / 1_000_000


def _unset_listen_env() -> None:
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)


def listen_fds(*, unset_environment: bool = True) -> list[tuple[int, str]]:
    """The sockets systemd passed us, as (fd, name) pairs from fd 3 on; [] when none.

    Names come from LISTEN_FDNAMES (`FileDescriptorName=`; systemd's default is the
    socket unit's name, e.g. "amountd.socket"), "unknown" where none is given. The
    variables are removed afterwards, as sd_listen_fds(1) does, so that a child process
    cannot take our fds for its own; each fd is made close-on-exec for the same reason.
    A LISTEN_PID other than ours means the variables were meant for another process:
    then there are no fds for us.
    """
    try:
        pid_text = os.environ.get("LISTEN_PID")
        if not pid_text:
            return []
        try:
            pid = int(pid_text)
        except ValueError:
            raise SystemdError(f"bad LISTEN_PID={pid_text!r}: not a process ID") from None
        if pid != os.getpid():
            return []
        count_text = os.environ.get("LISTEN_FDS", "")
        try:
            count = int(count_text)
        except ValueError:
            raise SystemdError(f"bad LISTEN_FDS={count_text!r}: not a number") from None
        if count < 0:
            raise SystemdError(f"bad LISTEN_FDS={count_text!r}: negative")
        names_text = os.environ.get("LISTEN_FDNAMES")
        names = names_text.split(":") if names_text else []
        if names_text is not None and len(names) != count:
            log.warning(
                "LISTEN_FDNAMES names %d sockets but LISTEN_FDS passes %d", len(names), count
            )
        names = (names + ["unknown"] * count)[:count]
        result: list[tuple[int, str]] = []
        for i in range(count):
            fd = SD_LISTEN_FDS_START + i
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFD)
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            except OSError:
                raise SystemdError(
                    f"LISTEN_FDS={count} but fd {fd} is not open: was amountd started "
                    "by something other than systemd?"
                ) from None
            result.append((fd, names[i] or "unknown"))
        return result
    finally:
        if unset_environment:
            _unset_listen_env()


def socket_for(fd: int) -> socket.socket:
    """A non-blocking socket object that owns a passed fd (family and type from the fd).

    Refuses anything but a listening stream socket (a unit with ListenDatagram= or
    Accept=yes would otherwise fail later, and less clearly).

    For anyio: `await anyio.abc.SocketListener.from_socket(socket_for(fd))`.
    """
    sock = socket.socket(fileno=fd)
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise SystemdError(
            f"passed fd {fd} is not a listening stream socket: the socket unit needs "
            "ListenStream= (and Accept=no)"
        )
    sock.setblocking(False)
    return sock

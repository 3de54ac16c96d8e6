"""Pure: frames as findmnt-like text lines for people (JSON lines live in model)."""

from __future__ import annotations

from .model import Event, Mount

__all__ = ["HEADER", "LIST_HEADER", "event_line", "human_path", "mount_line"]

_W_ACTION = 11
_W_TARGET = 30
_W_SOURCE = 14
_W_FSTYPE = 10

HEADER = (
    f"{'ACTION':<{_W_ACTION}} {'TARGET':<{_W_TARGET}} {'SOURCE':<{_W_SOURCE}} "
    f"{'FSTYPE':<{_W_FSTYPE}} OPTIONS"
)
LIST_HEADER = f"{'TARGET':<{_W_TARGET}} {'SOURCE':<{_W_SOURCE}} {'FSTYPE':<{_W_FSTYPE}} OPTIONS"


def human_path(path: str | None) -> str:
    """One cell: never breaks the line, keeps the bytes recoverable (findmnt's \\xNN)."""
    if path is None:
        return "-"
    if path.isprintable() and " " not in path and "\\" not in path:
        return path
    out = []
    for ch in path:
        if ch.isprintable() and ch not in " \\" and not ("\udc80" <= ch <= "\udcff"):
            out.append(ch)
        else:
            for b in ch.encode("utf-8", "surrogateescape"):
                out.append(f"\\x{b:02x}")
    return "".join(out)


def _cells(m: Mount) -> str:
    return (
        f"{human_path(m.target):<{_W_TARGET}} {human_path(m.source):<{_W_SOURCE}} "
        f"{m.fstype or '-':<{_W_FSTYPE}} {m.options or '-'}"
    )


def mount_line(m: Mount, action: str | None = None) -> str:
    """A table row; with `action`, in the watch layout (`present` rows of --snapshot)."""
    if action is None:
        return _cells(m)
    return f"{action:<{_W_ACTION}} {_cells(m)}"


def event_line(ev: Event) -> str:
    """The row shows the mount's new state, and what changed beside it: a remount its new
    per-mount OPTIONS (the row's column) and FS-OPTIONS, with OLD-OPTIONS (and
    OLD-FS-OPTIONS where the superblock's changed); a propagation change the new and old
    propagation, like findmnt's PROPAGATION column."""
    m = ev.mount
    line = mount_line(m, ev.action)
    old = ev.old
    if old is None:
        return line
    if ev.action == "move":
        line += f"  OLD-TARGET={human_path(old.target)}"
        if old.options != m.options:
            line += f"  OLD-OPTIONS={old.options or '-'}"
    elif ev.action == "remount":
        line += f"  FS-OPTIONS={human_path(m.fs_options)}"
        line += f"  OLD-OPTIONS={old.options or '-'}"
        if old.fs_options != m.fs_options:
            line += f"  OLD-FS-OPTIONS={human_path(old.fs_options)}"
    elif ev.action == "propagation":
        line += f"  PROPAGATION={_propagation(m.propagation)}"
        line += f"  OLD-PROPAGATION={_propagation(old.propagation)}"
    return line


def _propagation(p: str | None) -> str:
    """findmnt's words where it has them: `private` for no optional fields."""
    if p is None:
        return "-"
    return p.replace(" ", ",") if p else "private"

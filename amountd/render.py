"""Pure: frames as findmnt-like text lines for people (JSON lines live in model).

The columns, their contents and the escaping are amountd.columns; this module turns
frames into rows: an event is one row, a snapshot's mounts are `present` rows, and a
list is a table (or findmnt's tree)."""

from __future__ import annotations

from collections.abc import Sequence

from .columns import (
    COLUMNS,
    DEFAULT_LIST,
    DEFAULT_WATCH,
    ContainerOf,
    Style,
    View,
    cells,
    escape_pairs,
    escape_raw,
    escape_table,
    notes,
    tree_prefixes,
)
from .container import Container
from .filter import Filter
from .model import End, Event, Mount, Ready, Resync, Snapshot
from .table import MountTable, parent_key

__all__ = [
    "HEADER",
    "LIST_HEADER",
    "Renderer",
    "describe_filter",
    "event_line",
    "human_path",
    "list_lines",
    "mount_line",
    "tree_order",
]

_PLAIN_WATCH = View(DEFAULT_WATCH, with_notes=True)
_PLAIN_LIST = View(DEFAULT_LIST)
HEADER = _PLAIN_WATCH.header_line() or ""
LIST_HEADER = _PLAIN_LIST.header_line() or ""


def human_path(path: str | None) -> str:
    """One cell as findmnt writes it: as it is, escaping only what breaks the line."""
    return "-" if path is None else escape_table(path)


class Renderer:
    """Frames -> lines for one view; remembers what frames said about containers
    (`ready`/`snapshot` carry them) and asks `container_of` for the rest."""

    def __init__(self, view: View, container_of: ContainerOf | None = None) -> None:
        self.view = view
        self._lookup = container_of
        self._known: dict[int, Container | None] = {}

    def container(self, ns_id: int) -> Container | None:
        if ns_id in self._known:
            return self._known[ns_id]
        c = self._lookup(ns_id) if self._lookup is not None else None
        self._known[ns_id] = c
        return c

    def learn(self, ns_id: int | None, container: Container | None) -> None:
        if ns_id is not None and container is not None:
            self._known[ns_id] = container

    def header(self) -> str | None:
        return self.view.header_line()

    def mount_row(self, m: Mount, action: str | None) -> str:
        row = cells(self.view.columns, m, action=action, container_of=self.container)
        return self.view.row_line(row, action)

    def event_row(self, ev: Event) -> str:
        view = self.view
        row = cells(view.columns, ev.mount, event=ev, container_of=self.container)
        extra = ""
        if view.with_notes:
            pairs = notes(ev)
            if ev.mount.target is None:  # came and went before it could be described
                m = ev.mount
                ident = m.legacy_id if m.legacy_id is not None else m.id
                pairs = [("ID", str(ident) if ident is not None else "-")]
                if ev.pid is not None:
                    pairs.append(("PID", str(ev.pid)))
                if ev.comm is not None:
                    pairs.append(("COMM", ev.comm))
            extra = _notes_text(view.style, pairs)
        return view.row_line(row, ev.action, extra)

    def lines(self, frame: object) -> list[str]:
        """The rows a frame prints (status frames go to stderr: not here)."""
        if isinstance(frame, Event):
            return [self.event_row(frame)]
        if isinstance(frame, Snapshot):
            self.learn(frame.ns_id, getattr(frame, "container", None))
            return [self.mount_row(m, "present") for m in frame.mounts]
        if isinstance(frame, (Ready, Resync, End)):
            self.learn(frame.ns_id, getattr(frame, "container", None))
        return []


def _notes_text(style: Style, pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    if style is Style.PAIRS:
        return "".join(f' {k}="{escape_pairs(v)}"' for k, v in pairs)
    if style is Style.RAW:
        return "".join(f" {k}={escape_raw(v)}" for k, v in pairs)
    return "".join(f"  {k}={escape_table(v)}" for k, v in pairs)


def tree_order(mounts: Sequence[Mount]) -> tuple[list[Mount], list[int], list[bool]]:
    """Depth-first order (children by target) with each row's depth and whether it
    is the last child: findmnt's tree."""
    table = MountTable(mounts)
    kids: dict[int | None, list[Mount]] = {}
    roots: list[Mount] = []
    for m in mounts:
        p = parent_key(m)
        if p is None or p == m.key or p not in table:
            roots.append(m)
        else:
            kids.setdefault(p, []).append(m)
    for v in kids.values():
        v.sort(key=lambda m: (m.target or "", m.key))
    order: list[Mount] = []
    depths: list[int] = []
    last: list[bool] = []
    seen: set[int] = set()
    stack: list[tuple[Mount, int, bool]] = [
        (m, 0, i == len(roots) - 1) for i, m in reversed(list(enumerate(roots)))
    ]
    while stack:
        m, d, is_last = stack.pop()
        if m.key in seen:
            continue
        seen.add(m.key)
        order.append(m)
        depths.append(d)
        last.append(is_last)
        children = kids.get(m.key, [])
        for i in range(len(children) - 1, -1, -1):
            stack.append((children[i], d + 1, i == len(children) - 1))
    return order, depths, last


def list_lines(
    view: View,
    mounts: Sequence[Mount],
    *,
    tree: bool = False,
    container_of: ContainerOf | None = None,
) -> list[str]:
    """`amountd list`: the table (or tree) of `mounts`, fitted to the view's width."""
    prefixes = None
    if tree:
        order, depths, last = tree_order(mounts)
        mounts = order
        prefixes = tree_prefixes(depths, last)
    rows = [cells(view.columns, m, container_of=container_of) for m in mounts]
    return view.table(rows, prefixes=prefixes)


def mount_line(m: Mount, action: str | None = None) -> str:
    """A row of the default columns, off a terminal."""
    if action is None:
        return _PLAIN_LIST.row_line(cells(DEFAULT_LIST, m))
    return _PLAIN_WATCH.row_line(cells(DEFAULT_WATCH, m, action=action), action)


def event_line(ev: Event) -> str:
    """An event in the default columns, with OLD-TARGET=/OLD-OPTIONS= after it."""
    return Renderer(_PLAIN_WATCH).event_row(ev)


assert all(c in COLUMNS for c in (*DEFAULT_LIST, *DEFAULT_WATCH))


def describe_filter(f: Filter) -> str:
    """A subscription's filter for a log line or `status`: ", types tmpfs, under /mnt"
    (with its leading ", "), or "" for no filter."""
    if f.is_empty:
        return ""
    parts = []
    if f.actions:
        parts.append("actions " + ",".join(f.actions))
    if f.fstypes:
        parts.append("types " + ",".join(f.fstypes))
    if f.under is not None:
        parts.append("under " + human_path(f.under))
    if f.namespaces is not None:
        parts.append("namespaces " + (",".join(map(str, f.namespaces)) or "none"))
    return ", " + ", ".join(parts)

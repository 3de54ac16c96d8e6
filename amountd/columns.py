"""Pure: findmnt's columns, for mounts and events, as a table, raw, or KEY="value" pairs.

The names, the cell contents and the escaping are findmnt's (util-linux; its output
library libsmartcols): a table cell writes a path as it is and escapes only what would
break the line (control characters, bytes that are not UTF-8: `\\x0a`); `--raw`
escapes blanks and backslashes too, so cells split on spaces; `--pairs` quotes each
value and escapes `"`, `\\`, `` ` `` and `$` as well, so a shell can `eval` a line.

A table printed whole (`list`) is fitted to the terminal: the OPTIONS-like columns
(findmnt's truncatable ones) shrink first, then the widest column, until the line fits.
A stream (`watch`) cannot see its later rows, so each column gets a fixed width (the
terminal's share findmnt gives it) and, on a terminal, a longer cell is cut so that
every row stays aligned and on one line. Off a terminal nothing is cut.
"""

from __future__ import annotations

import time as _time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from .container import Container
from .model import Event, Mount

__all__ = [
    "COLUMNS",
    "DEFAULT_LIST",
    "DEFAULT_WATCH",
    "Cell",
    "Column",
    "ContainerOf",
    "Style",
    "View",
    "cells",
    "escape_pairs",
    "escape_raw",
    "escape_table",
    "fit_widths",
    "merge_options",
    "notes",
    "parse_columns",
    "propagation_flags",
    "source_with_root",
    "text_width",
    "tree_prefixes",
]


class Style(Enum):
    TABLE = "table"
    RAW = "raw"
    PAIRS = "pairs"


@dataclass(frozen=True)
class Column:
    name: str
    help: str
    hint: float
    """Width: a fraction of the terminal (below 1, as findmnt's hints), else characters."""
    trunc: bool = False
    """Shrunk first when the table is too wide (findmnt's SCOLS_FL_TRUNC)."""
    right: bool = False


COLUMNS: dict[str, Column] = {
    c.name: c
    for c in (
        Column("ACTION", "what changed: mount, umount, move, remount, propagation", 11),
        Column("TARGET", "mount point", 0.30),
        Column("SOURCE", "source; a bind mount's root in brackets: src[/root]", 0.25),
        Column("FSTYPE", "filesystem type", 10),
        Column("OPTIONS", "all mount options (per-mount and filesystem)", 0.10, trunc=True),
        Column("VFS-OPTIONS", "per-mount options", 0.20, trunc=True),
        Column("FS-OPTIONS", "filesystem (superblock) options", 0.10, trunc=True),
        Column("PROPAGATION", "shared, private, slave, unbindable", 13),
        Column("ID", "mount ID (32-bit, as mountinfo)", 5, right=True),
        Column("UNIQ-ID", "unique 64-bit mount ID", 11, right=True),
        Column("PARENT", "the parent's mount ID", 6, right=True),
        Column("OLD-TARGET", "mount point before a move", 0.20),
        Column("OLD-OPTIONS", "mount options before a remount", 0.10, trunc=True),
        Column("NS", "mount namespace ID", 11, right=True),
        Column("PID", "process that made the change", 7, right=True),
        Column("COMM", "its command name", 15),
        Column("TIME", "when the change was learnt (local time)", 12),
        Column("CONTAINER", "what runs in the namespace: runtime:id", 19),
    )
}
DEFAULT_WATCH: tuple[str, ...] = ("ACTION", "TARGET", "SOURCE", "FSTYPE", "OPTIONS")
DEFAULT_LIST: tuple[str, ...] = ("TARGET", "SOURCE", "FSTYPE", "OPTIONS")


def parse_columns(text: str | None, default: Sequence[str]) -> tuple[str, ...]:
    """`-o LIST` (or `+LIST`: the default and these); ValueError naming an unknown one."""
    if text is None:
        return tuple(default)
    add = text.startswith("+")
    names = [n.strip().upper() for n in text.lstrip("+").split(",") if n.strip()]
    if not names:
        raise ValueError(f"no columns in {text!r}: e.g. -o TARGET,SOURCE,PROPAGATION")
    for n in names:
        if n not in COLUMNS:
            raise ValueError(f"unknown column {n!r}: choose from {', '.join(COLUMNS)}")
    return (*default, *names) if add else tuple(names)


# --- cell contents (what findmnt prints) --------------------------------------------------


def _opts(text: str | None) -> list[str]:
    return [o for o in (text or "").split(",") if o]


def merge_options(vfs: str | None, fs: str | None) -> str | None:
    """findmnt's OPTIONS: `rw`/`ro` first (ro if either says ro), then the per-mount
    options, then the filesystem's, each without its rw/ro (libmount's merge_optstr)."""
    if vfs is None:
        return fs
    if fs is None or vfs == fs:
        return vfs
    v, f = _opts(vfs), _opts(fs)
    ro = "ro" in v or "ro" in f
    rest = [o for o in v if o not in ("rw", "ro")] + [o for o in f if o not in ("rw", "ro")]
    return ",".join(["ro" if ro else "rw", *rest])


def propagation_flags(prop: str | None) -> str | None:
    """findmnt's PROPAGATION from mountinfo's optional fields: `shared` or `private`,
    then `,slave` and `,unbindable` where they apply."""
    if prop is None:
        return None
    fields = prop.split()
    word = "shared" if any(f.startswith("shared:") for f in fields) else "private"
    if any(f.startswith("master:") for f in fields):
        word += ",slave"
    if "unbindable" in fields:
        word += ",unbindable"
    return word


def source_with_root(m: Mount) -> str | None:
    """findmnt's SOURCE: a mount of a subdirectory (a bind mount) shows its root, `src[/sub]`."""
    if m.source is None:
        return None
    if m.root is not None and m.root != "/":
        return f"{m.source}[{m.root}]"
    return str(m.source)


def _time_cell(t: float | None) -> str | None:
    if t is None:
        return None
    lt = _time.localtime(t)
    return _time.strftime("%H:%M:%S", lt) + f".{int((t % 1) * 1000):03d}"


Cell = str | None
_Getter = Callable[[Mount, "Event | None", "str | None", "Container | None"], Cell]
ContainerOf = Callable[[int], "Container | None"]
"""A namespace ID -> what runs in it (a cached lookup, or what frames said)."""


def _id(v: int | None) -> Cell:
    return None if v is None else str(v)


_GETTERS: dict[str, _Getter] = {
    "ACTION": lambda m, ev, action, c: action,
    "TARGET": lambda m, ev, action, c: m.target,
    "SOURCE": lambda m, ev, action, c: source_with_root(m),
    "FSTYPE": lambda m, ev, action, c: m.fstype,
    "OPTIONS": lambda m, ev, action, c: merge_options(m.options, m.fs_options),
    "VFS-OPTIONS": lambda m, ev, action, c: m.options,
    "FS-OPTIONS": lambda m, ev, action, c: m.fs_options,
    "PROPAGATION": lambda m, ev, action, c: propagation_flags(m.propagation),
    "ID": lambda m, ev, action, c: _id(m.legacy_id),
    "UNIQ-ID": lambda m, ev, action, c: _id(m.id),
    "PARENT": lambda m, ev, action, c: _id(m.legacy_parent_id),
    "OLD-TARGET": lambda m, ev, action, c: (
        ev.old.target if ev is not None and ev.old is not None else None
    ),
    "OLD-OPTIONS": lambda m, ev, action, c: (
        merge_options(ev.old.options, ev.old.fs_options)
        if ev is not None and ev.old is not None
        else None
    ),
    "NS": lambda m, ev, action, c: _id(m.ns_id),
    "PID": lambda m, ev, action, c: _id(ev.pid) if ev is not None else None,
    "COMM": lambda m, ev, action, c: ev.comm if ev is not None else None,
    "TIME": lambda m, ev, action, c: _time_cell(ev.time) if ev is not None else None,
    "CONTAINER": lambda m, ev, action, c: c.short if c is not None else None,
}


def cells(
    columns: Sequence[str],
    mount: Mount,
    *,
    event: Event | None = None,
    action: str | None = None,
    container_of: ContainerOf | None = None,
) -> list[Cell]:
    """One row's raw cells (None: unknown); escaping is the style's job."""
    c = None
    if container_of is not None and mount.ns_id is not None and "CONTAINER" in columns:
        c = container_of(mount.ns_id)
    if event is not None and action is None:
        action = event.action
    return [_GETTERS[name](mount, event, action, c) for name in columns]


def notes(ev: Event) -> list[tuple[str, str]]:
    """What the default row adds after its columns: what a move, remount or propagation
    change was before (findmnt --poll's OLD-TARGET/OLD-OPTIONS)."""
    old = ev.old
    if old is None:
        return []
    out: list[tuple[str, str]] = []
    if ev.action == "move":
        out.append(("OLD-TARGET", old.target or "-"))
    new_opts = merge_options(ev.mount.options, ev.mount.fs_options)
    old_opts = merge_options(old.options, old.fs_options)
    if old_opts != new_opts:
        out.append(("OLD-OPTIONS", old_opts or "-"))
    if ev.action == "propagation":
        out.append(("PROPAGATION", propagation_flags(ev.mount.propagation) or "-"))
        out.append(("OLD-PROPAGATION", propagation_flags(old.propagation) or "-"))
    return out


# --- escaping --------------------------------------------------------------------------


def _byte_escape(ch: str) -> str:
    return "".join(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))


def _bad(ch: str) -> bool:
    """Breaks a line or a terminal: a control or unprintable character, a non-UTF-8 byte."""
    return not ch.isprintable() or "\udc80" <= ch <= "\udcff"


def escape_table(text: str) -> str:
    """A table cell (libsmartcols' mbs_safe_encode): spaces stay; control characters,
    unprintable ones and non-UTF-8 bytes become `\\xNN`, and a backslash before an `x`
    too, so the escapes stay readable back."""
    if text.isprintable() and "\\x" not in text:
        return text
    out = []
    for i, ch in enumerate(text):
        if (ch == " ") or (not _bad(ch) and not (ch == "\\" and text[i + 1 : i + 2] == "x")):
            out.append(ch)
        else:
            out.append(_byte_escape(ch))
    return "".join(out)


def escape_raw(text: str) -> str:
    """`--raw` (fputs_nonblank): blanks and backslashes escaped as well."""
    if text.isprintable() and " " not in text and "\\" not in text:
        return text
    return "".join(_byte_escape(ch) if _bad(ch) or ch in " \t\\" else ch for ch in text)


def escape_pairs(text: str) -> str:
    """`--pairs` value, without its quotes (fputs_quoted): `"`, `\\`, `` ` ``, `$` too."""
    return "".join(_byte_escape(ch) if _bad(ch) or ch in '"\\`$' else ch for ch in text)


def text_width(text: str) -> int:
    """Columns on a terminal: East Asian wide characters take two."""
    if text.isascii():
        return len(text)
    return sum(
        0
        if unicodedata.combining(ch)
        else 2
        if unicodedata.east_asian_width(ch) in ("W", "F")
        else 1
        for ch in text
    )


def _cut(text: str, width: int) -> str:
    if text_width(text) <= width:
        return text
    out, w = [], 0
    for ch in text:
        cw = text_width(ch)
        if w + cw > width:
            break
        out.append(ch)
        w += cw
    return "".join(out)


def _pad(text: str, width: int, right: bool) -> str:
    gap = width - text_width(text)
    if gap <= 0:
        return text
    return " " * gap + text if right else text + " " * gap


# --- laying out ------------------------------------------------------------------------


def fit_widths(
    columns: Sequence[str], natural: Sequence[int], minimum: Sequence[int], termwidth: int
) -> list[int]:
    """Widths that fit `termwidth` (one space between columns): the truncatable
    columns shrink first, widest first, down to their minimum; then the widest column."""
    widths = list(natural)
    budget = termwidth - (len(widths) - 1)

    def over() -> int:
        return sum(widths) - budget

    for only_trunc in (True, False):
        while over() > 0:
            cands = [
                i
                for i, name in enumerate(columns)
                if widths[i] > minimum[i] and (COLUMNS[name].trunc or not only_trunc)
            ]
            if not cands:
                break
            i = max(cands, key=lambda j: widths[j])
            widths[i] = max(minimum[i], widths[i] - over())
    return widths


_COLOURS = {
    "mount": "32",  # green
    "umount": "31",  # red
    "move": "33",  # yellow
    "remount": "36",  # cyan
    "propagation": "35",  # magenta
}


@dataclass
class View:
    """How rows are written: which columns, in which style, for which terminal.

    `width` is the terminal's width (None: not a terminal, nothing is cut); `color`
    colours a row by its action (a terminal without NO_COLOR)."""

    columns: tuple[str, ...]
    style: Style = Style.TABLE
    headings: bool = True
    width: int | None = None
    color: bool = False
    with_notes: bool = False
    """Append OLD-TARGET=/OLD-OPTIONS= after the row (the default columns of watch)."""
    _stream_widths: list[int] | None = field(default=None, repr=False)

    # -- one row at a time (watch, subscribe) --

    def stream_widths(self) -> list[int]:
        """The fixed widths of a stream's columns (the last one is never padded)."""
        if self._stream_widths is None:
            term = self.width if self.width is not None else 120
            natural = []
            for name in self.columns:
                hint = COLUMNS[name].hint
                w = int(hint * term) if hint < 1 else int(hint)
                natural.append(max(w, len(name)))
            if self.width is not None:
                minimum = [len(n) for n in self.columns]
                natural = fit_widths(self.columns, natural, minimum, self.width)
            self._stream_widths = natural
        return self._stream_widths

    def header_line(self) -> str | None:
        if not self.headings or self.style is Style.PAIRS:
            return None
        if self.style is Style.RAW:
            return " ".join(self.columns)
        return self._line(list(self.columns), self.stream_widths(), header=True)

    def row_line(self, row: Sequence[Cell], action: str | None = None, extra: str = "") -> str:
        if self.style is Style.PAIRS:
            pairs = zip(self.columns, row, strict=True)
            line = " ".join(f'{name}="{escape_pairs(v or "")}"' for name, v in pairs)
        elif self.style is Style.RAW:
            line = " ".join(escape_raw(v) if v is not None else "-" for v in row)
        else:
            texts = [escape_table(v) if v is not None else "-" for v in row]
            line = self._line(texts, self.stream_widths())
        if extra:
            line += extra
        return self.paint(line, action)

    def _line(self, texts: list[str], widths: list[int], header: bool = False) -> str:
        cut = self.width is not None
        out = []
        last = len(texts) - 1
        for i, (name, text) in enumerate(zip(self.columns, texts, strict=True)):
            t = text
            if i == last:
                if cut:
                    used = sum(widths[:i]) + i
                    t = _cut(t, max(self.width or 0, used + 1) - used)
                out.append(t)
                break
            w = widths[i]
            if cut:
                t = _cut(t, w)
            out.append(_pad(t, w, COLUMNS[name].right and not header))
        return " ".join(out).rstrip(" ") if cut else " ".join(out)

    def paint(self, line: str, action: str | None) -> str:
        code = _COLOURS.get(action or "") if self.color else None
        return f"\x1b[{code}m{line}\x1b[0m" if code else line

    # -- a whole table at once (list) --

    def table(
        self,
        rows: Sequence[Sequence[Cell]],
        actions: Sequence[str | None] | None = None,
        prefixes: Sequence[str] | None = None,
    ) -> list[str]:
        """Every row of a table; widths from the content, fitted to the terminal."""
        if self.style is not Style.TABLE:
            head = self.header_line()
            lines = [head] if head is not None else []
            for i, r in enumerate(rows):
                lines.append(self.row_line(r, actions[i] if actions else None))
            return lines
        texts = [[escape_table(v) if v is not None else "-" for v in r] for r in rows]
        if prefixes is not None and "TARGET" in self.columns:
            t = self.columns.index("TARGET")
            for r, p in zip(texts, prefixes, strict=True):
                r[t] = p + r[t]
        n = len(self.columns)
        natural = [
            max([len(self.columns[i]) if self.headings else 0] + [text_width(r[i]) for r in texts])
            for i in range(n)
        ]
        widths = natural
        if self.width is not None:
            minimum = [min(natural[i], max(len(self.columns[i]), 4)) for i in range(n)]
            widths = fit_widths(self.columns, natural, minimum, self.width)
        out = []
        if self.headings:
            out.append(self._table_line(list(self.columns), widths, header=True))
        for i, r in enumerate(texts):
            out.append(self.paint(self._table_line(r, widths), actions[i] if actions else None))
        return out

    def _table_line(self, texts: list[str], widths: list[int], header: bool = False) -> str:
        cut = self.width is not None
        out = []
        for i, (name, text) in enumerate(zip(self.columns, texts, strict=True)):
            t = _cut(text, widths[i]) if cut else text
            out.append(_pad(t, widths[i], COLUMNS[name].right and not header))
        return " ".join(out).rstrip(" ")


def tree_prefixes(depths: Sequence[int], last: Sequence[bool]) -> list[str]:
    """findmnt's tree: `├─`/`└─` before each child, `│ ` under a parent with more to come.

    `depths[i]` is row i's depth (rows in depth-first order), `last[i]` whether it is
    its parent's last child."""
    out: list[str] = []
    open_levels: list[bool] = []  # per depth: does the ancestor at it have more siblings
    for d, is_last in zip(depths, last, strict=True):
        del open_levels[d:]
        if d == 0:
            out.append("")
        else:
            stem = "".join("│ " if more else "  " for more in open_levels[1:d])
            out.append(stem + ("└─" if is_last else "├─"))
        while len(open_levels) < d:
            open_levels.append(False)
        open_levels.append(not is_last)
    return out

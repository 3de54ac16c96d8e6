"""Pure: findmnt's columns, escaping, widths and tree, without a kernel."""

from __future__ import annotations

import pytest

from amountd.columns import (
    DEFAULT_LIST,
    DEFAULT_WATCH,
    Style,
    View,
    cells,
    escape_pairs,
    escape_raw,
    escape_table,
    fit_widths,
    merge_options,
    parse_columns,
    propagation_flags,
    source_with_root,
    tree_prefixes,
)
from amountd.container import Container
from amountd.model import Event, Mount, fspath
from amountd.render import Renderer, list_lines, tree_order

from ..factories import mount


def _m(key: int, target: str, parent: int = 1, **kw: object) -> Mount:
    return mount(key, target, parent, ids="legacy", fs_options="rw,size=4k", ns_id=7, **kw)


def test_parse_columns() -> None:
    assert parse_columns(None, DEFAULT_LIST) == DEFAULT_LIST
    assert parse_columns("target,id", DEFAULT_LIST) == ("TARGET", "ID")
    assert parse_columns("+NS,CONTAINER", DEFAULT_WATCH) == (*DEFAULT_WATCH, "NS", "CONTAINER")
    with pytest.raises(ValueError, match="unknown column 'NOPE'"):
        parse_columns("TARGET,NOPE", DEFAULT_LIST)
    with pytest.raises(ValueError, match="no columns"):
        parse_columns(",", DEFAULT_LIST)


def test_cells_as_findmnt_computes_them() -> None:
    assert merge_options("rw,relatime", "rw,size=4k") == "rw,relatime,size=4k"
    assert merge_options("ro,nosuid", "rw,mode=755") == "ro,nosuid,mode=755"
    assert merge_options("rw,relatime", "ro") == "ro,relatime"
    assert merge_options("rw", "rw") == "rw"
    assert propagation_flags("") == "private"
    assert propagation_flags("shared:5") == "shared"
    assert propagation_flags("master:3") == "private,slave"
    assert propagation_flags("shared:7 master:3") == "shared,slave"
    assert propagation_flags("unbindable") == "private,unbindable"
    assert source_with_root(_m(2, "/x", root=fspath("/sub"), source=fspath("t2"))) == "t2[/sub]"
    assert source_with_root(_m(2, "/x")) == "src"
    m = _m(5, "/a", id=2**31 + 5, parent=3, propagation="shared:1")
    c = Container(runtime="docker", id="ab" * 32)
    row = cells(
        ("ID", "UNIQ-ID", "PARENT", "PROPAGATION", "NS", "CONTAINER", "VFS-OPTIONS"),
        m,
        container_of=lambda ns: c if ns == 7 else None,
    )
    assert row == ["5", str(2**31 + 5), "3", "shared", "7", "docker:abababababab", "rw,relatime"]


def test_event_cells_and_notes() -> None:
    old = _m(5, "/a")
    new = _m(5, "/b", options="ro,relatime")
    ev = Event(
        seq=1, time=0.0, action="move", via="fanotify", mount=new, old=old, pid=42, comm="mount"
    )
    row = cells(("ACTION", "OLD-TARGET", "OLD-OPTIONS", "PID", "COMM"), new, event=ev)
    assert row == ["move", "/a", "rw,relatime,size=4k", "42", "mount"]
    line = Renderer(View(DEFAULT_WATCH, with_notes=True)).event_row(ev)
    assert "OLD-TARGET=/a" in line and "OLD-OPTIONS=rw,relatime,size=4k" in line


def test_came_and_went_mount_shows_its_id_pid_and_comm() -> None:
    bare = Mount(id=2**31 + 9)
    ev = Event(seq=1, time=0.0, action="mount", via="fanotify", mount=bare, pid=99, comm="mnt")
    line = Renderer(View(DEFAULT_WATCH, with_notes=True)).event_row(ev)
    assert line.split()[0] == "mount"
    assert f"ID={2**31 + 9}" in line and "PID=99" in line and "COMM=mnt" in line


def test_escaping_like_libsmartcols() -> None:
    weird = "/a b\nc\\xd\udcff\\q"
    assert escape_table(weird) == "/a b\\x0ac\\x5cxd\\xff\\q"  # spaces stay
    assert escape_raw(weird) == "/a\\x20b\\x0ac\\x5cxd\\xff\\x5cq"
    assert escape_pairs('say "$x" `y` \\') == "say \\x22\\x24x\\x22 \\x60y\\x60 \\x5c"
    view = View(("TARGET", "SOURCE"), style=Style.PAIRS)
    assert view.row_line(["/a b", None]) == 'TARGET="/a b" SOURCE=""'
    assert View(("TARGET", "ID"), style=Style.RAW).row_line(["/a b", None]) == "/a\\x20b -"


def test_widths_fit_the_terminal_truncating_options_first_then_the_widest() -> None:
    cols = ("TARGET", "SOURCE", "OPTIONS")
    assert fit_widths(cols, [30, 10, 40], [6, 6, 7], 60) == [30, 10, 18]
    assert fit_widths(cols, [50, 10, 40], [6, 6, 7], 40) == [21, 10, 7]
    mounts = [_m(2, "/" + "x" * 70), _m(3, "/short", options="rw," + "o" * 60)]
    wide = list_lines(View(cols), mounts)
    assert max(len(line) for line in wide) > 80  # off a terminal: nothing is cut
    fitted = list_lines(View(cols, width=60), mounts)
    assert all(len(line) <= 60 for line in fitted), fitted
    assert fitted[0].split() == list(cols)


def test_stream_rows_stay_aligned_on_a_terminal() -> None:
    view = View(DEFAULT_WATCH, width=80)
    long = _m(2, "/" + "y" * 100)
    a = Renderer(view).mount_row(long, "mount")
    b = Renderer(view).mount_row(_m(3, "/s"), "umount")
    assert len(a) <= 80 and a.index(" src ") == b.index(" src ")
    plain = Renderer(View(DEFAULT_WATCH)).mount_row(long, "mount")
    assert "y" * 100 in plain  # not a terminal: untouched


def test_colours_by_action_only_when_asked() -> None:
    m = _m(2, "/a")
    assert Renderer(View(DEFAULT_WATCH, color=True)).mount_row(m, "mount").startswith("\x1b[32m")
    assert Renderer(View(DEFAULT_WATCH, color=True)).mount_row(m, "umount").startswith("\x1b[31m")
    assert "\x1b" not in Renderer(View(DEFAULT_WATCH)).mount_row(m, "mount")


def test_tree_like_findmnt() -> None:
    mounts = [
        _m(1, "/", parent=0),
        _m(2, "/dev", parent=1),
        _m(3, "/dev/pts", parent=2),
        _m(4, "/dev/shm", parent=2),
        _m(5, "/proc", parent=1),
        _m(6, "/proc/sys", parent=5),
    ]
    order, depths, last = tree_order(mounts)
    prefixes = tree_prefixes(depths, last)
    targets = [p + str(m.target) for p, m in zip(prefixes, order, strict=True)]
    assert targets == [
        "/",
        "├─/dev",
        "│ ├─/dev/pts",
        "│ └─/dev/shm",
        "└─/proc",
        "  └─/proc/sys",
    ]
    lines = list_lines(View(("TARGET", "ID")), mounts, tree=True)
    assert lines[0].split() == ["TARGET", "ID"] and lines[3].startswith("│ ├─/dev/pts ")


def test_help_names_every_column() -> None:
    from amountd.cli.constants import COLUMN_NAMES
    from amountd.columns import COLUMNS

    assert list(COLUMNS) == COLUMN_NAMES

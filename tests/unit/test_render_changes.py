"""The human row of a change shows the mount's new state, with the old beside it."""

from __future__ import annotations

import msgspec

from amountd.model import Action, Event, Mount, fspath
from amountd.render import event_line

from ..factories import event

BIND = Mount(
    id=2**31 + 5,
    legacy_id=50,
    target=fspath("/mnt/b"),
    root=fspath("/sub"),
    source=fspath("tsrc"),
    fstype="tmpfs",
    options="rw,relatime",
    fs_options=fspath("rw,size=1024k"),
    propagation="",
)


def _ev(action: Action, new: Mount, old: Mount) -> Event:
    return event(action, new, old, seq=1, time=0.0, via="mountinfo")


def test_remount_row_shows_new_options_and_fs_options() -> None:
    """OPTIONS is findmnt's: the per-mount options, then the filesystem's."""
    new = msgspec.structs.replace(
        BIND, options="ro,nosuid,relatime", fs_options=fspath("ro,size=2048k")
    )
    cells = event_line(_ev("remount", new, BIND)).split()
    assert cells[:4] == ["remount", "/mnt/b", "tsrc[/sub]", "tmpfs"]
    assert cells[4] == "ro,nosuid,relatime,size=2048k"
    assert cells[5:] == ["OLD-OPTIONS=rw,relatime,size=1024k"]


def test_bind_remount_row_shows_the_unchanged_fs_options_too() -> None:
    new = msgspec.structs.replace(BIND, options="ro,relatime")
    cells = event_line(_ev("remount", new, BIND)).split()
    assert cells[4:] == ["ro,relatime,size=1024k", "OLD-OPTIONS=rw,relatime,size=1024k"]


def test_propagation_row_shows_new_and_old() -> None:
    """In findmnt's PROPAGATION words (`shared,slave`; `private` for none)."""
    new = msgspec.structs.replace(BIND, propagation="shared:5 master:3")
    cells = event_line(_ev("propagation", new, BIND)).split()
    assert cells[0] == "propagation"
    assert cells[5:] == ["PROPAGATION=shared,slave", "OLD-PROPAGATION=private"]
    back = event_line(_ev("propagation", BIND, new)).split()
    assert back[5:] == ["PROPAGATION=private", "OLD-PROPAGATION=shared,slave"]


def test_move_row_shows_the_old_target() -> None:
    """A path keeps its spaces, as findmnt prints it."""
    new = msgspec.structs.replace(BIND, target=fspath("/mnt/c d"))
    line = event_line(_ev("move", new, BIND))
    assert line.split()[1:3] == ["/mnt/c", "d"]
    assert line.rstrip().endswith("  OLD-TARGET=/mnt/b")

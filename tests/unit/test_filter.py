"""Subscriber filters: types like findmnt -t, subtrees, actions, and the watcher's view."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from amountd.filter import Filter, filter_event, filter_mounts, parse_actions, parse_types
from amountd.model import ACTIONS, Action, Event, FsPath, Mount, encode_json, fspath
from amountd.table import MountTable, apply, diff

from ..factories import event, mount
from .test_table import table_pairs


def m(target: str | bytes | None, fstype: str | None = "tmpfs", key: int = 7) -> Mount:
    return mount(key, target, ids="legacy", full=False, fstype=fstype)


def ev(action: Action, m: Mount, old: Mount | None = None) -> Event:
    return event(action, m, old, seq=3, via="mountinfo", pid=9)


# --- the filter itself --------------------------------------------------------------


def test_is_empty() -> None:
    assert Filter().is_empty
    assert Filter(actions=None, fstypes=None).is_empty
    assert not Filter(actions=["mount"]).is_empty
    assert not Filter(fstypes=["tmpfs"]).is_empty
    assert not Filter(under=fspath("/")).is_empty
    f = Filter()
    e = ev("mount", m("/x"))
    assert filter_event(f, e) is e
    assert filter_event(None, e) is e
    mounts = [m("/x"), m("/y", "ext4")]
    assert filter_mounts(f, mounts) == mounts == filter_mounts(None, mounts)


@pytest.mark.parametrize(
    ("types", "passes", "fails"),
    [
        (["tmpfs"], ["tmpfs"], ["ext4", "fuse.tmpfs", "tmpfs.x"]),
        (["tmpfs", "ext4"], ["tmpfs", "ext4"], ["proc"]),
        (["notmpfs"], ["ext4", "proc", "fuse.sshfs"], ["tmpfs"]),
        (["notmpfs", "noproc"], ["ext4"], ["tmpfs", "proc"]),
        (["ext4", "notmpfs"], ["ext4"], ["tmpfs", "proc"]),
        (["fuse.sshfs"], ["fuse.sshfs"], ["fuse", "fuse.other"]),
    ],
)
def test_fstypes_like_findmnt(types: list[str], passes: list[str], fails: list[str]) -> None:
    f = Filter(fstypes=types)
    for t in passes:
        assert f.matches_mount(m("/x", t)), t
    for t in fails:
        assert not f.matches_mount(m("/x", t)), t


@pytest.mark.parametrize(
    ("under", "inside", "outside"),
    [
        ("/mnt", ["/mnt", "/mnt/x", "/mnt/x/y"], ["/mntx", "/", "/mn", "/other/mnt"]),
        ("/", ["/", "/mnt", "/a/b"], []),
        ("/a b", ["/a b", "/a b/c"], ["/a", "/a bc"]),
    ],
)
def test_under_counts_path_components(under: str, inside: list[str], outside: list[str]) -> None:
    f = Filter(under=fspath(under))
    for t in inside:
        assert f.matches_mount(m(t)), t
    for t in outside:
        assert not f.matches_mount(m(t)), t


def test_under_with_bytes_that_are_not_utf8() -> None:
    f = Filter(under=fspath(b"/d\xff"))
    assert f.matches_mount(m(b"/d\xff/x"))
    assert not f.matches_mount(m(b"/d\xfe/x"))
    assert not f.matches_mount(m(b"/d\xffx"))


def test_filter_mounts_keeps_order_and_combines_tests() -> None:
    f = Filter(fstypes=["tmpfs"], under=fspath("/mnt"))
    mounts = [m("/mnt/b"), m("/mnt/a", "ext4"), m("/other"), m("/mnt")]
    assert filter_mounts(f, mounts) == [mounts[0], mounts[3]]


def test_unknown_fields_cannot_exclude() -> None:
    """A mount that vanished before it was described has null fields: it passes, so
    its mount and umount both reach the consumer."""
    f = Filter(fstypes=["ext4"], under=fspath("/mnt"))
    ghost = m(None, None)
    assert f.matches_mount(ghost)
    assert filter_event(f, ev("umount", ghost)) is not None
    assert filter_event(f, ev("mount", ghost)) is not None
    assert filter_event(Filter(fstypes=["notmpfs"]), ev("umount", ghost)) is not None


# --- events -------------------------------------------------------------------------


def test_action_filter() -> None:
    f = Filter(actions=["mount", "umount"])
    assert filter_event(f, ev("mount", m("/x"))) is not None
    assert filter_event(f, ev("umount", m("/x"))) is not None
    assert filter_event(f, ev("remount", m("/x"), m("/x"))) is None
    assert filter_event(f, ev("move", m("/y"), m("/x"))) is None


def test_fstype_filter_on_events() -> None:
    f = Filter(fstypes=["notmpfs"])
    assert filter_event(f, ev("mount", m("/x", "tmpfs"))) is None
    assert filter_event(f, ev("umount", m("/x", "ext4"))) is not None


def test_move_into_subtree_is_a_mount() -> None:
    f = Filter(under=fspath("/mnt"))
    old, new = m("/elsewhere"), m("/mnt/x")
    out = filter_event(f, ev("move", new, old))
    assert out == Event(seq=3, time=1.0, action="mount", via="mountinfo", mount=new, pid=9)


def test_move_out_of_subtree_is_an_umount_with_the_old_state() -> None:
    f = Filter(under=fspath("/mnt"))
    old, new = m("/mnt/x"), m("/elsewhere")
    out = filter_event(f, ev("move", new, old))
    assert out == Event(seq=3, time=1.0, action="umount", via="mountinfo", mount=old, pid=9)


def test_moves_within_and_outside_the_subtree() -> None:
    f = Filter(under=fspath("/mnt"))
    within = ev("move", m("/mnt/b"), m("/mnt/a"))
    assert filter_event(f, within) is within
    assert filter_event(f, ev("move", m("/y"), m("/x"))) is None
    assert filter_event(f, ev("remount", m("/y"), m("/y"))) is None
    assert filter_event(f, ev("umount", m("/mntx"))) is None


def test_action_filter_applies_after_translation() -> None:
    into = ev("move", m("/mnt/x"), m("/out"))
    out_of = ev("move", m("/out"), m("/mnt/x"))
    mounts_only = Filter(under=fspath("/mnt"), actions=["mount"])
    moves_only = Filter(under=fspath("/mnt"), actions=["move"])
    assert filter_event(mounts_only, into) is not None
    assert filter_event(moves_only, into) is None
    assert filter_event(mounts_only, out_of) is None
    umounts_only = Filter(under=fspath("/mnt"), actions=["umount"])
    got = filter_event(umounts_only, out_of)
    assert got is not None and got.action == "umount"


def test_filter_does_not_change_the_event_it_was_given() -> None:
    f = Filter(under=fspath("/mnt"))
    e = ev("move", m("/mnt/x"), m("/out"))
    before = encode_json(e)
    filter_event(f, e)
    assert encode_json(e) == before


@given(
    st.booleans().flatmap(table_pairs),
    st.sampled_from(["/", "/a", "/a/b", "/b", "/c/a"]),
    st.sampled_from([None, ["tmpfs"], ["noproc"], ["notmpfs"]]),
)
def test_filtered_consumer_ends_with_the_filtered_table(
    pair: tuple[MountTable, MountTable], under: str, types: list[str] | None
) -> None:
    """The invariant, through a filter: snapshot filtered, events filtered, applied."""
    a, b = pair
    f = Filter(under=fspath(under), fstypes=types)
    view = MountTable(filter_mounts(f, a.mounts()))
    for e in diff(a, b, via="mountinfo", time=0.0):
        out = filter_event(f, e)
        if out is not None:
            apply(view, out)
    assert view == MountTable(filter_mounts(f, b.mounts()))


# --- wire and command line ----------------------------------------------------------


def _dec_hook(tp: type, obj: object) -> object:
    if tp is FsPath and isinstance(obj, str):
        return fspath(obj)
    raise NotImplementedError


def test_decode_from_json() -> None:
    dec = msgspec.json.Decoder(Filter, dec_hook=_dec_hook)
    f = dec.decode(b'{"actions":["mount","move"],"fstypes":["notmpfs"],"under":"/mnt"}')
    assert f == Filter(actions=["mount", "move"], fstypes=["notmpfs"], under=fspath("/mnt"))
    assert f.matches_mount(m("/mnt/x", "ext4"))
    assert dec.decode(b"{}").is_empty
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        dec.decode(b'{"types":["x"]}')
    with pytest.raises(msgspec.ValidationError):
        dec.decode(b'{"actions":["mounted"]}')


def test_parse_types() -> None:
    assert parse_types("ext4") == ["ext4"]
    assert parse_types(" ext4, notmpfs ,,fuse.sshfs") == ["ext4", "notmpfs", "fuse.sshfs"]
    with pytest.raises(ValueError, match="no filesystem types"):
        parse_types(" , ")
    with pytest.raises(ValueError, match="'no' alone"):
        parse_types("ext4,no")


def test_parse_actions() -> None:
    assert parse_actions("mount,umount") == ["mount", "umount"]
    assert parse_actions(",".join(ACTIONS)) == list(ACTIONS)
    with pytest.raises(ValueError, match="unknown action 'unmount'") as info:
        parse_actions("mount,unmount")
    for name in ACTIONS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="no actions"):
        parse_actions("")

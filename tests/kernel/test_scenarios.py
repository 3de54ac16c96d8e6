"""Each core scenario, in its own private namespace, for each source, on trio and asyncio."""

from __future__ import annotations

import pytest

from amountd import watch
from amountd.model import (
    Event,
    Ready,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
    fspath,
)

from ..conftest import PrivateNs, next_events, next_frames, no_more_frames

pytestmark = pytest.mark.anyio

SOURCES = ["mountinfo", "fanotify", "listmount", "auto"]


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _check_origin(ev: Event, source: str) -> None:
    """What only the fanotify source knows: the unique ID and the process behind it
    (listmount: the unique ID, learnt from mountinfo's POLLPRI, no process)."""
    if source == "mountinfo":
        assert ev.via == "mountinfo"
        assert ev.pid is None
        assert ev.mount.id is None
        assert ev.mount.legacy_id is not None
    elif source == "listmount":
        assert ev.via == "mountinfo"
        assert ev.pid is None
        assert ev.mount.id is not None and ev.mount.id >= 2**31
        assert ev.mount.ns_id is not None and ev.mount.parent_id is not None
    else:
        assert ev.via == "fanotify"
        assert ev.mount.id is not None


async def _ready(frames: object, source: str) -> None:
    [ready] = await next_frames(frames, 1)  # type: ignore[arg-type]
    assert isinstance(ready, Ready)
    assert ready.source == ("fanotify" if source == "auto" else source)


async def test_tmpfs_mount(private_ns: PrivateNs, source: str) -> None:
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    async with watch(source=source, ns=ns.pid) as frames:
        await _ready(frames, source)
        ns.run("mount", "-t", "tmpfs", "-o", "size=1m,mode=700", "tmpsrc", a)
        [ev] = await next_events(frames, 1)
        assert ev.action == "mount"
        assert ev.old is None
        m = ev.mount
        assert (m.target, m.root, m.source, m.fstype) == (fspath(a), "/", "tmpsrc", "tmpfs")
        assert m.options == "rw,relatime"
        assert m.fs_options == "rw,size=1024k,mode=700"
        assert m.propagation == ""
        _check_origin(ev, source)
        await no_more_frames(frames)


async def test_bind_mount(private_ns: PrivateNs, source: str) -> None:
    ns = private_ns
    a, b, c = ns.path("a"), ns.path("b"), ns.path("c")
    ns.mkdir(a, b, c)
    ns.run("mount", "-t", "tmpfs", "tsrc", a)
    ns.mkdir(a + b"/sub")
    async with watch(source=source, ns=ns.pid) as frames:
        await _ready(frames, source)
        ns.run("mount", "--bind", a, b)
        [ev] = await next_events(frames, 1)
        assert (ev.action, ev.mount.target, ev.mount.root) == ("mount", fspath(b), "/")
        assert (ev.mount.source, ev.mount.fstype) == ("tsrc", "tmpfs")
        ns.run("mount", "--bind", a + b"/sub", c)
        [ev] = await next_events(frames, 1)
        assert (ev.action, ev.mount.target, ev.mount.root) == ("mount", fspath(c), "/sub")
        _check_origin(ev, source)
        await no_more_frames(frames)


async def test_move(private_ns: PrivateNs, source: str) -> None:
    ns = private_ns
    a, c = ns.path("a"), ns.path("c")
    ns.mkdir(a, c)
    ns.run("mount", "-t", "tmpfs", "tsrc", a)
    async with watch(source=source, ns=ns.pid) as frames:
        await _ready(frames, source)
        ns.run("mount", "--move", a, c)
        [ev] = await next_events(frames, 1)
        assert ev.action == "move"
        assert ev.old is not None
        assert (ev.old.target, ev.mount.target) == (fspath(a), fspath(c))
        assert (ev.mount.fstype, ev.mount.source, ev.mount.options) == (
            "tmpfs",
            "tsrc",
            "rw,relatime",
        )
        assert ev.old.options == ev.mount.options
        _check_origin(ev, source)
        await no_more_frames(frames)


async def test_remount_ro(private_ns: PrivateNs, source: str) -> None:
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    ns.run("mount", "-t", "tmpfs", "-o", "size=1m", "tsrc", a)
    async with watch(source=source, ns=ns.pid) as frames:
        await _ready(frames, source)
        ns.run("mount", "-o", "remount,ro", a)
        [ev] = await next_events(frames, 1)
        assert ev.action == "remount"
        assert ev.old is not None
        assert ev.mount.target == ev.old.target == fspath(a)
        assert (ev.old.options, ev.mount.options) == ("rw,relatime", "ro,relatime")
        assert (ev.old.fs_options, ev.mount.fs_options) == ("rw,size=1024k", "ro,size=1024k")
        # A bind remount changes the mount's flags, not the superblock's.
        ns.run("mount", "-o", "remount,bind,rw,nosuid", a)
        [ev] = await next_events(frames, 1)
        assert ev.action == "remount"
        assert ev.mount.options == "rw,nosuid,relatime"
        assert ev.mount.fs_options == "ro,size=1024k"
        _check_origin(ev, source)
        await no_more_frames(frames)


async def test_umount(private_ns: PrivateNs, source: str) -> None:
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    ns.run("mount", "-t", "tmpfs", "tsrc", a)
    async with watch(source=source, ns=ns.pid) as frames:
        await _ready(frames, source)
        ns.run("umount", a)
        [ev] = await next_events(frames, 1)
        assert ev.action == "umount"
        assert (ev.mount.target, ev.mount.fstype, ev.mount.source) == (fspath(a), "tmpfs", "tsrc")
        assert ev.old is None
        _check_origin(ev, source)
        await no_more_frames(frames)


async def test_lazy_umount_of_a_tree(private_ns: PrivateNs, source: str) -> None:
    ns = private_ns
    t = ns.path("t")
    ns.mkdir(t)
    ns.run("mount", "-t", "tmpfs", "t0", t)
    ns.mkdir(t + b"/x")
    ns.run("mount", "-t", "tmpfs", "t1", t + b"/x")
    ns.mkdir(t + b"/x/y")
    ns.run("mount", "-t", "tmpfs", "t2", t + b"/x/y")
    async with watch(source=source, ns=ns.pid) as frames:
        await _ready(frames, source)
        ns.run("umount", "-l", t)
        evs = await next_events(frames, 3)
        assert [e.action for e in evs] == ["umount"] * 3
        targets = [e.mount.target for e in evs]
        assert sorted(targets) == sorted(fspath(p) for p in (t, t + b"/x", t + b"/x/y"))
        assert {e.mount.source for e in evs} == {"t0", "t1", "t2"}
        await no_more_frames(frames)


WEIRD = [b"sp ace", b"t\tab", b"new\nline", b"back\\slash", b"bad\xffbyte", b"caf\xc3\xa9"]


async def test_exact_paths(private_ns: PrivateNs, source: str) -> None:
    ns = private_ns
    paths = [ns.path(w) for w in WEIRD]
    ns.mkdir(*paths)
    async with watch(source=source, ns=ns.pid) as frames:
        await _ready(frames, source)
        for p in paths:
            ns.run("mount", "-t", "tmpfs", b"src " + p[-4:], p)
            [ev] = await next_events(frames, 1)
            assert ev.action == "mount"
            assert ev.mount.target is not None
            assert ev.mount.target.encode("utf-8", "surrogateescape") == p
            assert ev.mount.source == fspath(b"src " + p[-4:])
            # Both wire forms carry every byte back.
            assert decode_msgpack(encode_msgpack(ev)) == ev
            assert decode_json(encode_json(ev)) == ev
        for p in paths:
            ns.run("umount", p)
            [ev] = await next_events(frames, 1)
            assert (ev.action, ev.mount.target) == ("umount", fspath(p))
        await no_more_frames(frames)


async def test_filters_under_and_actions(private_ns: PrivateNs, source: str) -> None:
    """--under: a move out of the subtree is an umount for this watcher, a move in a mount."""
    from amountd.filter import Filter

    ns = private_ns
    inside, outside = ns.path("in"), ns.path("out")
    ns.mkdir(inside, outside)
    ns.run("mount", "-t", "tmpfs", "box", inside)
    ns.mkdir(inside + b"/m", outside + b"/m")
    flt = Filter(under=fspath(inside))
    async with watch(source=source, ns=ns.pid, filter=flt) as frames:
        await _ready(frames, source)
        ns.run("mount", "-t", "tmpfs", "other", outside + b"/m")  # not ours: filtered out
        ns.run("mount", "-t", "tmpfs", "mine", inside + b"/m")
        [ev] = await next_events(frames, 1)
        assert (ev.action, ev.mount.target) == ("mount", fspath(inside + b"/m"))
        ns.run("mount", "--move", outside + b"/m", inside + b"/m")  # moved in, on top
        [ev] = await next_events(frames, 1)
        assert (ev.action, ev.mount.source, ev.old) == ("mount", "other", None)
        ns.run("umount", inside + b"/m")  # the top one
        [ev] = await next_events(frames, 1)
        assert (ev.action, ev.mount.source) == ("umount", "other")
        ns.run("mount", "--move", inside + b"/m", outside + b"/m")  # moved out
        [ev] = await next_events(frames, 1)
        assert (ev.action, ev.mount.source, ev.mount.target) == (
            "umount",
            "mine",
            fspath(inside + b"/m"),
        )
        await no_more_frames(frames)


async def test_move_of_a_tree(private_ns: PrivateNs, source: str) -> None:
    """The kernel reports only the moved mount; its subtree moves too, and is reported."""
    ns = private_ns
    a, c = ns.path("a"), ns.path("c")
    ns.mkdir(a, c)
    ns.run("mount", "-t", "tmpfs", "t0", a)
    ns.mkdir(a + b"/x")
    ns.run("mount", "-t", "tmpfs", "t1", a + b"/x")
    ns.mkdir(a + b"/x/y")
    ns.run("mount", "-t", "tmpfs", "t2", a + b"/x/y")
    async with watch(source=source, ns=ns.pid) as frames:
        await _ready(frames, source)
        ns.run("mount", "--move", a, c)
        evs = await next_events(frames, 3)
        moves = sorted(
            (e.action, e.old.target if e.old else None, e.mount.target, e.mount.source) for e in evs
        )
        assert moves == [
            ("move", fspath(a), fspath(c), "t0"),
            ("move", fspath(a + b"/x"), fspath(c + b"/x"), "t1"),
            ("move", fspath(a + b"/x/y"), fspath(c + b"/x/y"), "t2"),
        ]
        await no_more_frames(frames)

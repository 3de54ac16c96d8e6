"""What the fanotify source's sweeps report, in a real namespace (issue 13)."""

from __future__ import annotations

import anyio
import pytest

from amountd import watch
from amountd.model import Event, Ready

from ..conftest import PrivateNs, next_events, next_frames, no_more_frames

pytestmark = pytest.mark.anyio


async def test_make_shared_then_remount_is_two_events(private_ns: PrivateNs) -> None:
    """make-shared raises no POLLPRI; the remount after it does, and its sweep finds
    both changes on the one mount: `propagation`, then `remount`, in that order."""
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    ns.run("mount", "-t", "tmpfs", "-o", "size=1m", "ta", a)
    async with watch(source="fanotify", ns=ns.pid) as frames:
        [ready] = await next_frames(frames, 1)
        assert isinstance(ready, Ready)
        ns.run("mount", "--make-shared", a)
        ns.run("mount", "-o", "remount,size=2m", a)
        prop, rem = await next_events(frames, 2)
        await no_more_frames(frames)
    assert (prop.action, rem.action) == ("propagation", "remount")
    assert prop.mount.id == rem.mount.id
    assert prop.old is not None and prop.old.propagation == ""
    assert prop.mount.propagation is not None and prop.mount.propagation.startswith("shared:")
    assert prop.mount.fs_options == prop.old.fs_options  # the remount is the next event
    assert rem.old == prop.mount
    assert rem.mount.fs_options == "rw,size=2048k"
    assert rem.mount.propagation == prop.mount.propagation


async def test_make_shared_alone_is_found_by_the_background_sweep(
    private_ns: PrivateNs,
) -> None:
    """No POLLPRI, no event: the background sweep (a short interval here) finds it."""
    from amountd.ns import resolve_ns
    from amountd.sources.fanotify import FanotifySource

    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    ns.run("mount", "-t", "tmpfs", "ta", a)
    async with FanotifySource(resolve_ns(ns.pid), sweep_interval=0.3) as src:
        changes = src.changes()
        ns.run("mount", "--make-shared", a)
        with anyio.fail_after(10):
            batch = await anext(changes)
        await changes.aclose()
    [ev] = batch
    assert isinstance(ev, Event)
    assert ev.action == "propagation"
    assert ev.mount.propagation is not None and ev.mount.propagation.startswith("shared:")
    assert ev.old is not None and ev.old.propagation == ""
    assert src.sweeps >= 1

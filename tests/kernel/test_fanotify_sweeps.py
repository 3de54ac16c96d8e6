"""What the fanotify source's sweeps report, in a real namespace (issue 13).

The 1,000 mount-remount-umount cycles and the back-to-back property over the three
sources are in tests/test_listmount_live.py (they run the fanotify source too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from amountd import watch
from amountd.model import Event, Ready

from ..conftest import PrivateNs, next_events, next_frames, no_more_frames

pytestmark = pytest.mark.anyio
HERE = Path(__file__).resolve().parent.parent  # tests/, where nsscript.py is


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


@pytest.mark.parametrize("source", ["fanotify", "listmount"])
async def test_the_api_takes_the_sweep_settings(private_ns: PrivateNs, source: str) -> None:
    """`amountd.watch(sweep=SweepSettings(...))`: what `--sweep-interval` does for the
    command, for a program; a budget out of (0, 1] is refused before anything opens."""
    from amountd import SweepSettings

    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    ns.run("mount", "-t", "tmpfs", "ta", a)
    with pytest.raises(ValueError, match="budget"):
        async with watch(source=source, ns=ns.pid, sweep=SweepSettings(budget=0)):
            pass
    async with watch(source=source, ns=ns.pid, sweep=SweepSettings(interval=0.3)) as frames:
        [ready] = await next_frames(frames, 1)
        assert isinstance(ready, Ready)
        ns.run("mount", "--make-shared", a)
        with anyio.fail_after(10):
            [ev] = await next_events(frames, 1)
    assert ev.action == "propagation"
    assert ev.mount.propagation is not None and ev.mount.propagation.startswith("shared:")


@pytest.mark.parametrize("source", ["fanotify", "listmount"])
def test_make_shared_alone_is_reported_within_the_sweep_interval(
    private_ns: PrivateNs, source: str
) -> None:
    """`amountd watch --sweep-interval 0.5`: make-shared raises neither POLLPRI nor an
    event; the background sweep reports it (the 30 s default would outlast the test)."""
    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    ns.run("mount", "-t", "tmpfs", "ta", a)
    cmd = [sys.executable, "-m", "amountd", "watch", "--json", "--ns", str(ns.pid)]
    cmd += ["--source", source, "--sweep-interval", "0.5", "--count", "1", "--timeout", "20"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        assert p.stdout is not None and p.stderr is not None
        try:
            ready = json.loads(p.stdout.readline() or b"null")
            assert ready is not None and ready["type"] == "ready", p.stderr.read().decode()
            assert ready["source"] == source
            ns.run("mount", "--make-shared", a)
            ev = json.loads(p.stdout.readline() or b"null")
            assert p.wait(20) == 0, p.stderr.read().decode()
        finally:
            if p.poll() is None:
                p.kill()
    assert ev is not None and ev["action"] == "propagation", ev
    assert ev["mount"]["target"] == a.decode()
    assert ev["mount"]["propagation"].startswith("shared:")
    assert ev["old"]["propagation"] == ""


BIG = int(os.environ.get("AMOUNTD_BIG_MOUNTS", "10000"))  # ~10 s here, so run by default


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # one loop: nothing here is its own
async def test_remounts_hidden_in_churn_at_10000_mounts_are_each_reported(
    private_ns: PrivateNs,
) -> None:
    """10,000 mounts, mounts and umounts all along (a shell loop), and remounts each made
    back to back with a mount and an umount by one process (one POLLPRI may stand for
    all three, and the mount's event explains it): every remount is reported, with the
    mount's new options. No background sweep (interval None), and the churn stops with
    the last remount: only the sweeps that the POLLPRIs owe can find them (before issue
    13 a POLLPRI that a mount's event explained owed nothing, and the remounts still
    unreported when the churn stopped were never reported). How soon is the
    benchmark's (benchmarks/remount.py)."""
    import random

    from amountd.api import frames_of
    from amountd.ns import resolve_ns
    from amountd.sources.fanotify import FanotifySource

    ns = private_ns
    big, churn_dir, side = ns.path("big"), ns.path("churn"), ns.path("side")
    ns.mkdir(big, churn_dir, side)
    ns.ops("binds", big, BIG)
    loop = f"while :; do mount -t tmpfs c {churn_dir.decode()}; umount {churn_dir.decode()}; done"
    picks = random.Random(13).sample(range(BIG), 20)
    want = {f"{big.decode()}/{i}" for i in picks}
    seen: dict[str, Event] = {}
    async with FanotifySource(resolve_ns(ns.pid), sweep_interval=None) as src:
        frames = frames_of(src)
        [ready] = await next_frames(frames, 1, timeout=60)
        assert isinstance(ready, Ready)
        churn = subprocess.Popen(["nsenter", "-t", str(ns.pid), "-m", "--", "sh", "-c", loop])
        try:

            async def remounts() -> None:
                for i in picks:
                    t = f"{big.decode()}/{i}"
                    s = side.decode()
                    await anyio.to_thread.run_sync(
                        lambda t=t, s=s: ns.run(
                            sys.executable,
                            str(HERE / "nsscript.py"),
                            f"tmpfs {s}",
                            f"remount {t} bind,ro",
                            f"umount {s}",
                        )
                    )
                    await anyio.sleep(0.1)
                # Then nothing more happens in the namespace: no POLLPRI will come to
                # start a sweep, so what the earlier ones owe must find the rest.
                churn.kill()

            async with anyio.create_task_group() as tg:
                tg.start_soon(remounts)
                with anyio.fail_after(60):
                    async for f in frames:
                        if isinstance(f, Event) and f.action == "remount":
                            target = str(f.mount.target)
                            if target in want:
                                seen.setdefault(target, f)
                                if len(seen) == len(want):
                                    break
        finally:
            churn.kill()
            churn.wait()
            await frames.aclose()
    assert set(seen) == want
    for ev in seen.values():
        assert ev.mount.options is not None and ev.mount.options.startswith("ro")
        assert ev.old is not None and ev.old.options is not None
        assert ev.old.options.startswith("rw")

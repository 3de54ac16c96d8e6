"""The listmount source against the kernel, in private namespaces.

The scenario tests (tests/kernel/test_scenarios.py) run it too, with `--source listmount`;
here is what is its own: `auto` falling back to it when fanotify_init fails (a real
seccomp filter makes it fail, as a kernel before 6.15 does), a propagation change alone
found by the interval sweep, a remount hidden behind mounts made at the same instant,
and a property: random remounts, propagation changes, mounts and umounts made back to
back by one process end with the listmount, fanotify and mountinfo consumers each
holding their kernel's table, and the tables agreeing. The fanotify source shares the
cycles and the property (its sweeps, issue 13, are the same promise).
"""

from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from amountd import watch
from amountd.api import frames_of
from amountd.model import Event, Frame, Mount, Ready
from amountd.mountinfo import parse_mountinfo
from amountd.ns import resolve_ns
from amountd.table import MountTable, apply_frame

from ..conftest import HAVE_TOOLS, ROOT, PrivateNs, needs_root, no_more_frames

HERE = Path(__file__).resolve().parent.parent  # tests/, where nsscript.py is
REPO = HERE.parent


def _skip_reason() -> str | None:
    if not (ROOT and HAVE_TOOLS):
        return "needs root and util-linux unshare/nsenter/mount to make private mount namespaces"
    from amountd.kernel.errors import KernelError
    from amountd.kernel.syscalls import listmount

    try:
        listmount()
    except KernelError as e:
        return f"the listmount source needs listmount/statmount (Linux 6.8+): {e}"
    return None


live = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
pytestmark = [pytest.mark.kernel, live]


def _script(ns: PrivateNs, *ops: str) -> None:
    """Ops made back to back by one process inside the namespace (tests/nsscript.py)."""
    ns.run(sys.executable, str(HERE / "nsscript.py"), *ops)


# ------------------------------------------------------------- auto's fallback


def _watch_under_seccomp(ns: PrivateNs, rules: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`amountd watch --json` with syscalls failing by seccomp: its ready frame, and the
    event of one tmpfs mount made once it is armed."""
    if platform.machine() != "x86_64":
        pytest.skip("the seccomp filter names x86_64 syscall numbers")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, str(HERE / "seccomp_exec.py"), rules, "--", sys.executable, "-m"]
    cmd += ["amountd", "watch", "--json", "--ns", str(ns.pid), "--count", "1", "--timeout", "20"]
    a = ns.path("a")
    ns.mkdir(a)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as p:
        assert p.stdout is not None and p.stderr is not None
        try:
            ready = json.loads(p.stdout.readline() or b"null")
            assert ready is not None, p.stderr.read().decode()
            ns.run("mount", "-t", "tmpfs", "tsrc", a)
            event = json.loads(p.stdout.readline() or b"null")
            assert p.wait(20) == 0, p.stderr.read().decode()
        finally:
            if p.poll() is None:
                p.kill()
    return ready, event


@needs_root
@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOSYS])
def test_auto_falls_back_to_listmount_when_fanotify_init_fails(
    private_ns: PrivateNs, err: int
) -> None:
    ready, event = _watch_under_seccomp(private_ns, f"300={err}")  # fanotify_init
    assert ready["type"] == "ready" and ready["source"] == "listmount", ready
    name = errno.errorcode[err]
    assert ready["reason"] == f"fanotify_init: {name} (Linux 6.15+ needed); using listmount"
    assert event["type"] == "event" and event["action"] == "mount"
    assert event["via"] == "mountinfo" and event["pid"] is None
    assert event["mount"]["id"] >= 2**31 and event["mount"]["source"] == "tsrc"


@needs_root
def test_auto_falls_back_to_mountinfo_without_listmount(private_ns: PrivateNs) -> None:
    ready, event = _watch_under_seccomp(private_ns, "300=22,458=38")  # + listmount ENOSYS
    assert ready["source"] == "mountinfo", ready
    assert ready["reason"] == (
        "fanotify_init: EINVAL (Linux 6.15+ needed); using listmount; "
        "listmount: ENOSYS (Linux 6.8+ needed); using mountinfo"
    )
    assert event["mount"]["id"] is None and event["mount"]["source"] == "tsrc"


# ------------------------------------------------------------------- sweeps


async def _events(frames: AsyncIterator[Frame], until: Any, timeout: float = 10.0) -> list[Event]:
    """Events until `until(events)` holds (a clear failure after `timeout`)."""
    got: list[Event] = []
    with anyio.move_on_after(timeout):
        async for f in frames:
            if isinstance(f, Event):
                got.append(f)
                if until(got):
                    return got
    raise AssertionError(f"not within {timeout}s; got {got!r}")


@pytest.mark.anyio
async def test_make_shared_alone_is_found_by_the_interval_sweep(private_ns: PrivateNs) -> None:
    """No POLLPRI, no event: only the sweep every `sweep_interval` sees it."""
    from amountd.sources.listmount import ListmountSource

    ns = private_ns
    a = ns.path("a")
    ns.mkdir(a)
    ns.run("mount", "-t", "tmpfs", "tsrc", a)
    async with ListmountSource(resolve_ns(ns.pid), sweep_interval=0.3) as src:
        frames = frames_of(src)
        assert isinstance(await anext(frames), Ready)
        ns.run("mount", "--make-shared", a)
        [ev] = await _events(frames, lambda evs: len(evs) >= 1)
        assert src.sweeps >= 1
        assert ev.action == "propagation" and ev.old is not None
        assert (ev.old.propagation, ev.mount.propagation[:7]) == ("", "shared:")
        await frames.aclose()


@pytest.mark.anyio
async def test_remount_hidden_behind_mounts_is_reported(private_ns: PrivateNs) -> None:
    """A remount made in the same instant as mounts and umounts (one POLLPRI may stand
    for them all): the sweep that every POLLPRI makes due finds it."""
    ns = private_ns
    a, b, c = ns.path("a"), ns.path("b"), ns.path("c")
    ns.mkdir(a, b, c)
    ns.run("mount", "-t", "tmpfs", "-o", "size=1m", "old", a)
    ns.run("mount", "-t", "tmpfs", "gone", c)
    async with watch(source="listmount", ns=ns.pid) as frames:
        assert isinstance(await anext(frames), Ready)
        ta, tb, tc = (p.decode() for p in (a, b, c))
        _script(ns, f"tmpfs {tb}", f"remount {ta} ro", f"umount {tc}")
        evs = await _events(
            frames, lambda evs: {e.action for e in evs} >= {"mount", "umount", "remount"}
        )
        [remount] = [e for e in evs if e.action == "remount"]
        assert remount.old is not None and remount.old.fs_options == "rw,size=1024k"
        assert (remount.mount.options, remount.mount.fs_options) == ("ro,relatime", "ro,size=1024k")
        await no_more_frames(frames)


@pytest.mark.anyio
@pytest.mark.parametrize("source", ["listmount", "fanotify", "mountinfo"])
async def test_an_umount_and_an_old_clone_attached_together_are_both_seen(
    private_ns: PrivateNs, source: str
) -> None:
    """A mount's clone made early (so its ID is below the highest one listed) attached
    as another mount goes, back to back: the mount count holds and no new ID appears,
    so listmount's cheap relist sees nothing; the sweep's check of the gone mount
    makes the whole list be taken. Every source ends with the kernel's table."""
    ns = private_ns
    a, b, src, dst = ns.path("a"), ns.path("b"), ns.path("src"), ns.path("dst")
    ns.mkdir(a, b, src, dst)
    ns.run("mount", "-t", "tmpfs", "gone", a)
    ns.run("mount", "-t", "tmpfs", "cloned", src)
    cmd = ["nsenter", "-t", str(ns.pid), "-m", "--", sys.executable, str(HERE / "nsscript.py")]
    driver = subprocess.Popen(
        [*cmd, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert driver.stdin is not None and driver.stdout is not None
    try:
        driver.stdin.write(f"clone {src.decode()}\n")
        assert driver.stdout.readline() == "ok\n"
        ns.run("mount", "-t", "tmpfs", "later", b)  # an ID above the clone's
        async with watch(source=source, ns=ns.pid, snapshot=True) as frames:
            table = apply_frame(MountTable(), await anext(frames))
            assert len(table) > 0 and isinstance(await anext(frames), Ready)
            driver.stdin.write(f"umount {a.decode()} ; attach {src.decode()} {dst.decode()}\n")
            assert driver.stdout.readline() == "ok\n"
            evs = await _events(frames, lambda evs: {e.action for e in evs} >= {"mount", "umount"})
            [gone] = [e.mount for e in evs if e.action == "umount"]
            [came] = [e.mount for e in evs if e.action == "mount"]
            assert (gone.target, gone.source) == (a.decode(), "gone")
            assert (came.target, came.source) == (dst.decode(), "cloned")
            for e in evs:
                table = apply_frame(table, e)
            kernel = parse_mountinfo(Path(f"/proc/{ns.pid}/mountinfo").read_bytes())
            assert sorted(m.target for m in table) == sorted(m.target for m in kernel)
            await no_more_frames(frames)
    finally:
        driver.stdin.close()
        driver.wait(10)


async def test_cycles_lose_no_remount(private_ns: PrivateNs, source: str) -> None:
    """mount, then remount,ro 0 to 2 ms later, then umount, over and over: each mount's
    last state before its umount, as the consumer holds it, is read-only (reported as a
    remount, or as a mount that was already read-only when described). The fanotify
    source too (issue 13): its POLLPRI is explained by the mount's event, and the
    remount is found only because every POLLPRI owes a sweep."""
    ns = private_ns
    d = ns.path("cyc")
    ns.mkdir(d)
    cycles = int(os.environ.get("AMOUNTD_CYCLES", "1000"))
    cmd = ["nsenter", "-t", str(ns.pid), "-m", "--", sys.executable, str(HERE / "nsscript.py")]
    driver = subprocess.Popen(
        [*cmd, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert driver.stdin is not None and driver.stdout is not None

    def op(line: str) -> None:
        assert driver.stdin is not None and driver.stdout is not None
        driver.stdin.write(line + "\n")
        assert driver.stdout.readline() == "ok\n"

    remounts = 0
    try:
        async with watch(source=source, ns=ns.pid) as frames:
            table = MountTable()
            assert isinstance(await anext(frames), Ready)
            for i in range(cycles):
                # from a thread: the loop (and the watch) runs while the driver works
                await anyio.to_thread.run_sync(op, f"cycle {d.decode()} {i % 5 * 500}")
                evs = await _events(
                    frames, lambda evs: evs[-1].mount.options == "ro,relatime", timeout=10
                )
                remounts += sum(e.action == "remount" for e in evs)
                for e in evs:
                    table = apply_frame(table, e)
                top = evs[-1].mount
                assert table[top.key].options == "ro,relatime"
                await anyio.to_thread.run_sync(op, f"umount {d.decode()}")
                [ev] = await _events(frames, lambda evs: True)
                assert (ev.action, ev.mount.key, ev.mount.options) == (
                    "umount",
                    top.key,
                    "ro,relatime",
                )
    finally:
        driver.stdin.close()
        driver.wait(10)
    print(f"{remounts} of {cycles} remounts came as their own event")
    assert remounts, "no remount came after its mount was described: the test tests little"


test_cycles_lose_no_remount = pytest.mark.anyio(
    pytest.mark.parametrize("source", ["listmount", "fanotify"])(test_cycles_lose_no_remount)
)


# ------------------------------------------------------- back to back, property


SLOTS = 6
KINDS = ("tmpfs", "bind", "umount", "remount", "prop")
HOWS = ("ro", "rw", "size=2048k", "size=3072k", "bind,ro", "bind,rw")
PROPS = ("shared", "private", "slave", "unbindable")
Choice = tuple[int, int, int]
choices = st.tuples(st.integers(0, 63), st.integers(0, 63), st.integers(0, 63))


def _ops(base: str, drawn: list[Choice]) -> list[str]:
    """Valid ops over slots base/s0..s5, one mount at most each (a flat table: nothing
    is mounted beneath a slot, so propagation copies nothing), tracked here."""
    mounted: dict[int, bool] = {}  # slot -> unbindable
    out: list[str] = []
    for k, i, j in drawn:
        free = [s for s in range(SLOTS) if s not in mounted]
        busy = sorted(mounted)
        bindable = [s for s in busy if not mounted[s]]
        usable = {
            "tmpfs": bool(free),
            "bind": bool(free and bindable),
            "umount": bool(busy),
            "remount": bool(busy),
            "prop": bool(busy),
        }
        kind = [kd for kd in KINDS if usable[kd]][k % sum(usable.values())]
        if kind == "tmpfs":
            s = free[i % len(free)]
            out.append(f"tmpfs {base}/s{s}")
            mounted[s] = False
        elif kind == "bind":
            src, dst = bindable[i % len(bindable)], free[j % len(free)]
            out.append(f"bind {base}/s{src} {base}/s{dst}")
            mounted[dst] = False
        elif kind == "umount":
            s = busy[i % len(busy)]
            out.append(f"umount {base}/s{s}")
            del mounted[s]
        elif kind == "remount":
            out.append(f"remount {base}/s{busy[i % len(busy)]} {HOWS[j % len(HOWS)]}")
        else:
            s, how = busy[i % len(busy)], PROPS[j % len(PROPS)]
            out.append(f"prop {base}/s{s} {how}")
            if how != "slave":  # make-slave leaves an unbindable mount unbindable
                mounted[s] = how == "unbindable"
    return out


def _fields(m: Mount) -> tuple[Any, ...]:
    return (m.legacy_parent_id, m.dev, m.target, m.root, m.source, m.fstype, m.options,
            m.fs_options, m.propagation)  # fmt: skip


class _Consumer:
    def __init__(self, frames: AsyncIterator[Frame]) -> None:
        self.frames = frames
        self.table = MountTable()

    async def follow(self) -> None:
        async for f in self.frames:
            self.table = apply_frame(self.table, f)


@settings(
    max_examples=int(os.environ.get("AMOUNTD_AGREE_EXAMPLES", "8")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=st.lists(choices, min_size=5, max_size=30))
@pytest.mark.anyio
async def test_back_to_back_changes_end_in_equal_tables(
    drawn: list[Choice], tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("b2b") / "scratch"
    base.mkdir()
    ns = PrivateNs(base)
    try:
        ns.mkdir(*(ns.path(f"s{i}") for i in range(SLOTS)))
        target = resolve_ns(ns.pid)
        ops = _ops(str(base), drawn)
        note("ops:\n  " + "\n  ".join(ops))
        from amountd.sources.fanotify import read_kernel_table

        def mountinfo() -> MountTable:
            data = Path(f"/proc/{ns.pid}/mountinfo").read_bytes()
            return MountTable(parse_mountinfo(data, ns_id=target.ns_id))

        async with (
            watch(source="listmount", ns=ns.pid, snapshot=True) as lstream,
            watch(source="mountinfo", ns=ns.pid, snapshot=True) as mstream,
            watch(source="fanotify", ns=ns.pid, snapshot=True) as fstream,
            anyio.create_task_group() as tg,
        ):
            lm, mi, fn = _Consumer(lstream), _Consumer(mstream), _Consumer(fstream)
            tg.start_soon(lm.follow)
            tg.start_soon(mi.follow)
            tg.start_soon(fn.follow)
            _script(ns, *ops)
            # Propagation changes raise no POLLPRI: a remount to what the scratch mount
            # already is raises one, and makes both look.
            _script(ns, f"remount {base} bind,rw")
            deadline = anyio.current_time() + 10
            while anyio.current_time() < deadline:
                kernel = read_kernel_table(target)
                if lm.table == kernel == fn.table and mi.table == mountinfo():
                    break
                await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        kernel = read_kernel_table(target)
        differ = [(m, kernel.get(m.key)) for m in lm.table if kernel.get(m.key) != m]
        assert lm.table == kernel, f"listmount: {differ}, missing {set(kernel) - set(lm.table)}"
        differ = [(m, kernel.get(m.key)) for m in fn.table if kernel.get(m.key) != m]
        assert fn.table == kernel, f"fanotify: {differ}, missing {set(kernel) - set(fn.table)}"
        assert mi.table == mountinfo()
        a = {m.legacy_id: _fields(m) for m in lm.table}
        b = {m.legacy_id: _fields(m) for m in mi.table}
        assert a == b
    finally:
        ns.close()

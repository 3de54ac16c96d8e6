"""Namespaces: pivot_root, user namespaces, and a namespace's end, seen from outside."""

from __future__ import annotations

import os
import subprocess
import sys

import anyio
import pytest

from amountd import watch
from amountd.model import End, Event, Ready, decode_json
from amountd.table import MountTable, apply_frame

from ..conftest import PrivateNs, next_frames, run_cli
from ..nsharness import kernel_table

PIVOT = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
new = sys.argv[1].encode()
os.chdir(new)
assert libc.syscall(155, b".", b"old") == 0, os.strerror(ctypes.get_errno())  # pivot_root
os.chdir("/")
assert libc.mount(b"after", b"/x", b"tmpfs", 0, None) == 0, os.strerror(ctypes.get_errno())
print("done", flush=True)
time.sleep(300)
"""


@pytest.mark.anyio
async def test_pivot_root_targets_follow_the_new_root(private_ns: PrivateNs) -> None:
    ns = private_ns
    new = ns.path("newroot")
    ns.mkdir(new)
    ns.run("mount", "-t", "tmpfs", "nr", new)
    ns.mkdir(new + b"/old", new + b"/x")
    async with watch(source="fanotify", ns=ns.pid, snapshot=True) as frames:
        snap, _ = await next_frames(frames, 2)
        table = apply_frame(MountTable(), snap)
        proc = subprocess.Popen(
            ["nsenter", "-t", str(ns.pid), "-m", "--", sys.executable, "-c", PIVOT, new],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"done\n"
            seen: list[Event] = []
            with anyio.move_on_after(1):
                async for frame in frames:
                    assert isinstance(frame, Event)
                    seen.append(frame)
                    table = apply_frame(table, frame)
            by_target = {e.mount.target: e for e in seen}
            assert by_target["/"].action == "move"
            assert by_target["/"].old is not None
            assert by_target["/"].old.target == ns.path("newroot").decode()
            assert by_target["/old"].action == "move"
            assert by_target["/old"].old is not None
            assert by_target["/old"].old.target == "/"
            assert by_target["/x"].action == "mount"
            assert by_target["/x"].mount.source == "after"
            # the old root's submounts moved below /old with it
            assert any(t.startswith("/old/") for t in by_target)
            assert table == kernel_table(ns)
        finally:
            proc.kill()
            proc.wait()


def _unshare_user(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["unshare", "-Urm", sys.executable, "-m", "amountd", *args],
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_user_namespace_uses_fanotify_and_says_what_it_forbids(private_ns: PrivateNs) -> None:
    res = _unshare_user("watch", "--json", "--timeout", "0.3")
    if res.returncode != 0 and b"unshare" in res.stderr:
        pytest.skip(f"cannot make a user namespace here: {res.stderr.decode().strip()}")
    ready = decode_json(res.stdout.splitlines()[0])
    assert isinstance(ready, Ready)
    assert ready.source == "fanotify"
    assert ready.reason is not None
    assert ready.reason.startswith("pid and comm are not reported")
    res = _unshare_user("watch", "--json", "--timeout", "0.3", "--unlimited-queue")
    ready = decode_json(res.stdout.splitlines()[0])
    assert isinstance(ready, Ready)
    assert ready.source == "fanotify"
    assert ready.reason is not None
    assert "--unlimited-queue needs real root" in ready.reason
    assert "pid and comm are not reported" in ready.reason
    # A namespace owned by the parent user namespace may not be watched from inside.
    res = _unshare_user("watch", "--ns", str(private_ns.pid), "--source", "fanotify")
    err = res.stderr.decode()
    assert res.returncode == 1, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_user_namespace_sees_its_own_mounts() -> None:
    script = (
        f"{sys.executable} -m amountd watch --json --count 1 --timeout 10 & "
        "sleep 1; mount -t tmpfs userns-tmp /mnt; wait"
    )
    res = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script], capture_output=True, timeout=30, check=False
    )
    if res.returncode != 0 and b"unshare:" in res.stderr:
        pytest.skip(f"cannot make a user namespace here: {res.stderr.decode().strip()}")
    frames = [decode_json(line) for line in res.stdout.splitlines()]
    assert isinstance(frames[0], Ready)
    assert frames[0].source == "fanotify"
    ev = frames[1]
    assert isinstance(ev, Event)
    assert (ev.action, ev.mount.target, ev.mount.source) == ("mount", "/mnt", "userns-tmp")
    assert (ev.pid, ev.comm) == (None, None)  # fanotify names pids to real root only


@pytest.mark.parametrize("source", ["fanotify", "mountinfo"])
def test_watch_exits_0_with_end_when_the_namespace_goes(private_ns: PrivateNs, source: str) -> None:
    ns = private_ns
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amountd",
            "watch",
            "--json",
            "--ns",
            str(ns.pid),
            "--source",
            source,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert isinstance(decode_json(proc.stdout.readline()), Ready)
        ns.close()
        assert proc.wait(15) == 0
        frames = [decode_json(line) for line in proc.stdout.read().splitlines()]
        assert isinstance(frames[-1], End)
        if source == "fanotify":
            assert "was freed" in frames[-1].reason
        else:
            assert "exited" in frames[-1].reason
    finally:
        proc.kill()
        proc.wait()


def test_bad_namespace_run_cli_messages() -> None:
    res = run_cli("watch", "--source", "fanotify", "--ns", "/proc/self/ns/net")
    assert res.returncode == 1
    assert b"not a mount namespace" in res.stderr


def test_without_cap_sys_chroot_propagate_from_degrades_and_says_so(
    private_ns: PrivateNs,
) -> None:
    """setns() needs CAP_SYS_CHROOT: without it the watch goes on, and ready says what it lost."""
    cmd = [
        "setpriv", "--bounding-set=-sys_chroot", "--inh-caps=-sys_chroot",
        sys.executable, "-m", "amountd", "watch", "--json", "--ns", str(private_ns.pid),
        "--timeout", "0.3",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    assert b"Traceback" not in res.stderr
    ready = decode_json(res.stdout.splitlines()[0])
    assert isinstance(ready, Ready)
    assert ready.source == "fanotify"
    assert ready.reason is not None
    assert "propagate_from of slave mounts reads 0" in ready.reason
    assert "CAP_SYS_CHROOT" in ready.reason


@pytest.mark.anyio
async def test_mountinfo_source_of_an_exiting_process_is_a_namespace_error() -> None:
    """A process that has let go of its namespaces (here a zombie; in life, one that is
    exiting while `--all-namespaces` arms) makes /proc/PID/mountinfo say EINVAL: that is
    "the process has exited", which a multi-namespace server skips, not a crash."""
    from amountd.errors import NamespaceError
    from amountd.ns import Namespace
    from amountd.sources.mountinfo_poll import MountinfoSource

    st = os.stat("/proc/self/ns/mnt")
    child = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
        src = MountinfoSource(Namespace(None, child.pid, None, st.st_ino, st.st_dev))
        with pytest.raises(NamespaceError, match="has exited"):
            await src.arm()
        src.close()
    finally:
        child.wait()

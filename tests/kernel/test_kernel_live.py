"""Live tests of amountd.kernel.syscalls against the running kernel.

Root only. Each test builds its mounts inside its own private mount namespace (a child
`unshare -m --propagation private sleep`, driven with `nsenter -t PID -m`), watched and
described from here; the host's mount table is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from amountd.kernel import consts as c
from amountd.kernel import syscalls as k
from amountd.kernel.errors import KernelError, MountGone, NamespaceGone, Unsupported
from amountd.kernel.layouts import FanEvent, parse_statmount, statmount_to_mount
from amountd.model import Mount, fspath_bytes

from ..nsharness import PrivateNs

T = TypeVar("T")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the tests mount inside private mount namespaces"
    try:
        k.listmount()
    except Unsupported as e:
        return str(e)
    return None


pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]

A, D = c.FAN_MNT_ATTACH, c.FAN_MNT_DETACH
COMPARED = [f for f in Mount.__struct_fields__ if f not in ("id", "parent_id", "ns_id")]


class Namespace(PrivateNs):
    """A private namespace (a child of `parent`'s, else of ours), open as an fd, by ID.

    Nothing is mounted on its `base`: each test mounts what it needs on its own `base`.
    """

    def __init__(self, parent: Namespace | None = None, propagation: str = "private") -> None:
        self.fd = -1
        super().__init__(size=None, parent=parent, propagation=propagation)
        try:
            self.fd = os.open(f"/proc/{self.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            self.ns_id = k.mntns_id(self.fd)
        except BaseException:
            self.close()
            raise

    def mounts(self) -> list[Mount]:
        from amountd.mountinfo import parse_mountinfo

        return parse_mountinfo(self.mountinfo())

    def inside(self, fn: Callable[[], T]) -> T:
        """Run fn in a thread that entered this namespace (for the caller-relative bits)."""
        out: list[T] = []
        err: list[BaseException] = []

        def run() -> None:
            try:
                k.enter_mntns(self.fd)
                out.append(fn())
            except BaseException as e:
                err.append(e)

        t = threading.Thread(target=run)
        t.start()
        t.join()
        if err:
            raise err[0]
        return out[0]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()


@pytest.fixture
def ns() -> Iterator[Namespace]:
    n = Namespace()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def base(tmp_path: Path) -> str:
    # An empty host directory; the namespace mounts a tmpfs on it and works inside.
    return str(tmp_path)


VARIED = r"""
B={base}
mount -t tmpfs -o size=4m,mode=755 base "$B"
cd "$B"
mkdir t bind robind rosb flags strict shared peer slave slave2 unb "lo w" up work ovl
mount -t tmpfs -o size=1m,nr_inodes=100,mode=700 tsrc t
mkdir t/sub
mount --bind t/sub bind
mount --bind -o ro t robind
mount -t tmpfs rosb rosb
mount -o remount,ro rosb
mount -t tmpfs -o nosuid,nodev,noexec,noatime flags flags
mount -o remount,bind,nosymfollow,nodev flags
mount -t tmpfs -o strictatime,sync,nodiratime,lazytime strict strict
mount -t tmpfs shared shared
mount --make-shared shared
mount --bind shared peer
mount --bind shared slave
mount --make-slave slave
mount --bind shared slave2
mount --make-slave slave2
mount --make-shared slave2
mkdir shared/sub
mount -t tmpfs sub shared/sub
mount -t tmpfs unb unb
mount --make-unbindable unb
W="$(printf 'we ird\n\\tab\there\377\376')"
mkdir "$W"
mount -t tmpfs "my src\\x" "$W"
mount -t overlay ovl -o "lowerdir=$B/lo w,upperdir=$B/up,workdir=$B/work" ovl
"""


def _by_legacy(mounts: list[Mount]) -> dict[int, Mount]:
    out = {m.legacy_id: m for m in mounts if m.legacy_id is not None}
    assert len(out) == len(mounts)
    return out


def _fields(m: Mount) -> dict[str, object]:
    return {f: getattr(m, f) for f in COMPARED}


def test_listmount_counts_every_mountinfo_line(ns: Namespace, base: str) -> None:
    ns.sh(VARIED.format(base=base))
    ids = k.listmount(ns.ns_id)
    mountinfo = ns.mounts()
    assert len(ids) == len(mountinfo) > 20
    assert ids == sorted(set(ids)) and all(i >= 1 << 31 for i in ids)
    nr_mounts, ns_id = k.mntns_info(ns.fd)
    assert (nr_mounts, ns_id) == (len(ids), ns.ns_id)
    # a subtree: listmount(id) lists what is below id, not id itself
    top = k.statx_mnt_id(f"/proc/{ns.pid}/root{base}")
    below = k.listmount(ns.ns_id, root=top)
    under = [m for m in mountinfo if (m.target or "").startswith(base + "/")]
    assert top not in below and len(below) == len(under) > 10


def test_every_mount_equals_its_mountinfo_record(ns: Namespace, base: str) -> None:
    ns.sh(VARIED.format(base=base))
    want = _by_legacy(ns.mounts())
    got = [k.stat_mount(i, ns.ns_id) for i in k.listmount(ns.ns_id)]
    assert set(_by_legacy(got)) == set(want)
    ids = {m.id for m in got}
    for m in got:
        assert m.legacy_id is not None
        assert _fields(m) == _fields(want[m.legacy_id])
        assert m.ns_id == ns.ns_id
        assert (
            m.parent_id in ids or m.legacy_parent_id not in want
        )  # only "/" has an outside parent
    kinds = {m.propagation for m in got}
    assert {"", "unbindable"} <= kinds
    assert any(p and p.startswith("shared:") and " master:" in p for p in kinds)
    assert any(m.fstype == "overlay" and "/lo w," in (m.fs_options or "") for m in got)
    weird = [m for m in got if m.target and fspath_bytes(m.target).endswith(b"here\xff\xfe")]
    assert len(weird) == 1 and weird[0].source == "my src\\x"


def test_same_answers_from_inside_the_namespace(ns: Namespace, base: str) -> None:
    ns.sh(VARIED.format(base=base))
    want = _by_legacy(ns.mounts())

    def describe() -> list[Mount]:
        return [k.stat_mount(i) for i in k.listmount()]

    got = ns.inside(describe)
    assert len(got) == len(want)
    for m in got:
        assert m.legacy_id is not None
        assert _fields(m) == _fields(want[m.legacy_id])
        assert m.ns_id == ns.ns_id


def test_propagate_from_needs_a_caller_inside_the_namespace(base: str) -> None:
    """`master:N propagate_from:M`: statmount computes it against the caller's root."""
    outer = Namespace()
    inner: Namespace | None = None
    try:
        outer.sh(
            f"""mount -t tmpfs pf {base}; mkdir {base}/a {base}/b {base}/c
            mount -t tmpfs pfa {base}/a; mount --make-shared {base}/a
            mount --bind {base}/a {base}/b; mount --make-slave {base}/b
            mount --make-shared {base}/b"""
        )
        inner = Namespace(outer, propagation="unchanged")
        inner.sh(f"mount --bind {base}/b {base}/c; mount --make-slave {base}/c; umount {base}/b")
        (want,) = [m for m in inner.mounts() if m.target == f"{base}/c"]
        assert want.propagation is not None and " propagate_from:" in want.propagation
        mnt_id = k.statx_mnt_id(f"/proc/{inner.pid}/root{base}/c")
        from_inside = inner.inside(lambda: k.stat_mount(mnt_id))
        assert _fields(from_inside) == _fields(want)
        # From outside, 6.18 answers propagate_from 0: only master:N is left.
        from_outside = k.stat_mount(mnt_id, inner.ns_id)
        assert from_outside.propagation == want.propagation.split(" propagate_from:")[0]
        assert _fields(from_outside) | {"propagation": want.propagation} == _fields(want)
    finally:
        if inner is not None:
            inner.close()
        outer.close()


def test_statx_gives_the_unique_id(ns: Namespace, base: str) -> None:
    ns.sh(f"mount -t tmpfs sx {base}")
    mnt_id = k.statx_mnt_id(f"/proc/{ns.pid}/root{base}")
    m = k.stat_mount(mnt_id, ns.ns_id)
    assert m.target == base and m.source == "sx" and m.id == mnt_id
    fd = os.open(f"/proc/{ns.pid}/root{base}", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert k.statx_mnt_id("", fd) == mnt_id
        assert k.statx_mnt_id(".", fd) == mnt_id
    finally:
        os.close(fd)


def test_long_strings_grow_the_buffer(ns: Namespace, base: str) -> None:
    part = "d" * 200
    deep = base + ("/" + part) * 18  # ~3.6 KiB: more than a 4 KiB answer holds with the rest
    ns.sh(f"mount -t tmpfs long {base}; mkdir -p {deep}; mount -t tmpfs -o size=7m deep {deep}")
    mnt_id = k.statx_mnt_id(f"/proc/{ns.pid}/root{deep}")

    def fresh_thread() -> tuple[bytes, Mount]:
        return k.statmount(mnt_id, ns.ns_id, c.STATMOUNT_ALL), k.stat_mount(mnt_id, ns.ns_id)

    out: list[tuple[bytes, Mount]] = []
    t = threading.Thread(target=lambda: out.append(fresh_thread()))
    t.start()
    t.join()
    raw, m = out[0]
    assert len(raw) > 4096
    assert parse_statmount(raw).mnt_point == deep.encode()
    assert m.target == deep and m.fs_options == "rw,size=7168k"


def test_errors_say_what_happened(base: str) -> None:
    n = Namespace()
    try:
        n.sh(f"mount -t tmpfs gone {base}")
        mnt_id = k.statx_mnt_id(f"/proc/{n.pid}/root{base}")
        legacy = statmount_to_mount(parse_statmount(k.statmount(mnt_id, n.ns_id))).legacy_id
        n.sh(f"umount {base}")
        with pytest.raises(MountGone) as gone:
            k.statmount(mnt_id, n.ns_id)
        assert gone.value.mnt_id == mnt_id
        with pytest.raises(MountGone):
            k.listmount(n.ns_id, root=mnt_id)
        assert legacy is not None
        with pytest.raises(KernelError, match="not a unique mount ID"):
            k.statmount(legacy, n.ns_id)
        with pytest.raises(MountGone):  # a mount of another namespace, without its ns_id
            k.statmount(k.listmount(n.ns_id)[-1])
        ns_id = n.ns_id
    finally:
        n.close()  # closes our fd on the namespace too: nothing keeps it alive
    deadline = time.monotonic() + 5
    while True:
        try:
            k.listmount(ns_id)
        except NamespaceGone as e:
            assert e.ns_id == ns_id and str(ns_id) in str(e)
            break
        assert time.monotonic() < deadline, "the namespace outlived its last process"
        time.sleep(0.01)
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        with pytest.raises(KernelError, match="not a mount namespace file"):
            k.mntns_id(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ fanotify


def _group(ns: Namespace, *, by_fd: bool = False) -> int:
    fan = k.fanotify_init(c.FAN_REPORT_MNT | c.FAN_CLOEXEC | c.FAN_NONBLOCK)
    if by_fd:
        k.fanotify_mark(fan, c.FAN_MARK_ADD | c.FAN_MARK_MNTNS, A | D, ns.fd, None)
    else:
        k.fanotify_mark(
            fan, c.FAN_MARK_ADD | c.FAN_MARK_MNTNS, A | D, path=f"/proc/{ns.pid}/ns/mnt"
        )
    return fan


def _read_all(fan: int, want: int, timeout: float = 5.0) -> list[FanEvent]:
    events: list[FanEvent] = []
    deadline = time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        batch = k.read_fanotify(fan)
        if not batch:
            time.sleep(0.005)
        events += batch
    return events


@pytest.mark.parametrize("by_fd", [False, True], ids=["by-path", "by-fd"])
def test_fanotify_mount_move_umount(ns: Namespace, base: str, by_fd: bool) -> None:
    ns.sh(f"mount -t tmpfs top {base}; mkdir {base}/a {base}/b")
    fan = _group(ns, by_fd=by_fd)
    try:
        ns.sh(f"mount -t tmpfs fa {base}/a")
        mnt_id = k.statx_mnt_id(f"/proc/{ns.pid}/root{base}/a")
        ns.sh(f"mount --move {base}/a {base}/b; mount -o remount,size=2m {base}/b; umount {base}/b")
        events = _read_all(fan, 3)
        assert [(e.mask, e.mnt_id) for e in events] == [(A, mnt_id), (A | D, mnt_id), (D, mnt_id)]
        assert all(e.pid > 0 for e in events)
        assert k.read_fanotify(fan) == []  # the remount gave nothing
    finally:
        os.close(fan)


def test_fanotify_ignores_other_namespaces(ns: Namespace, base: str) -> None:
    other = Namespace()
    try:
        fan = _group(ns)
        try:
            other.sh(f"mount -t tmpfs elsewhere {base}")
            ns.sh(f"mount -t tmpfs here {base}")
            mnt_id = k.statx_mnt_id(f"/proc/{ns.pid}/root{base}")
            assert [(e.mask, e.mnt_id) for e in _read_all(fan, 1)] == [(A, mnt_id)]
            time.sleep(0.05)
            assert k.read_fanotify(fan) == []
        finally:
            os.close(fan)
    finally:
        other.close()


OVERFLOW = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
base = sys.argv[1].encode()
for i in range(int(sys.argv[2])):
    t = base + b"/%d" % i
    os.mkdir(t)
    if libc.mount(base + b"/src", t, None, ctypes.c_ulong(4096), None) < 0:
        sys.exit(os.strerror(ctypes.get_errno()))
"""


def test_fanotify_overflow(ns: Namespace, base: str) -> None:
    ns.sh(f"mount -t tmpfs ov {base}; mkdir {base}/src")
    fan = _group(ns)
    try:
        n = 16384 + 50
        subprocess.run(
            ["nsenter", "-t", str(ns.pid), "-m", sys.executable, "-c", OVERFLOW, base, str(n)],
            check=True,
        )
        events: list[FanEvent] = []
        while batch := k.read_fanotify(fan, 1 << 20):
            events += batch
        *attached, last = events
        assert last.overflow and last.mnt_id is None
        assert len(attached) == 16384  # the default queue size; the rest was lost
        assert all(e.mask == A for e in attached)
        assert len({e.mnt_id for e in attached}) == len(attached)
        # the first attach is the first bind mount
        first = k.statx_mnt_id(f"/proc/{ns.pid}/root{base}/0")
        assert attached[0].mnt_id == first
    finally:
        os.close(fan)

"""Property: the fanotify and mountinfo sources tell the same story of one namespace.

Hypothesis draws 4-10 mount operations, each valid in the namespace's state at the
time it is drawn; one private namespace is watched by BOTH sources at once (two
`watch()` contexts, one task); each operation is applied, both streams are let run
until they are quiet, and the frames each source gave for that operation are compared
as multisets of records without IDs. After every operation (and at the end) each
consumer's table (snapshot + frames, `apply_frame`) must be the kernel's, read afresh
the way that source reads it, and the two consumers' tables must agree field by field.

The state that ops are drawn from is read from the kernel after every op (directories
through /proc/PID/root, the mount a path lands on through /proc/self/fdinfo's mnt_id,
mount facts from the namespace's mountinfo, parsed here, not by amountd): with shared
mounts every mount is copied to the peers, so a model kept by hand would have to
re-implement the kernel's propagation to know which mounts exist.

Differences between the sources that are by design, and what the test does about them:

- Propagation changes (make-shared, -private, -slave, -rshared) raise neither POLLPRI
  nor a fanotify event, so neither source reports them by itself. Later on the
  mountinfo source reports them with its next re-read (any change), the fanotify source
  only with its next sweep (a POLLPRI that no fanotify event explains), so *when* each
  reports them differs. The test asserts that neither says anything for the
  make-shared (etc.) itself, then "flushes": a remount of the scratch mount to the
  options it already has (POLLPRI, no fanotify event, no change) makes both look, and
  that step's frames are compared like any other.
- Order within one op: the kernel queues a lazy umount's DETACHes parent first, the
  mountinfo diff puts children first (and mounts parents first): multisets, not lists.
- IDs and provenance: mountinfo has no unique IDs; `via`, `pid`, `comm`, `seq`, `time`
  are the source's own. Events are compared without `id`/`parent_id`/`ns_id`, the
  legacy IDs and `dev`; the tables are compared by legacy ID, with the legacy parent ID
  and `dev`, and each against its own kernel read with everything.
- The mountinfo source coalesces what happens between two reads (a mount that came and
  went is never seen; fanotify reports it with what it still knew), and a remount at
  the same instant as a mount/umount is only found by fanotify's next sweep. Neither can
  happen here: each op is one command, leaves no short-lived mount, and is applied
  alone, with quiet before the next. They are not excluded: if they happened, the test
  would say so.

A mount propagated beneath a mount that covers its place (and its propagated umount)
reparents the covering mount without any fanotify event; the fanotify source finds and
reports it (test_tucked_mount_is_reported, found by this property).

Runs on both event loops (~35 s each for 20 examples): the sources' POLLPRI thread and
epoll waits are what differ between them.
"""

from __future__ import annotations

import os
import re
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from amountd import watch
from amountd.api import FrameStream
from amountd.model import Event, Frame, Mount, Ready, Snapshot, fspath
from amountd.mountinfo import parse_mountinfo
from amountd.ns import Namespace, resolve_ns
from amountd.sources.fanotify import read_kernel_table
from amountd.table import MountTable, apply_frame

from ..conftest import HAVE_TOOLS, ROOT, PrivateNs


def _skip_reason() -> str | None:
    if not (ROOT and HAVE_TOOLS):
        return "needs root and util-linux unshare/nsenter/mount to make private mount namespaces"
    from amountd.kernel.errors import KernelError
    from amountd.kernel.syscalls import listmount

    try:
        listmount()
    except KernelError as e:
        return f"the fanotify source needs listmount/statmount (Linux 6.15+): {e}"
    return None


pytestmark = [
    pytest.mark.anyio,
    pytest.mark.kernel,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]

QUIET = 0.15  # s with no frame from either source, once both tables match the kernel
SETTLE_LIMIT = 5.0  # s to wait for that before comparing anyway (the asserts then say why)
MAX_MOUNTS = 40  # under the scratch mount: past this, no op that adds mounts is drawn
MAX_DEPTH = 3  # directories below the scratch root that ops may name
MAX_DIRS = 200


# ------------------------------------------------------------------ the kernel's state


_OCTAL = re.compile(r"\\([0-3][0-7]{2})")


def _unmangle(s: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), s)


@dataclass(frozen=True)
class _Line:
    """What the generator needs of one mountinfo line (parsed here, not by amountd)."""

    id: int
    parent: int
    target: str
    shared: bool


def _lines(pid: int) -> dict[int, _Line]:
    out = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6)
            opt = fields[6:sep]
            out[int(fields[0])] = _Line(
                id=int(fields[0]),
                parent=int(fields[1]),
                target=_unmangle(fields[4]),
                shared=any(o.startswith("shared:") for o in opt),
            )
    return out


def _mnt_of(path: str) -> int:
    """The 32-bit ID of the mount `path` lands on (mountpoints followed, like any lookup)."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    finally:
        os.close(fd)
    raise AssertionError(f"no mnt_id in fdinfo of {path}")


@dataclass
class _State:
    """The namespace as ops see it: directories under `base`, and the mountpoints among them."""

    base: str
    dirs: list[str]  # every directory ops may name (base included), sorted
    tops: dict[str, _Line]  # a directory that is a mount's root -> that (top) mount
    leaves: list[str]  # tops with no mount below them (plain umount will not be EBUSY)
    movable: list[str]  # tops whose parent is not shared (--move refuses those)
    mounts: int  # mounts under base


def _state(pid: int, base: str) -> _State:
    root = f"/proc/{pid}/root"
    lines = _lines(pid)
    dirs: list[str] = []
    todo = [(base, 0)]
    while todo and len(dirs) < MAX_DIRS:
        d, depth = todo.pop()
        dirs.append(d)
        if depth >= MAX_DEPTH:
            continue
        try:
            names = sorted(os.listdir(root + d), reverse=True)
        except OSError:
            continue
        for n in names:
            p = f"{d}/{n}"
            if os.path.isdir(root + p) and not os.path.islink(root + p):
                todo.append((p, depth + 1))
    dirs.sort()
    has_child = {ln.parent for ln in lines.values() if ln.parent != ln.id}
    tops: dict[str, _Line] = {}
    for d in dirs:
        if d == base:
            continue
        ln = lines.get(_mnt_of(root + d))
        if ln is not None and ln.target == d:
            tops[d] = ln
    return _State(
        base=base,
        dirs=dirs,
        tops=tops,
        leaves=[d for d, ln in tops.items() if ln.id not in has_child],
        movable=[d for d, ln in tops.items() if not lines[ln.parent].shared],
        mounts=sum(ln.target.startswith(base + "/") for ln in lines.values()),
    )


# ----------------------------------------------------------------------------- ops


@dataclass
class _Op:
    argv: list[str]
    propagation_only: bool = False  # make-shared etc.: no source can see it by itself

    def __str__(self) -> str:
        return shlex.join(self.argv)


Choice = tuple[int, int, int, int]
# An op is drawn up front as four small numbers, resolved against the state when it is
# its turn (so it is valid then): Hypothesis then never draws inside the watches' task
# groups, and shrinks towards 0, the first kind and the first candidates.
choices = st.tuples(*(st.integers(0, 63) for _ in range(4)))

KINDS = ("tmpfs", "bind", "rbind", "remount", "umount", "umount-l", "move", "propagation")
REMOUNTS = ("remount,ro", "remount,rw", "remount,size=3m", "remount,bind,ro", "remount,bind,rw")


def _pick(seq: list[Any] | tuple[Any, ...], i: int) -> Any:
    return seq[i % len(seq)]


def _op(choice: Choice, s: _State, n: int) -> _Op:
    """The op `choice` names in state `s`: valid there, so it must succeed."""
    k, i, j, x = choice
    under = [d for d in s.dirs if d != s.base]  # never stack on the scratch mount itself
    tops = sorted(s.tops)
    moves = [(a, b) for a in s.movable for b in under if b != a and not b.startswith(a + "/")]
    usable = {
        "tmpfs": s.mounts < MAX_MOUNTS,
        "bind": s.mounts < MAX_MOUNTS,
        "rbind": s.mounts < MAX_MOUNTS,
        "remount": bool(tops),
        "umount": bool(s.leaves),
        "umount-l": bool(tops),
        "move": bool(moves),
        "propagation": bool(tops),
    }
    kind = _pick([kd for kd in KINDS if usable[kd]], k)
    event(f"op: {kind}")
    if kind == "tmpfs":
        t = _pick(under, i)
        size = _pick(("1m", "2m"), x)
        script = f"mount -t tmpfs -o size={size} t{n} {t} && mkdir {t}/a {t}/b"
        return _Op(["sh", "-ec", script])
    if kind in ("bind", "rbind"):
        # Half the time from a mountpoint (a tree, for --rbind), else from any directory.
        src = _pick(tops if tops and x % 2 else s.dirs, i)
        return _Op(["mount", f"--{kind}", src, _pick(under, j)])
    if kind == "move":
        a, b = _pick(moves, i * 64 + j)
        return _Op(["mount", "--move", a, b])
    if kind == "remount":
        return _Op(["mount", "-o", _pick(REMOUNTS, x), _pick(tops, i)])
    if kind == "propagation":
        how = _pick(("--make-shared", "--make-private", "--make-slave", "--make-rshared"), x)
        return _Op(["mount", how, _pick(tops, i)], propagation_only=True)
    if kind == "umount":
        return _Op(["umount", _pick(s.leaves, i)])
    return _Op(["umount", "-l", _pick(tops, i)])


# ------------------------------------------------------------------------ consumers


Fields = tuple[Any, ...]


def _fields(m: Mount) -> Fields:
    return (m.target, m.root, m.source, m.fstype, m.options, m.fs_options, m.propagation)


def _norm(ev: Event) -> Fields:
    """An event without IDs, provenance or order: what both sources must agree on."""
    return (ev.action, _fields(ev.mount), None if ev.old is None else _fields(ev.old))


def _by_legacy(t: MountTable) -> dict[int | None, Fields]:
    return {m.legacy_id: (m.legacy_parent_id, m.dev, *_fields(m)) for m in t}


@dataclass
class _Consumer:
    """One watch, followed by a task of its own: frames kept, applied to a table."""

    name: str
    stream: FrameStream
    kernel: Callable[[], MountTable]  # a fresh read of what this source reads
    frames: list[Frame] = field(default_factory=list)
    table: MountTable = field(default_factory=MountTable)
    last: float = 0.0

    async def follow(self) -> None:
        async for frame in self.stream:
            self.frames.append(frame)
            self.table = apply_frame(self.table, frame)
            self.last = anyio.current_time()

    def synced(self) -> bool:
        return self.table == self.kernel()


def _mountinfo_table(pid: int, ns: Namespace) -> Callable[[], MountTable]:
    def read() -> MountTable:
        data = Path(f"/proc/{pid}/mountinfo").read_bytes()
        return MountTable(parse_mountinfo(data, ns_id=ns.ns_id))

    return read


async def _settle(consumers: list[_Consumer], since: float, tables: bool) -> None:
    """Until both tables are the kernel's (if `tables`) and neither stream spoke for QUIET."""
    deadline = anyio.current_time() + SETTLE_LIMIT
    while True:
        await anyio.sleep(0.01)
        now = anyio.current_time()
        quiet = all(now - max(c.last, since) >= QUIET for c in consumers)
        if quiet and (not tables or all(c.synced() for c in consumers)):
            return
        if now > deadline:
            return


def _check_tables(fan: _Consumer, mi: _Consumer, history: list[str]) -> None:
    where = "after:\n  " + "\n  ".join(history)
    kernel = fan.kernel()
    assert fan.table == kernel, (
        f"fanotify consumer's table is not the kernel's {where}\n"
        f" extra/stale: {sorted(set(fan.table) - set(kernel), key=str)}\n"
        f" missing:     {sorted(set(kernel) - set(fan.table), key=str)}"
    )
    mtab = mi.kernel()
    assert mi.table == mtab, (
        f"mountinfo consumer's table is not mountinfo's {where}\n"
        f" extra/stale: {sorted(set(mi.table) - set(mtab), key=str)}\n"
        f" missing:     {sorted(set(mtab) - set(mi.table), key=str)}"
    )
    a, b = _by_legacy(fan.table), _by_legacy(mi.table)
    diff = {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert not diff, (
        f"the two consumers' tables differ (legacy id: (fanotify, mountinfo)) {where}\n{diff}"
    )


def _compare(fan: list[Frame], mi: list[Frame], history: list[str]) -> None:
    where = "after:\n  " + "\n  ".join(history)
    for name, frames in (("fanotify", fan), ("mountinfo", mi)):
        odd = [f for f in frames if not isinstance(f, Event)]
        assert not odd, f"{name} gave frames other than events {where}: {odd}"
    a = Counter(_norm(f) for f in fan if isinstance(f, Event))
    b = Counter(_norm(f) for f in mi if isinstance(f, Event))
    assert a == b, (
        f"the sources disagree {where}\n"
        f" only fanotify:  {sorted((a - b).elements(), key=str)}\n"
        f" only mountinfo: {sorted((b - a).elements(), key=str)}"
    )


# --------------------------------------------------------------------------- test


def _reparented(frames: list[Frame]) -> list[Event]:
    """Moves that left the mount where it was: only its parent changed (tucking)."""
    return [
        f
        for f in frames
        if isinstance(f, Event)
        and f.action == "move"
        and f.old is not None
        and f.old.target == f.mount.target
    ]


async def _follow_ops(
    ns: PrivateNs, ops: list[Choice], fan: _Consumer, mi: _Consumer, history: list[str]
) -> None:
    """Apply each op and compare the frames each source gave for it."""
    both = [fan, mi]
    base = str(ns.base)

    def run(op: _Op) -> tuple[int, int]:
        history.append(str(op))
        note(f"op: {op}")
        start = len(fan.frames), len(mi.frames)
        res = ns.run(*op.argv, check=False)
        assert res.returncode == 0, (
            f"the generator made an invalid op {op} "
            f"({res.stderr.decode(errors='replace').strip()}) after:\n  " + "\n  ".join(history)
        )
        return start

    await _settle(both, anyio.current_time(), tables=True)
    for c in both:
        assert [type(f) for f in c.frames] == [Snapshot, Ready], c.frames
    _check_tables(fan, mi, ["(the snapshots)"])
    for n, choice in enumerate(ops):
        op = _op(choice, _state(ns.pid, base), n)
        f0, m0 = run(op)
        await _settle(both, anyio.current_time(), tables=not op.propagation_only)
        if op.propagation_only:
            # By design no source can see this yet: no POLLPRI, no fanotify event.
            assert fan.frames[f0:] == [], f"fanotify reported {op}: {fan.frames[f0:]}"
            assert mi.frames[m0:] == [], f"mountinfo reported {op}: {mi.frames[m0:]}"
            # The flush: a remount to what the scratch mount already is (it is never
            # remounted otherwise) changes nothing but raises POLLPRI: both look.
            f0, m0 = run(_Op(["mount", "-o", "remount,bind,rw", base]))
            await _settle(both, anyio.current_time(), tables=True)
        _compare(fan.frames[f0:], mi.frames[m0:], history)
        _check_tables(fan, mi, history)
        for f in fan.frames[f0:]:
            if isinstance(f, Event):
                event(f"reported: {f.action}")


@settings(
    # Each example runs real mounts (~1.5 s); AMOUNTD_AGREE_EXAMPLES=500 for a long hunt.
    max_examples=int(os.environ.get("AMOUNTD_AGREE_EXAMPLES", "20")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(choices, min_size=4, max_size=10))
async def test_both_sources_give_equal_frames(
    ops: list[Choice], tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("agree") / "scratch"
    base.mkdir()
    ns = PrivateNs(base)  # a namespace of its own per example: each starts the same
    history: list[str] = []
    try:
        ns.mkdir(*(ns.path(f"m{i}") for i in range(3)))
        target = resolve_ns(ns.pid)
        failure: AssertionError | None = None
        async with (
            watch(source="fanotify", ns=ns.pid, snapshot=True) as fstream,
            watch(source="mountinfo", ns=ns.pid, snapshot=True) as mstream,
            anyio.create_task_group() as tg,
        ):
            fan = _Consumer("fanotify", fstream, lambda: read_kernel_table(target))
            mi = _Consumer("mountinfo", mstream, _mountinfo_table(ns.pid, target))
            tg.start_soon(fan.follow)
            tg.start_soon(mi.follow)
            try:
                await _follow_ops(ns, ops, fan, mi, history)
            except AssertionError as e:  # raised out here, not wrapped in task groups
                failure = e
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        _check_tables(fan, mi, history)
    finally:
        ns.close()


# ------------------------------------------------------------ found by the property


async def test_tucked_mount_is_reported(private_ns: PrivateNs) -> None:
    ns = private_ns
    a, aa = ns.path("a"), ns.path("a", "a")
    ns.mkdir(a)
    ns.run("mount", "-t", "tmpfs", "A", a)
    ns.run("mount", "--make-shared", a)
    # The copy of scratch covers A; inside it, A's copy (a peer of A) at a/a.
    ns.run("mount", "--rbind", ns.path(), a)
    target = resolve_ns(ns.pid)
    failure: AssertionError | None = None
    async with (
        watch(source="fanotify", ns=ns.pid, snapshot=True) as fstream,
        watch(source="mountinfo", ns=ns.pid, snapshot=True) as mstream,
        anyio.create_task_group() as tg,
    ):
        fan = _Consumer("fanotify", fstream, lambda: read_kernel_table(target))
        mi = _Consumer("mountinfo", mstream, _mountinfo_table(ns.pid, target))
        tg.start_soon(fan.follow)
        tg.start_soon(mi.follow)
        await _settle([fan, mi], anyio.current_time(), tables=True)
        # X on A's copy propagates to A, beneath the scratch copy, which X then carries;
        # its umount propagates too, and gives the scratch copy back to A.
        steps = [("mount", "-t", "tmpfs", "X", aa), ("umount", aa)]
        try:
            for n, argv in enumerate(steps):
                f0, m0 = len(fan.frames), len(mi.frames)
                ns.run(*argv)
                await _settle([fan, mi], anyio.current_time(), tables=True)
                history = [shlex.join(map(os.fsdecode, done)) for done in steps[: n + 1]]
                [moved] = _reparented(mi.frames[m0:])
                assert (moved.mount.source, moved.mount.target) == ("scratch", fspath(a))
                _compare(fan.frames[f0:], mi.frames[m0:], history)
                _check_tables(fan, mi, history)
        except AssertionError as e:  # raised out here, not wrapped in task groups
            failure = e
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure

"""Capture real fanotify and statmount buffers as hex fixtures for
tests/unit/test_kernel_layouts.py.

Run as root:  .venv/bin/python tests/data/kernel/capture.py
It re-executes itself inside a private mount namespace (`unshare -m --propagation
private`), so the host's mount table is never touched, and rewrites fanotify.json and
statmount.json beside this file.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from amountd.kernel import consts as c  # noqa: E402
from amountd.kernel import syscalls as k  # noqa: E402
from amountd.kernel.layouts import parse_statmount  # noqa: E402


def run(*argv: str | bytes) -> None:
    subprocess.run(list(argv), check=True)


def run_pid(*argv: str | bytes) -> int:
    """Run a command; its PID (mount/umount exec in place, so it is the event's pid)."""
    p = subprocess.Popen(list(argv))
    if p.wait() != 0:
        raise RuntimeError(f"{argv!r} failed")
    return p.pid


def mountinfo_line(legacy_id: int, path: str = "/proc/self/mountinfo") -> bytes:
    with open(path, "rb") as f:
        for line in f.read().split(b"\n"):
            if line.split(b" ", 1)[0] == str(legacy_id).encode():
                return line
    raise LookupError(legacy_id)


# ------------------------------------------------------------------------------ statmount


def sm_case(name: str, path: str | bytes, mask: int = c.STATMOUNT_MOUNT) -> dict[str, Any]:
    mnt_id = k.statx_mnt_id(path)
    raw = k.statmount(mnt_id, mask=mask)
    sm = parse_statmount(raw)
    assert sm.mnt_id_old is not None
    return {
        "name": name,
        "mask": mask,
        "hex": raw.hex(),
        "mountinfo_hex": mountinfo_line(sm.mnt_id_old).hex(),
    }


def capture_statmount(base: str) -> list[dict[str, Any]]:
    cases = []
    d = f"{base}/sm"
    os.makedirs(d)

    os.mkdir(f"{d}/tmpfs")
    run("mount", "-t", "tmpfs", "-o", "size=1m,mode=700,nr_inodes=1000", "tsrc", f"{d}/tmpfs")
    cases.append(sm_case("tmpfs_size", f"{d}/tmpfs"))
    cases.append(sm_case("tmpfs_size_all_fields", f"{d}/tmpfs", c.STATMOUNT_ALL))
    no_strings = c.STATMOUNT_SB_BASIC | c.STATMOUNT_MNT_BASIC | c.STATMOUNT_MNT_NS_ID
    cases.append(sm_case("tmpfs_no_strings", f"{d}/tmpfs", no_strings))

    os.makedirs(f"{d}/tmpfs/sub")
    os.mkdir(f"{d}/bind")
    run("mount", "--bind", f"{d}/tmpfs/sub", f"{d}/bind")
    cases.append(sm_case("bind_subdir", f"{d}/bind"))

    os.mkdir(f"{d}/robind")
    run("mount", "--bind", "-o", "ro", f"{d}/tmpfs", f"{d}/robind")
    cases.append(sm_case("ro_bind", f"{d}/robind"))

    os.mkdir(f"{d}/rosb")
    run("mount", "-t", "tmpfs", "rosb", f"{d}/rosb")
    run("mount", "-o", "remount,ro", f"{d}/rosb")
    cases.append(sm_case("remount_ro_superblock", f"{d}/rosb"))

    os.mkdir(f"{d}/flags")
    run("mount", "-t", "tmpfs", "-o", "nosuid,nodev,noexec,noatime,nodiratime,nosymfollow",
        "flags", f"{d}/flags")  # fmt: skip
    cases.append(sm_case("mnt_flags_noatime", f"{d}/flags"))

    os.mkdir(f"{d}/strict")
    run("mount", "-t", "tmpfs", "-o", "strictatime,sync,dirsync,lazytime", "strict", f"{d}/strict")
    cases.append(sm_case("strictatime_sync_dirsync_lazytime", f"{d}/strict"))

    for sub in ("shared", "peer", "slave", "unbind"):
        os.mkdir(f"{d}/{sub}")
    run("mount", "-t", "tmpfs", "shared", f"{d}/shared")
    run("mount", "--make-shared", f"{d}/shared")
    run("mount", "--bind", f"{d}/shared", f"{d}/peer")
    run("mount", "--bind", f"{d}/shared", f"{d}/slave")
    run("mount", "--make-slave", f"{d}/slave")
    run("mount", "--make-shared", f"{d}/slave")
    cases.append(sm_case("shared", f"{d}/shared"))
    cases.append(sm_case("shared_and_slave", f"{d}/slave"))
    run("mount", "-t", "tmpfs", "unbind", f"{d}/unbind")
    run("mount", "--make-unbindable", f"{d}/unbind")
    cases.append(sm_case("unbindable", f"{d}/unbind"))

    weird = os.fsencode(f"{d}/") + b"we ird\n\\tab\there \xff\xfe"
    os.mkdir(weird)
    run(b"mount", b"-t", b"tmpfs", b"my src\\with\tspace", weird)
    cases.append(sm_case("escaped_path_and_source", weird))

    os.mkdir(f"{d}/nosrc")
    nosrc_fd = fsmount_tmpfs_without_source()
    move_mount(nosrc_fd, f"{d}/nosrc")
    cases.append(sm_case("no_source_none", f"{d}/nosrc"))

    for sub in ("lo w", "up", "work", "ovl"):
        os.mkdir(f"{d}/{sub}")
    run("mount", "-t", "overlay", "ovl", "-o",
        f"lowerdir={d}/lo w,upperdir={d}/up,workdir={d}/work", f"{d}/ovl")  # fmt: skip
    cases.append(sm_case("overlay_escaped_option", f"{d}/ovl"))

    os.mkdir(f"{d}/fuse")
    fuse = fuse_mount(f"{d}/fuse")
    if fuse is not None:
        cases.append(sm_case("fuse_subtype", f"{d}/fuse"))
        run("umount", "-l", f"{d}/fuse")
        os.close(fuse)

    os.mkdir(f"{d}/idmap")
    if idmapped_bind(f"{d}/tmpfs", f"{d}/idmap"):
        cases.append(sm_case("idmapped", f"{d}/idmap", c.STATMOUNT_ALL))

    cases.extend(capture_propagate_from(base))
    return cases


def _sys(nr: int, *args: Any) -> int:
    k.libc.syscall.restype = ctypes.c_long
    r: int = k.libc.syscall(ctypes.c_long(nr), *args)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def fsmount_tmpfs_without_source() -> int:
    """A tmpfs made with fsopen/fsmount and no "source": mountinfo shows `none`."""
    fs = _sys(c.SYS_fsopen, b"tmpfs", ctypes.c_uint(1))  # FSOPEN_CLOEXEC
    _sys(c.SYS_fsconfig, ctypes.c_int(fs), ctypes.c_uint(6), None, None, ctypes.c_int(0))
    mfd = _sys(c.SYS_fsmount, ctypes.c_int(fs), ctypes.c_uint(1), ctypes.c_uint(0))
    os.close(fs)
    return mfd


def move_mount(fd: int, target: str) -> None:
    _sys(c.SYS_move_mount, ctypes.c_int(fd), b"", ctypes.c_int(c.AT_FDCWD),
         os.fsencode(target), ctypes.c_uint(4))  # MOVE_MOUNT_F_EMPTY_PATH  # fmt: skip
    os.close(fd)


def fuse_mount(target: str) -> int | None:
    """fuse.amountdtest with no daemon behind it: enough for statmount and mountinfo."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError:
        return None
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    r = k.libc.mount(b"fusesrc", os.fsencode(target), b"fuse.amountdtest", ctypes.c_ulong(0), opts)
    if r < 0:
        print("fuse mount failed:", os.strerror(ctypes.get_errno()), file=sys.stderr)
        os.close(fd)
        return None
    return fd


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def idmapped_bind(src: str, target: str) -> bool:
    """open_tree(CLONE) + mount_setattr(MOUNT_ATTR_IDMAP) + move_mount."""
    user = subprocess.Popen(
        ["unshare", "--user", "--map-user=1000", "--map-group=1000", "sleep", "100"]
    )
    try:
        time.sleep(0.2)
        ufd = os.open(f"/proc/{user.pid}/ns/user", os.O_RDONLY)
        tree = _sys(c.SYS_open_tree, ctypes.c_int(c.AT_FDCWD), os.fsencode(src),
                    ctypes.c_uint(1 | 0o2000000))  # OPEN_TREE_CLONE | CLOEXEC  # fmt: skip
        attr = _MountAttr(c.MOUNT_ATTR_IDMAP, 0, 0, ufd)
        _sys(c.SYS_mount_setattr, ctypes.c_int(tree), b"", ctypes.c_uint(0x1000),
             ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))  # fmt: skip
        move_mount(tree, target)
        os.close(ufd)
        return True
    except OSError as e:
        print("idmapped mount failed:", e, file=sys.stderr)
        return False
    finally:
        user.kill()
        user.wait()


def capture_propagate_from(base: str) -> list[dict[str, Any]]:
    """`master:N propagate_from:M`: a slave whose master group has no member here.

    Made in a nested namespace (peer groups span namespaces) and read by a thread that
    entered it: statmount computes propagate_from against the caller's root.
    """
    d = f"{base}/pf"
    for sub in ("", "/a", "/b", "/c"):
        os.makedirs(d + sub, exist_ok=True)
    run("mount", "-t", "tmpfs", "pfa", f"{d}/a")
    run("mount", "--make-shared", f"{d}/a")
    run("mount", "--bind", f"{d}/a", f"{d}/b")
    run("mount", "--make-slave", f"{d}/b")
    run("mount", "--make-shared", f"{d}/b")
    child = subprocess.Popen(["unshare", "-m", "--propagation", "unchanged", "sleep", "100"])
    try:
        mine = os.readlink("/proc/self/ns/mnt")
        for _ in range(500):
            if os.readlink(f"/proc/{child.pid}/ns/mnt") != mine:
                break
            time.sleep(0.01)
        pid = str(child.pid)
        for cmd in (
            f"mount --bind {d}/b {d}/c",
            f"mount --make-slave {d}/c",
            f"umount {d}/b",
        ):
            run("nsenter", "-t", pid, "-m", "sh", "-ec", cmd)
        out: list[dict[str, Any]] = []
        errors: list[BaseException] = []

        def inside() -> None:
            try:
                fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
                k.enter_mntns(fd)
                os.close(fd)
                mnt_id = k.statx_mnt_id(f"{d}/c")
                raw = k.statmount(mnt_id)
                sm = parse_statmount(raw)
                assert sm.mnt_id_old is not None
                out.append({
                    "name": "slave_propagate_from",
                    "mask": c.STATMOUNT_MOUNT,
                    "hex": raw.hex(),
                    "mountinfo_hex": mountinfo_line(
                        sm.mnt_id_old, f"/proc/{pid}/mountinfo"
                    ).hex(),
                })  # fmt: skip
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=inside)
        t.start()
        t.join()
        if errors:
            raise errors[0]
        return out
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------------------ fanotify


def drain(fan: int) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(os.read(fan, 1 << 20))
        except BlockingIOError:
            return b"".join(chunks)


def fan_case(fan: int, name: str, events: list[tuple[int, int, int | None]]) -> dict[str, Any]:
    time.sleep(0.01)
    data = drain(fan)
    return {"name": name, "hex": data.hex(), "events": [list(e) for e in events]}


def capture_fanotify(base: str) -> list[dict[str, Any]]:
    A, D = c.FAN_MNT_ATTACH, c.FAN_MNT_DETACH
    d = f"{base}/fan"
    for sub in ("", "/m1", "/m2", "/m3", "/tree", "/rb", "/ov"):
        os.makedirs(d + sub, exist_ok=True)
    fan = k.fanotify_init(c.FAN_REPORT_MNT | c.FAN_CLOEXEC | c.FAN_NONBLOCK, os.O_RDONLY)
    k.fanotify_mark(fan, c.FAN_MARK_ADD | c.FAN_MARK_MNTNS, A | D, c.AT_FDCWD,
                    "/proc/self/ns/mnt")  # fmt: skip
    drain(fan)
    cases = []

    pid = run_pid("mount", "-t", "tmpfs", "m1", f"{d}/m1")
    m1 = k.statx_mnt_id(f"{d}/m1")
    cases.append(fan_case(fan, "attach", [(A, pid, m1)]))

    pid = run_pid("umount", f"{d}/m1")
    cases.append(fan_case(fan, "detach", [(D, pid, m1)]))

    run("mount", "-t", "tmpfs", "m2", f"{d}/m2")
    m2 = k.statx_mnt_id(f"{d}/m2")
    drain(fan)
    pid = run_pid("mount", "--move", f"{d}/m2", f"{d}/m3")
    cases.append(fan_case(fan, "move", [(A | D, pid, m2)]))

    p1 = run_pid("mount", "-t", "tmpfs", "m1", f"{d}/m1")
    a = k.statx_mnt_id(f"{d}/m1")
    p2 = run_pid("mount", "-t", "tmpfs", "m2", f"{d}/m2")
    b = k.statx_mnt_id(f"{d}/m2")
    p3 = run_pid("umount", f"{d}/m1")
    cases.append(fan_case(fan, "batch", [(A, p1, a), (A, p2, b), (D, p3, a)]))

    run("mount", "-t", "tmpfs", "tree", f"{d}/tree")
    os.makedirs(f"{d}/tree/x/y")
    run("mount", "-t", "tmpfs", "x", f"{d}/tree/x")
    os.makedirs(f"{d}/tree/x/y")
    run("mount", "-t", "tmpfs", "y", f"{d}/tree/x/y")
    drain(fan)
    pid = run_pid("mount", "--rbind", f"{d}/tree", f"{d}/rb")
    ids = [k.statx_mnt_id(p) for p in (f"{d}/rb", f"{d}/rb/x", f"{d}/rb/x/y")]
    cases.append(fan_case(fan, "rbind_tree", [(A, pid, i) for i in ids]))
    pid = run_pid("umount", "-l", f"{d}/rb")
    cases.append(fan_case(fan, "umount_lazy_tree", [(D, pid, i) for i in ids]))

    cases.append(capture_overflow(fan, f"{d}/ov"))
    os.close(fan)
    return cases


def capture_overflow(fan: int, d: str) -> dict[str, Any]:
    """16,384 events fill the queue; the rest become one FAN_Q_OVERFLOW record.

    Only the last read is kept (the tail of the queue and the overflow record), so the
    fixture stays small; its events are checked against the IDs statx gives.
    """
    n = 16384 + 16
    src = os.fsencode(d)
    os.makedirs(f"{d}/src")
    run("mount", "-t", "tmpfs", "ovsrc", f"{d}/src")
    drain(fan)
    ids = []
    me = os.getpid()
    for i in range(n):
        tgt = os.fsencode(f"{d}/{i}")
        os.mkdir(tgt)
        if k.libc.mount(src + b"/src", tgt, None, ctypes.c_ulong(c.MS_BIND), None) < 0:
            raise OSError(ctypes.get_errno(), "bind mount")
        ids.append(k.statx_mnt_id(tgt))
    reads = []
    while True:
        try:
            reads.append(os.read(fan, 4096 - 4096 % 40 + 24))
        except BlockingIOError:
            break
    last = reads[-1]
    if len(last) < 40 + 24 and len(reads) > 1:  # keep some events before the overflow
        last = reads[-2] + last
    kept = (len(last) - 24) // 40
    events: list[tuple[int, int, int | None]] = [
        (c.FAN_MNT_ATTACH, me, i) for i in ids[16384 - kept : 16384]
    ]
    events.append((c.FAN_Q_OVERFLOW, 0, None))  # the overflow record has pid 0
    return {"name": "overflow_tail", "hex": last.hex(), "events": [list(e) for e in events]}


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("capture.py needs root (it mounts inside a private mount namespace)")
    if "--inner" not in sys.argv:
        os.execvp("unshare", ["unshare", "-m", "--propagation", "private", sys.executable,
                              __file__, "--inner"])  # fmt: skip
    base = tempfile.mkdtemp(prefix="amountd-capture-")
    try:
        run("mount", "-t", "tmpfs", "capture", base)
        meta = {"kernel": os.uname().release, "machine": os.uname().machine}
        sm = capture_statmount(base)
        (HERE / "statmount.json").write_text(json.dumps({**meta, "cases": sm}, indent=1) + "\n")
        fan = capture_fanotify(base)
        (HERE / "fanotify.json").write_text(json.dumps({**meta, "cases": fan}, indent=1) + "\n")
        print(f"captured {len(sm)} statmount and {len(fan)} fanotify cases")
    finally:
        # One lazy detach of the whole tree (umount -R walks 16k mounts one by one).
        k.libc.umount2(os.fsencode(base), c.MNT_DETACH)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

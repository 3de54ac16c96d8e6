"""Mount operations back to back at syscall speed, run INSIDE a private namespace.

    python3 nsscript.py OP [OP ...]     each OP one argument, words split by spaces:
    python3 nsscript.py serve           the same ops from stdin, one a line, "ok" after each

    tmpfs PATH            mount -t tmpfs
    bind SRC DST          mount --bind
    umount PATH
    remount PATH HOW      HOW: ro, rw, size=NNk (the superblock), bind,ro / bind,rw (the mount)
    prop PATH KIND        KIND: shared, private, slave, unbindable (mount --make-KIND)
    cycle PATH [US]       tmpfs on PATH, then remount it ro (US microseconds later: 0)
    clone PATH            a detached copy of the mount at PATH (open_tree), kept by PATH
    attach PATH DST       that copy attached at DST (move_mount)

In `serve`, a line may hold several ops split by " ; ", made back to back.

Test helper only (plain ctypes): one process makes every change, none waits between.
"""

from __future__ import annotations

import os
import sys
import time

from mountcalls import MS_BIND, MS_RDONLY, MS_REMOUNT, PROP, attach_tree, clone_tree, umount
from mountcalls import mount as _mount

CLONES: dict[bytes, int] = {}  # path cloned -> the detached tree's fd


def run(op: str) -> None:
    word, *args = op.split(" ")
    paths = [os.fsencode(a) for a in args]
    if word == "tmpfs":
        _mount(b"t", paths[0], b"tmpfs", 0, None)
    elif word == "bind":
        _mount(paths[0], paths[1], None, MS_BIND, None)
    elif word == "umount":
        umount(paths[0])
    elif word == "remount":
        how = args[1]
        flags = MS_REMOUNT | (MS_BIND if how.startswith("bind,") else 0)
        flags |= MS_RDONLY if how.endswith("ro") else 0
        data = how.encode() if how.startswith("size=") else None
        _mount(None, paths[0], None, flags, data)
    elif word == "prop":
        _mount(None, paths[0], None, PROP[args[1]], None)
    elif word == "cycle":
        _mount(b"t", paths[0], b"tmpfs", 0, None)
        if len(args) > 1:
            time.sleep(int(args[1]) / 1e6)
        _mount(None, paths[0], None, MS_REMOUNT | MS_RDONLY, None)
    elif word == "clone":
        CLONES[paths[0]] = clone_tree(paths[0])
    elif word == "attach":
        attach_tree(CLONES.pop(paths[0]), paths[1])
    else:
        raise SystemExit(f"unknown op {op!r}")


def main() -> None:
    if sys.argv[1:] == ["serve"]:
        for line in sys.stdin:
            for op in line.rstrip("\n").split(" ; "):
                run(op)
            sys.stdout.write("ok\n")
            sys.stdout.flush()
        return
    for op in sys.argv[1:]:
        run(op)


if __name__ == "__main__":
    main()

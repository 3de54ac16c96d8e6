"""Mount churn at syscall speed, run INSIDE a private namespace (via nsenter).

    python3 nsops.py pairs DIR N        N tmpfs mount + umount pairs on DIR
    python3 nsops.py binds DIR N        N bind mounts of DIR/src onto DIR/0..N-1, side by side
    python3 nsops.py churn DIR N        N mount/umount pairs over DIR/0..9, leaving some
    python3 nsops.py tree DIR N         N tmpfs mounts at DIR/0..N-1 (DIR must be a tmpfs)

Test helper only: it runs in the child namespace that the test made, never on the host.
"""

from __future__ import annotations

import os
import sys

from mountcalls import MS_BIND, mount, umount


def main() -> None:
    op, d, n = sys.argv[1], os.fsencode(sys.argv[2]), int(sys.argv[3])
    if op == "pairs":
        for _ in range(n):
            mount(b"pair", d, b"tmpfs")
            umount(d)
    elif op == "binds":
        src = d + b"/src"
        os.makedirs(src, exist_ok=True)
        targets = [d + b"/%d" % i for i in range(n)]
        for p in targets:
            os.makedirs(p, exist_ok=True)
        for p in targets:
            mount(src, p, None, MS_BIND)
    elif op == "tree":
        for i in range(n):
            p = d + b"/%d" % i
            os.makedirs(p, exist_ok=True)
            mount(b"t%d" % i, p, b"tmpfs")
    elif op == "churn":
        slots = [d + b"/%d" % i for i in range(10)]
        for p in slots:
            os.makedirs(p, exist_ok=True)
        depth = [0] * 10
        for i in range(n):
            k = (i * 7) % 10
            if depth[k] < 2:
                mount(b"c%d" % i, slots[k], b"tmpfs")
                depth[k] += 1
            else:
                umount(slots[k])
                depth[k] -= 1
    else:
        raise SystemExit(f"unknown op {op}")


if __name__ == "__main__":
    main()

"""The one private-namespace harness, shared by the tests and the benchmarks.

Every scenario that changes mounts does so inside a child started with
`unshare -m --propagation private`, on a tmpfs mounted inside that child only, driven
with `nsenter`; amountd watches it from outside with `--ns PID`. The host's table is
never touched. No pytest here: `python -m benchmarks` imports this from a checkout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amountd.table import MountTable

HERE = Path(__file__).resolve().parent
ROOT = os.geteuid() == 0
TOOLS = ("unshare", "nsenter", "mount", "umount")
HAVE_TOOLS = all(shutil.which(t) for t in TOOLS)
NO_NS = "needs root and util-linux unshare/nsenter/mount for a private mount namespace"
"""Why a private namespace cannot be made here (tests skip with it when not ROOT)."""

Arg = str | bytes | os.PathLike[str]


class NsError(RuntimeError):
    """The namespace did not start, or a command in it failed."""


class PrivateNs:
    """A sleeping child in a private mount namespace, with a tmpfs scratch area `base`
    that exists in that namespace alone (an empty directory on the host).

    `base` defaults to a fresh temporary directory, removed again by close(); `size`
    None mounts nothing there. A `parent` makes the namespace a child of that one's
    (with `propagation` "unchanged", its mounts stay peers of the parent's).
    """

    def __init__(
        self,
        base: str | os.PathLike[str] | None = None,
        *,
        size: str | None = "4m",
        tag: str = "scratch",
        parent: PrivateNs | None = None,
        propagation: str = "private",
    ) -> None:
        self._own_base = base is None
        self.base = Path(tempfile.mkdtemp(prefix="amountd-ns-") if base is None else base)
        cmd = ["unshare", "-m", f"--propagation={propagation}", "sleep", "infinity"]
        if parent is not None:
            cmd = ["nsenter", "-t", str(parent.pid), "-m", "--", *cmd]
        before = os.readlink(f"/proc/{parent.pid if parent else 'self'}/ns/mnt")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        try:
            self._wait_unshared(before)
            if size is not None:
                self.run("mount", "-t", "tmpfs", "-o", f"size={size}", tag, self.base)
        except BaseException:
            self.close()
            raise

    def _wait_unshared(self, before: str) -> None:
        # nsenter and unshare exec in place: the child's PID ends up as the sleep, in a
        # namespace of its own (nsenter passes through the parent's on the way).
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if (
                    os.readlink(f"/proc/{self.pid}/ns/mnt") != before
                    and Path(f"/proc/{self.pid}/comm").read_text().strip() == "sleep"
                ):
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise NsError("unshare -m did not start a private namespace")
            time.sleep(0.005)

    def argv(self, argv: Sequence[Arg]) -> list[Arg]:
        """`argv` run inside the namespace."""
        return ["nsenter", "-t", str(self.pid), "-m", "--", *argv]

    def run(self, *argv: Arg, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """One command inside the namespace (argv may hold raw bytes: exact paths)."""
        cmd = self.argv(argv)
        res = subprocess.run(cmd, capture_output=True, check=False)
        if check and res.returncode != 0:
            raise NsError(f"{cmd!r} failed: {res.stderr.decode(errors='replace')}")
        return res

    def sh(self, script: str) -> subprocess.CompletedProcess[bytes]:
        return self.run("sh", "-ec", script)

    def path(self, *parts: str | bytes) -> bytes:
        out = os.fsencode(self.base)
        for p in parts:
            out += b"/" + os.fsencode(p)
        return out

    def mkdir(self, *paths: bytes) -> None:
        self.run("mkdir", "-p", *paths)

    def ops(self, op: str, where: bytes, n: int) -> None:
        """Churn at syscall speed inside the namespace (tests/nsops.py)."""
        self.run(sys.executable, str(HERE / "nsops.py"), op, where, str(n))

    def popen_ops(self, op: str, where: bytes, n: int) -> subprocess.Popen[bytes]:
        script = str(HERE / "nsops.py")
        return subprocess.Popen(self.argv([sys.executable, script, op, where, str(n)]))

    def mountinfo(self) -> bytes:
        with open(f"/proc/{self.pid}/mountinfo", "rb") as f:
            return f.read()

    def mount_count(self) -> int:
        return self.mountinfo().count(b"\n")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self._own_base:
            # The namespace (and the tmpfs in it) goes with its last process, so the
            # directory it was mounted on is empty again.
            with contextlib.suppress(OSError):
                os.rmdir(self.base)

    def __enter__(self) -> PrivateNs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kernel_table(ns: PrivateNs | int) -> MountTable:
    """The kernel's table of a namespace (a PrivateNs or any PID in it), read afresh."""
    from amountd.ns import resolve_ns
    from amountd.sources.fanotify import read_kernel_table

    return read_kernel_table(resolve_ns(ns if isinstance(ns, int) else ns.pid))


def ns_id_of(pid: int) -> int:
    """The 64-bit ID of the mount namespace `pid` is in."""
    from amountd.ns import resolve_ns

    ns_id = resolve_ns(pid).ns_id
    assert ns_id is not None
    return ns_id

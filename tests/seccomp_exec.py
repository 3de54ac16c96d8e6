"""Run a command with some syscalls failing: a seccomp filter, then exec (test helper).

    python3 seccomp_exec.py NR=ERRNO[,NR=ERRNO...] -- COMMAND ARGS...

Each listed syscall number returns -1 with that errno (e.g. 300=22: fanotify_init gives
EINVAL on x86_64, as on a kernel before 6.15); everything else is allowed. The filter is
inherited across exec and by children, and cannot be lifted. x86_64 only (the numbers).
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
RET_K = 0x06  # BPF_RET | BPF_K


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(rules: list[tuple[int, int]]) -> bytes:
    """struct seccomp_data: nr at 0, arch at 4. Another arch: allow everything."""
    out = [_insn(LD_W_ABS, 0, 0, 4), _insn(JEQ_K, 1, 0, AUDIT_ARCH_X86_64)]
    out.append(_insn(RET_K, 0, 0, SECCOMP_RET_ALLOW))
    out.append(_insn(LD_W_ABS, 0, 0, 0))
    for nr, err in rules:
        out.append(_insn(JEQ_K, 0, 1, nr))
        out.append(_insn(RET_K, 0, 0, SECCOMP_RET_ERRNO | err))
    out.append(_insn(RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return b"".join(out)


def install(rules: list[tuple[int, int]]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    code = program(rules)
    buf = ctypes.create_string_buffer(code, len(code))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Fprog(len(code) // 8, ctypes.addressof(buf))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main() -> None:
    spec, sep, *argv = sys.argv[1:]
    if sep != "--" or not argv:
        raise SystemExit(__doc__)
    rules = [(int(nr), int(err)) for nr, err in (r.split("=") for r in spec.split(","))]
    install(rules)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()

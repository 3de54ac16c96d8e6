"""The Python floor: cfloor.c's watcher, line for line, in Python on an asyncio loop.

fanotify_init(FAN_REPORT_MNT), one FAN_MARK_MNTNS mark on the namespace file given, the
group's fd read by `loop.add_reader` (one registration for good), one statmount per
attach through ctypes, one line printed and flushed per change ("+ID TARGET" / "-ID").
No table, no POLLPRI, no sweeps, no JSON: what the interpreter and its event loop cost
a change before amountd does anything of its own. Standard library only.

    python pyfloor.py /proc/PID/ns/mnt
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import struct
import sys

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_FANOTIFY_INIT, _FANOTIFY_MARK, _STATMOUNT = 300, 301, 457  # x86_64
FAN_CLOEXEC, FAN_NONBLOCK, FAN_REPORT_MNT = 0x1, 0x2, 0x4000
FAN_MARK_ADD, FAN_MARK_MNTNS = 0x1, 0x110
FAN_MNT_ATTACH, FAN_MNT_DETACH, FAN_Q_OVERFLOW = 0x01000000, 0x02000000, 0x4000
FAN_EVENT_INFO_TYPE_MNT = 7
NS_GET_MNTNS_ID = 0x8008B705
STATMOUNT_MASK = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x80 | 0x200  # as cfloor.c
_META = struct.Struct("<IBBHQii")
_INFO = struct.Struct("<BBH4xQ")  # type, pad, len, (reserved), mnt_id
_REQ = struct.Struct("<IIQQQ")


def main() -> int:
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} /proc/PID/ns/mnt", file=sys.stderr)
        return 2
    nsfd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
    arg = bytearray(8)
    fcntl.ioctl(nsfd, NS_GET_MNTNS_ID, arg)
    (ns_id,) = struct.unpack("<Q", arg)
    fan = _syscall(_FANOTIFY_INIT, FAN_REPORT_MNT | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY)
    if fan < 0:
        raise OSError(ctypes.get_errno(), "fanotify_init")
    mask = ctypes.c_uint64(FAN_MNT_ATTACH | FAN_MNT_DETACH)
    if _syscall(_FANOTIFY_MARK, fan, FAN_MARK_ADD | FAN_MARK_MNTNS, mask, nsfd, None) < 0:
        raise OSError(ctypes.get_errno(), "fanotify_mark")
    os.close(nsfd)
    smbuf = ctypes.create_string_buffer(1 << 16)
    view, base = memoryview(smbuf).cast("B"), ctypes.addressof(smbuf)
    out = sys.stdout

    def on_readable() -> None:
        try:
            data = os.read(fan, 1 << 16)
        except BlockingIOError:
            return
        off = 0
        while off + _META.size <= len(data):
            event_len, _, _, meta_len, emask, _, _ = _META.unpack_from(data, off)
            if event_len < _META.size:
                break
            mnt_id = 0
            i = off + meta_len
            while i + 16 <= off + event_len:
                kind, _, length, mid = _INFO.unpack_from(data, i)
                if kind == FAN_EVENT_INFO_TYPE_MNT:
                    mnt_id = mid
                if length == 0:
                    break
                i += length
            if emask & FAN_Q_OVERFLOW:
                out.write("overflow\n")
            elif emask & FAN_MNT_ATTACH:
                req = _REQ.pack(32, 0, mnt_id, STATMOUNT_MASK, ns_id)
                target = "?"
                if _syscall(_STATMOUNT, req, smbuf, ctypes.c_size_t(len(smbuf)), 0) == 0:
                    (smask,) = struct.unpack_from("<Q", view, 8)
                    (point,) = struct.unpack_from("<I", view, 108)
                    if smask & 0x10:  # the NUL-terminated string, read in place
                        target = ctypes.string_at(base + 512 + point).decode(errors="replace")
                out.write(f"+{mnt_id} {target}\n")
            else:
                out.write(f"-{mnt_id}\n")
            off += event_len
        out.flush()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(fan, on_readable)
        out.write("ready\n")
        out.flush()
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())

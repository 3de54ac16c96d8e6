"""loop.py: the iocb it submits is laid out as the kernel's header says (pure; POLLPRI
reaching the loop is in tests/kernel/)."""

from __future__ import annotations

import select
import struct

from amountd.kernel import consts as c
from amountd.kernel.layouts import build_poll_iocb


def test_poll_iocb_layout() -> None:
    """Offsets from uapi linux/aio_abi.h: aio_data 0, aio_lio_opcode 16, aio_fildes 20,
    aio_buf 24 (the poll events), aio_flags 56, aio_resfd 60; 64 bytes in all."""
    b = build_poll_iocb(fd=9, events=select.POLLPRI, resfd=11, data=0xABC)
    assert len(b) == 64
    assert struct.unpack_from("=Q", b, 0) == (0xABC,)
    assert struct.unpack_from("=H", b, 16) == (c.IOCB_CMD_POLL,)
    assert struct.unpack_from("=I", b, 20) == (9,)
    assert struct.unpack_from("=Q", b, 24) == (select.POLLPRI,)
    assert struct.unpack_from("=II", b, 56) == (c.IOCB_FLAG_RESFD, 11)
    assert b[32:56] == bytes(24)  # nbytes, offset, reserved2

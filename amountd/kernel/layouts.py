"""Pure decoders for the kernel's byte layouts: fanotify reads, statmount answers,
listmount ID lists.

No syscalls here: every function takes bytes and returns values, so it is tested on
captured buffers (tests/data/kernel/) without a kernel. Layouts: kernel-facts.md.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable
from typing import NamedTuple

import msgspec

from amountd.model import FsPath, Mount, fspath
from amountd.mountinfo import unescape

from . import consts as c
from .errors import MalformedBuffer

__all__ = [
    "FanEvent",
    "StatMount",
    "build_mnt_id_req",
    "diff_id_lists",
    "fs_options_of",
    "options_of",
    "pack_ids",
    "parse_fanotify_events",
    "parse_statmount",
    "propagation_of",
    "statmount_to_mount",
    "unpack_ids",
]

# ---------------------------------------------------------------------------- fanotify

_Buf = bytes | bytearray | memoryview

_META = struct.Struct("<IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO_HDR = struct.Struct("<BBH")  # info_type, pad, len
_U64 = struct.Struct("<Q")
# The common record: metadata followed by exactly one 16-byte mount info record.
_MNT_EVENT = struct.Struct("<IBBHQiiBBHIQ")
_MNT_EVENT_LEN = _MNT_EVENT.size  # 40
_META_LEN = _META.size  # 24
_MNT_INFO_LEN = 16
_MOUNT_BITS = c.FAN_MNT_ATTACH | c.FAN_MNT_DETACH


class FanEvent(NamedTuple):
    """One fanotify event: `mnt_id` is None only for FAN_Q_OVERFLOW."""

    mask: int
    pid: int
    mnt_id: int | None

    @property
    def overflow(self) -> bool:
        return bool(self.mask & c.FAN_Q_OVERFLOW)

    @property
    def attach(self) -> bool:
        return bool(self.mask & c.FAN_MNT_ATTACH)

    @property
    def detach(self) -> bool:
        return bool(self.mask & c.FAN_MNT_DETACH)


def _parse_one(buf: _Buf, off: int, n: int) -> tuple[FanEvent, int]:
    """The general path: any metadata_len, any info records in any order."""
    if n - off < _META_LEN:
        raise MalformedBuffer(
            f"fanotify buffer: {n - off} trailing bytes at offset {off}, "
            f"shorter than the {_META_LEN}-byte event metadata"
        )
    event_len, vers, _res, meta_len, mask, _fd, pid = _META.unpack_from(buf, off)
    if vers != c.FANOTIFY_METADATA_VERSION:
        raise MalformedBuffer(
            f"fanotify metadata version {vers} at offset {off}, "
            f"expected {c.FANOTIFY_METADATA_VERSION}"
        )
    if meta_len < _META_LEN or event_len < meta_len or off + event_len > n:
        raise MalformedBuffer(
            f"fanotify event at offset {off}: event_len {event_len}, metadata_len "
            f"{meta_len}, {n - off} bytes left"
        )
    end = off + event_len
    info = off + meta_len
    mnt_id: int | None = None
    while info < end:
        if end - info < _INFO_HDR.size:
            raise MalformedBuffer(f"fanotify event at offset {off}: truncated info header")
        itype, _pad, ilen = _INFO_HDR.unpack_from(buf, info)
        if ilen < _INFO_HDR.size or info + ilen > end:
            raise MalformedBuffer(
                f"fanotify event at offset {off}: info record type {itype} has length {ilen}"
            )
        if itype == c.FAN_EVENT_INFO_TYPE_MNT:
            if ilen < _MNT_INFO_LEN:
                raise MalformedBuffer(
                    f"fanotify event at offset {off}: mount info record of {ilen} bytes"
                )
            mnt_id = _U64.unpack_from(buf, info + 8)[0]
        info += ilen
    if mnt_id is None and mask & _MOUNT_BITS:
        raise MalformedBuffer(
            f"fanotify mount event at offset {off} (mask {mask:#x}) has no mount info record: "
            "was the group created with FAN_REPORT_MNT?"
        )
    return FanEvent(mask, pid, mnt_id), end


def parse_fanotify_events(buf: _Buf) -> list[FanEvent]:
    """Decode one read() of a FAN_REPORT_MNT group. MalformedBuffer on a bad layout.

    Most records are 40 bytes (metadata + one mount record), decoded by a single
    unpack; anything else takes the general path.
    """
    out: list[FanEvent] = []
    append = out.append
    n = len(buf)
    off = 0
    unpack = _MNT_EVENT.unpack_from
    while off < n:
        if n - off >= _MNT_EVENT_LEN:
            (elen, vers, _r, mlen, mask, _fd, pid, itype, _p, ilen, _p2, mnt_id) = unpack(buf, off)
            if (
                elen == _MNT_EVENT_LEN
                and mlen == _META_LEN
                and vers == c.FANOTIFY_METADATA_VERSION
                and itype == c.FAN_EVENT_INFO_TYPE_MNT
                and ilen == _MNT_INFO_LEN
            ):
                append(FanEvent(mask, pid, mnt_id))
                off += _MNT_EVENT_LEN
                continue
        ev, off = _parse_one(buf, off, n)
        append(ev)
    return out


# --------------------------------------------------------------------- listmount/statmount

_MNT_ID_REQ = struct.Struct("<IIQQQ")


def build_mnt_id_req(mnt_id: int, param: int = 0, ns_id: int = 0) -> bytes:
    """A 32-byte struct mnt_id_req (VER1): the only size that carries a namespace ID."""
    return _MNT_ID_REQ.pack(c.MNT_ID_REQ_SIZE_VER1, 0, mnt_id, param, ns_id)


# ID lists as listmount() writes them: u64s in the machine's byte order (little-endian on
# the arches amountd knows), ascending. Kept as bytes, so that 10,000 IDs are one object
# compared by memcmp rather than 10,000 ints hashed into sets.
_ID_SIZE = 8


def _check_ids(buf: _Buf, what: str) -> None:
    if len(buf) % _ID_SIZE:
        raise MalformedBuffer(
            f"listmount: {what} ID list of {len(buf)} bytes is not a whole number of u64s"
        )


def pack_ids(ids: Iterable[int]) -> bytes:
    """IDs as listmount writes them (in the order given: diff_id_lists wants them ascending)."""
    return array("Q", ids).tobytes()


def unpack_ids(buf: _Buf) -> list[int]:
    """The IDs of a listmount buffer, as ints (one C loop: no per-ID unpack)."""
    _check_ids(buf, "an")
    return memoryview(buf).cast("B").cast("Q").tolist()


def diff_id_lists(old: bytes, new: bytes) -> tuple[list[int], list[int]]:
    """(gone, added): the IDs only in `old`, and only in `new`, of two ascending listmount
    buffers, each ascending.

    Why not sets: a whole relist happens at every umount, and at 10,000 mounts turning
    both lists into ints and sets costs ~1 ms where the listmount calls cost ~0.4. Here
    equal runs are skipped by memcmp (bytes.startswith on memoryview slices: no copies),
    found by galloping then bisection, so k differences cost O(k log n) Python steps and
    O(n) bytes compared; only the differing IDs become ints. Past a budget of steps (n/8:
    hundreds of scattered differences, a namespace torn down) sets are the cheaper way,
    and the rest is done with them: never much worse than sets alone.
    """
    _check_ids(old, "the old")
    _check_ids(new, "the new")
    o = memoryview(old).cast("Q")
    q = memoryview(new).cast("Q")
    no, nq = len(o), len(q)
    gone: list[int] = []
    added: list[int] = []
    budget = 64 + (no + nq) // 8  # memcmp probes, ~0.2 µs each; sets cost ~0.1 µs an ID
    i = j = 0
    while i < no and j < nq:
        if no - i == nq - j and new.endswith(o[i:]):
            return gone, added  # the rest is alike (the usual end: one change, then this)
        # The run of equal IDs from (i, j): gallop by doubling spans until one differs,
        # then halve that span. `run` IDs are known equal; `span` more are in question.
        limit = min(no - i, nq - j)
        run, step = 0, 1
        while run < limit:
            span = min(step, limit - run)
            budget -= 1
            if not new.startswith(o[i + run : i + run + span], (j + run) * _ID_SIZE):
                while span > 1:
                    half = span // 2
                    budget -= 1
                    if new.startswith(o[i + run : i + run + half], (j + run) * _ID_SIZE):
                        run += half
                        span -= half
                    else:
                        span = half
                break
            run += span
            step *= 2
        i += run
        j += run
        if i == no or j == nq:
            break
        a, b = o[i], q[j]  # they differ: the lower one is missing from the other list
        if a < b:
            gone.append(a)
            i += 1
        else:
            added.append(b)
            j += 1
        if budget < 0:
            rest_old, rest_new = set(o[i:].tolist()), set(q[j:].tolist())
            gone += sorted(rest_old - rest_new)
            added += sorted(rest_new - rest_old)
            return gone, added
    gone += o[i:].tolist()
    added += q[j:].tolist()
    return gone, added


_SM = struct.Struct("<IIQIIQIIQQIIQQQQQIIQIIIIIIQIIII")


class StatMount(msgspec.Struct, frozen=True, gc=False):
    """A decoded struct statmount: raw fields, strings as bytes, None where not in `mask`."""

    size: int
    mask: int
    sb_dev_major: int | None = None
    sb_dev_minor: int | None = None
    sb_magic: int | None = None
    sb_flags: int | None = None
    mnt_id: int | None = None
    mnt_parent_id: int | None = None
    mnt_id_old: int | None = None
    mnt_parent_id_old: int | None = None
    mnt_attr: int | None = None
    mnt_propagation: int | None = None
    mnt_peer_group: int | None = None
    mnt_master: int | None = None
    propagate_from: int | None = None
    mnt_ns_id: int | None = None
    supported_mask: int | None = None
    fs_type: bytes | None = None
    mnt_root: bytes | None = None
    mnt_point: bytes | None = None
    mnt_opts: bytes | None = None
    fs_subtype: bytes | None = None
    sb_source: bytes | None = None
    opt_array: tuple[bytes, ...] | None = None
    opt_sec_array: tuple[bytes, ...] | None = None
    mnt_uidmap: tuple[bytes, ...] | None = None
    mnt_gidmap: tuple[bytes, ...] | None = None


def _string(buf: bytes, size: int, off: int, what: str) -> bytes:
    start = c.STATMOUNT_FIXED_SIZE + off
    end = buf.find(b"\0", start, size)
    if start >= size or end < 0:
        raise MalformedBuffer(
            f"statmount: {what} at string offset {off} is not a NUL-terminated string "
            f"within the {size}-byte answer"
        )
    return buf[start:end]


def _strings(buf: bytes, size: int, off: int, num: int, what: str) -> tuple[bytes, ...]:
    out = []
    for _ in range(num):
        s = _string(buf, size, off, what)
        out.append(s)
        off += len(s) + 1
    return tuple(out)


def parse_statmount(buf: _Buf) -> StatMount:
    """Decode a statmount() answer; MalformedBuffer if it does not hold together."""
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    n = len(buf)
    if n < c.STATMOUNT_FIXED_SIZE:
        raise MalformedBuffer(
            f"statmount: {n} bytes, shorter than the {c.STATMOUNT_FIXED_SIZE}-byte fixed part"
        )
    (
        size, o_opts, mask, major, minor, magic, sb_flags, o_type, mnt_id, parent_id,
        id_old, parent_old, attr, prop, peer, master, prop_from, o_root, o_point, ns_id,
        o_subtype, o_source, opt_num, o_opt_array, opt_sec_num, o_sec_array, supported,
        uid_num, o_uidmap, gid_num, o_gidmap,
    ) = _SM.unpack_from(buf)  # fmt: skip
    if not c.STATMOUNT_FIXED_SIZE <= size <= n:
        raise MalformedBuffer(
            f"statmount: size field {size} with a {n}-byte buffer "
            f"(the fixed part alone is {c.STATMOUNT_FIXED_SIZE})"
        )
    sb = mask & c.STATMOUNT_SB_BASIC
    mb = mask & c.STATMOUNT_MNT_BASIC
    return StatMount(
        size,
        mask,
        major if sb else None,
        minor if sb else None,
        magic if sb else None,
        sb_flags if sb else None,
        mnt_id if mb else None,
        parent_id if mb else None,
        id_old if mb else None,
        parent_old if mb else None,
        attr if mb else None,
        prop if mb else None,
        peer if mb else None,
        master if mb else None,
        prop_from if mask & c.STATMOUNT_PROPAGATE_FROM else None,
        ns_id if mask & c.STATMOUNT_MNT_NS_ID else None,
        supported if mask & c.STATMOUNT_SUPPORTED_MASK else None,
        _string(buf, size, o_type, "fs_type") if mask & c.STATMOUNT_FS_TYPE else None,
        _string(buf, size, o_root, "mnt_root") if mask & c.STATMOUNT_MNT_ROOT else None,
        _string(buf, size, o_point, "mnt_point") if mask & c.STATMOUNT_MNT_POINT else None,
        _string(buf, size, o_opts, "mnt_opts") if mask & c.STATMOUNT_MNT_OPTS else None,
        _string(buf, size, o_subtype, "fs_subtype") if mask & c.STATMOUNT_FS_SUBTYPE else None,
        _string(buf, size, o_source, "sb_source") if mask & c.STATMOUNT_SB_SOURCE else None,
        _strings(buf, size, o_opt_array, opt_num, "opt_array")
        if mask & c.STATMOUNT_OPT_ARRAY
        else None,
        _strings(buf, size, o_sec_array, opt_sec_num, "opt_sec_array")
        if mask & c.STATMOUNT_OPT_SEC_ARRAY
        else None,
        _strings(buf, size, o_uidmap, uid_num, "mnt_uidmap")
        if mask & c.STATMOUNT_MNT_UIDMAP
        else None,
        _strings(buf, size, o_gidmap, gid_num, "mnt_gidmap")
        if mask & c.STATMOUNT_MNT_GIDMAP
        else None,
    )


# ------------------------------------------------------------------- StatMount -> Mount

# fs/proc_namespace.c show_mnt_opts(), in its order; relatime and idmapped handled apart.
_MNT_FLAG_OPTS = (
    (c.MOUNT_ATTR_NOSUID, ",nosuid"),
    (c.MOUNT_ATTR_NODEV, ",nodev"),
    (c.MOUNT_ATTR_NOEXEC, ",noexec"),
)
# show_sb_opts(), in its order.
_SB_FLAG_OPTS = (
    (c.SB_SYNCHRONOUS, ",sync"),
    (c.SB_DIRSYNC, ",dirsync"),
    (c.SB_MANDLOCK, ",mand"),
    (c.SB_LAZYTIME, ",lazytime"),
)
_SB_FLAGS_SHOWN = c.SB_SYNCHRONOUS | c.SB_DIRSYNC | c.SB_MANDLOCK | c.SB_LAZYTIME
_options_cache: dict[int, str] = {}


def options_of(mnt_attr: int) -> str:
    """mountinfo's 6th field for a statmount mnt_attr (ro/rw, then show_mnt_opts)."""
    s = _options_cache.get(mnt_attr)
    if s is not None:
        return s
    parts = ["ro" if mnt_attr & c.MOUNT_ATTR_RDONLY else "rw"]
    for bit, word in _MNT_FLAG_OPTS:
        if mnt_attr & bit:
            parts.append(word)
    atime = mnt_attr & c.MOUNT_ATTR__ATIME
    if atime == c.MOUNT_ATTR_NOATIME:
        parts.append(",noatime")
    if mnt_attr & c.MOUNT_ATTR_NODIRATIME:
        parts.append(",nodiratime")
    if atime == c.MOUNT_ATTR_RELATIME:
        parts.append(",relatime")
    if mnt_attr & c.MOUNT_ATTR_NOSYMFOLLOW:
        parts.append(",nosymfollow")
    if mnt_attr & c.MOUNT_ATTR_IDMAP:
        parts.append(",idmapped")
    s = "".join(parts)
    if len(_options_cache) < 4096:
        _options_cache[mnt_attr] = s
    return s


def fs_options_of(sb_flags: int, mnt_opts: bytes | None) -> bytes:
    """mountinfo's super options: ro/rw, show_sb_opts flags, then the fs's own options."""
    head = b"ro" if sb_flags & c.SB_RDONLY else b"rw"
    if sb_flags & _SB_FLAGS_SHOWN:
        head += "".join(w for bit, w in _SB_FLAG_OPTS if sb_flags & bit).encode()
    if mnt_opts:
        # Filesystems write options through seq_show_option(): octal escapes for
        # ", = \t\n\\", undone here since amountd carries raw bytes.
        return head + b"," + unescape(mnt_opts)
    return head


def propagation_of(propagation: int, peer_group: int, master: int, propagate_from: int) -> str:
    """mountinfo's optional fields (show_mountinfo(): shared, master, propagate_from,
    unbindable); propagate_from is shown only when set and different from master."""
    if propagation == c.MS_PRIVATE or not propagation:
        return ""
    parts = []
    if propagation & c.MS_SHARED:
        parts.append(f"shared:{peer_group}")
    if propagation & c.MS_SLAVE:
        parts.append(f"master:{master}")
        if propagate_from and propagate_from != master:
            parts.append(f"propagate_from:{propagate_from}")
    if propagation & c.MS_UNBINDABLE:
        parts.append("unbindable")
    return " ".join(parts)


_paths: dict[bytes, FsPath] = {}
_NONE = FsPath("none")


def _path(raw: bytes | None) -> FsPath | None:
    # Roots, sources and options repeat across mounts: intern a bounded number.
    if raw is None:
        return None
    p = _paths.get(raw)
    if p is None:
        p = fspath(raw)
        if len(_paths) < 4096:
            _paths[raw] = p
    return p


def statmount_to_mount(sm: StatMount, requested: int = c.STATMOUNT_MOUNT) -> Mount:
    """The Mount that /proc/PID/mountinfo shows for the same mount (raw bytes, unescaped).

    The kernel leaves empty strings out of the answer's mask (a mount without a source,
    a filesystem without options), so `requested` (the mask statmount was asked for)
    tells "empty" from "not asked": a field whose parts were not asked for is None.
    """
    got = sm.mask | requested
    fstype: str | None = None
    if sm.fs_type is not None:
        fstype = sm.fs_type.decode("utf-8", "surrogateescape")
        if sm.fs_subtype:
            fstype += "." + sm.fs_subtype.decode("utf-8", "surrogateescape")
    source: FsPath | None = None
    if sm.sb_source is not None:
        source = _path(sm.sb_source)
    elif got & c.STATMOUNT_SB_SOURCE:
        source = _NONE  # mountinfo's word for a mount without a source
    fs_options: FsPath | None = None
    if sm.sb_flags is not None and got & c.STATMOUNT_MNT_OPTS:
        fs_options = _path(fs_options_of(sm.sb_flags, sm.mnt_opts))
    propagation: str | None = None
    if sm.mnt_propagation is not None:
        propagation = propagation_of(
            sm.mnt_propagation,
            sm.mnt_peer_group or 0,
            sm.mnt_master or 0,
            sm.propagate_from or 0,
        )
    dev = None
    if sm.sb_dev_major is not None:
        dev = f"{sm.sb_dev_major}:{sm.sb_dev_minor}"
    return Mount(
        id=sm.mnt_id,
        legacy_id=sm.mnt_id_old,
        parent_id=sm.mnt_parent_id,
        legacy_parent_id=sm.mnt_parent_id_old,
        ns_id=sm.mnt_ns_id,
        target=fspath(sm.mnt_point) if sm.mnt_point is not None else None,
        root=_path(sm.mnt_root),
        source=source,
        fstype=fstype,
        options=options_of(sm.mnt_attr) if sm.mnt_attr is not None else None,
        fs_options=fs_options,
        propagation=propagation,
        dev=dev,
    )


# struct iocb (uapi linux/aio_abi.h): data, key, rw_flags, opcode, reqprio, fildes, buf,
# nbytes, offset, reserved2, flags, resfd. 64 bytes; key and rw_flags swap places on
# big-endian machines, and both are 0 here.
_IOCB = struct.Struct("=QIiHhIQQqQII")
IO_EVENT_SIZE = 32  # struct io_event: data, obj, res, res2


def build_poll_iocb(fd: int, events: int, resfd: int, data: int = 0) -> bytes:
    """An IOCB_CMD_POLL request: poll `fd` for `events` once, then signal eventfd `resfd`."""
    return _IOCB.pack(data, 0, 0, c.IOCB_CMD_POLL, 0, fd, events, 0, 0, 0, c.IOCB_FLAG_RESFD, resfd)
